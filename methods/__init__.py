"""Built-in method plugins, one module per method (installed as ``mmbalance.methods``)."""

BUILTIN = (
    "concat", "sum", "weight", "unimodal", "iprm",
    "ogm", "pmr", "agm", "mslr", "ogr_gb", "mmpareto", "reconboost", "mla", "lfm",
)
