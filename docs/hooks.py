"""MkDocs hook: the reference parts of the documentation are generated from the code.

A page asks for a generated block with a marker, an HTML comment that stays invisible where
the page is read raw (on a forge, in an editor)::

    <!-- mmbalance:method NAME -->        facts of a registered method (modalities, defaults...)
    <!-- mmbalance:options method NAME --> the options table of a method, from its Option declarations
    <!-- mmbalance:options dataset NAME --> the same for a dataset plugin
    <!-- mmbalance:options trainer -->     the trainer's own settings
    <!-- mmbalance:cost NAME -->           the method's measured cost (docs/data/method_costs.json)
    <!-- mmbalance:dataset NAME -->        facts of a registered dataset (layout, recipe, fingerprint)
    <!-- mmbalance:registry methods|datasets --> the list of built-in plugins with their pages
    <!-- mmbalance:include PATH -->        a committed file (a leaderboard), headings one level down

A marker stands alone on its line, starting in the first column.

So option names, defaults, ranges, help texts, recipes and layouts cannot drift from the code:
they are read from it at every build. A marker naming something unknown fails the build.
``tests/test_docs.py`` renders every page through :func:`render_page`, the function the build
uses, and checks the tables against the declarations.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
COSTS = DOCS / "data" / "method_costs.json"
# A marker stands alone on its line, from its first column (an indented one, e.g. inside a
# code block that shows how to write a page, is left as it is).
MARKER = re.compile(r"^<!--[ \t]*mmbalance:([a-z-]+)((?:[ \t]+[^\s>]+)*)[ \t]*-->[ \t]*$", re.MULTILINE)

# Option fields that have their own column; every other field of Option (a later addition
# such as a search range) gets a column of its own wherever some option in the table sets it.
SHOWN_FIELDS = ("default", "help", "choices", "type", "min", "max", "min_open", "max_open", "changes_results")
BUILTIN_METHODS_PKG = "mmbalance.methods"
BUILTIN_DATASETS_PKG = "mmbalance.datasets"


class DocsError(Exception):
    """A marker that cannot be rendered (unknown name, missing data file)."""


# ---- text helpers --------------------------------------------------------------------------------
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|$])")


def escape(text: str) -> str:
    """Plain text for a table cell: markdown, HTML and math delimiters neutralised."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def code(value: Any) -> str:
    """A value as the YAML a user would write after ``--set key=``, in a code span."""
    if isinstance(value, str):
        text = value
    else:
        text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
        if text.endswith("\n..."):
            text = text[: -len("\n...")]
        text = text.removesuffix("...").strip()
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def table(header: list[str], rows: Iterable[list[str]]) -> str:
    rows = list(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ---- options tables ------------------------------------------------------------------------------
def _as_option(value: Any) -> Any:
    from mmbalance.config import as_option

    return as_option(value)


def _type_name(opt: Any) -> str:
    kind = opt.type or (type(opt.default) if opt.default is not None else None)
    if kind is None:
        return "any"
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {bool: "true/false", int: "integer", float: "number", str: "text", list: "list", dict: "mapping",
             tuple: "list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def allowed_text(opt: Any) -> str:
    """What values an option takes: its choices, else its type and numeric range."""
    if opt.choices is not None:
        return "one of " + ", ".join(code(c) for c in opt.choices)
    text = _type_name(opt)
    rng = opt.range_text()
    return f"{text}, {escape(rng)}" if rng else text


def extra_fields(options: Mapping[str, Any]) -> list[str]:
    """Option fields beyond the standard columns that some option of this table sets."""
    extra: list[str] = []
    for opt in options.values():
        for f in dataclasses.fields(opt):
            if f.name in SHOWN_FIELDS or f.name in extra:
                continue
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            if getattr(opt, f.name) != default:
                extra.append(f.name)
    return extra


def changes_results(key: str, opt: Any) -> bool:
    """Whether a key can change a computed number, i.e. enters the run's identity: the
    Option's ``changes_results`` declaration (the run hash reads the same field)."""
    return bool(opt.changes_results)


def extra_cell(value: Any) -> str:
    """The cell of an extra Option field: a search range as its one-line text (``log 0.0001 ..
    0.3``, ``one of auto, fixed``), any other value as the YAML a user would write."""
    if value in (None, (), {}, []):
        return "—"
    text = getattr(value, "text", None)
    return escape(text()) if callable(text) else code(value)


OPTION_HEADER = ["option", "default", "allowed values", "changes results", "what it does"]


def options_table(options: Mapping[str, Any]) -> str:
    """The markdown table of ``options`` (a plugin's ``options`` dict), one row per key in
    declaration order: name, default, allowed values, whether it changes results, help, and a
    column per extra Option field that some option sets."""
    opts = {k: _as_option(v) for k, v in options.items()}
    if not opts:
        return "*This plugin declares no options of its own.*"
    extra = extra_fields(opts)
    rows = []
    for key, opt in opts.items():
        row = [code(key), code(opt.default), allowed_text(opt), "yes" if changes_results(key, opt) else "no",
               escape(opt.help) or "—"]
        for name in extra:
            value = getattr(opt, name)
            row.append(extra_cell(value))
        rows.append(row)
    return table(OPTION_HEADER + [f"`{n}`" for n in extra], rows)


def parse_options_table(markdown: str, first_option: str) -> dict[str, dict[str, str]]:
    """The rows of the options table whose first row is ``first_option``, back as cells
    (used by the tests to compare a rendered table with the declarations)."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| `{first_option}` |"))
    header_at = start - 2
    header = [c.strip() for c in lines[header_at].strip("|").split(" | ")]
    rows: dict[str, dict[str, str]] = {}
    for line in lines[start:]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in re.split(r"(?<!\\) \| ", line.strip()[2:-2])]
        rows[cells[0].strip("`")] = dict(zip(header, cells, strict=True))
    return rows


# ---- registries ----------------------------------------------------------------------------------
def builtin(kind: str) -> dict[str, Any]:
    """The built-in plugins of a registry (third-party ones installed beside are left out:
    the documentation describes what ships)."""
    from mmbalance.registry import DATASETS, METHODS

    reg, pkg = (METHODS, BUILTIN_METHODS_PKG) if kind == "methods" else (DATASETS, BUILTIN_DATASETS_PKG)
    return {e.name: e for e in reg.entries() if getattr(e.obj, "__module__", "").startswith(pkg + ".")}


def _entry(kind: str, name: str) -> Any:
    entries = builtin(kind)
    if name not in entries:
        raise DocsError(f"no built-in {kind[:-1]} named '{name}' (known: {', '.join(entries)})")
    return entries[name]


def page_of(kind: str, name: str) -> str:
    """The documentation page of a built-in method or dataset, relative to docs/."""
    return f"{kind}/{name}.md"


def registry_table(kind: str, here: str) -> str:
    depth = here.count("/")
    prefix = "../" * depth
    rows = []
    for name, entry in builtin(kind).items():
        rows.append([f"[`{name}`]({prefix}{page_of(kind, name)})", escape(entry.description)])
    return table([kind[:-1], "what it is"], rows)


# ---- methods -------------------------------------------------------------------------------------
def _modalities_text(cls: Any) -> str:
    lo, hi = cls.min_modalities, cls.max_modalities
    if hi is not None and hi == lo:
        return f"exactly {lo}"
    return f"{lo} or more" if hi is None else f"{lo} to {hi}"


def paper_values(name: str) -> dict[str, dict[str, Any]]:
    """Per-dataset option values of a method: its own ``dataset_defaults`` overlaid with each
    dataset plugin's ``method_defaults`` (the order config.assemble applies them in)."""
    cls = _entry("methods", name).obj
    out = {ds: dict(v) for ds, v in getattr(cls, "dataset_defaults", {}).items()}
    for ds_name, entry in builtin("datasets").items():
        own = getattr(entry.obj, "method_defaults", {}).get(name)
        if own:
            out.setdefault(ds_name, {}).update(own)
    return dict(sorted(out.items()))


def _settings_text(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{code(k)} = {code(v)}" for k, v in values.items()) or "—"


def method_facts(name: str) -> str:
    entry = _entry("methods", name)
    cls = entry.obj
    rows = [
        ["registered name", f"`{name}` (`mmbalance run --method {name} ...`)"],
        ["summary", escape(entry.description)],
        ["plugin class", f"`{cls.__module__}.{cls.__qualname__}` (source `methods/{cls.__module__.rsplit('.', 1)[-1]}.py`)"],
        ["modalities", _modalities_text(cls)],
        ["optimisation", "manual (several backward passes or optimizer steps per batch)"
         if cls.manual_optimization else "automatic (one backward pass and one optimizer step per batch)"],
    ]
    if getattr(cls, "fusion", None):
        rows.append(["default fused head", f"`{cls.fusion}`"])
    if isinstance(cls.__dict__.get("heldout_fraction", cls.heldout_fraction), float) and cls.heldout_fraction:
        rows.append(["held-out share of train", code(cls.heldout_fraction)])
    if cls.key_diagnostic:
        rows.append(["key diagnostic (epoch lines)", f"`{cls.key_diagnostic}`"])
    if cls.defaults:
        rows.append(["trainer settings it changes", _settings_text(cls.defaults)])
    values = paper_values(name)
    rows.append(["values per dataset", "; ".join(f"`{ds}`: {_settings_text(v)}" for ds, v in values.items())
                 or "none (the defaults below apply on every dataset)"])
    return table(["fact", "value"], rows)


def _costs() -> dict[str, Any]:
    if not COSTS.is_file():
        raise DocsError(f"{COSTS.relative_to(ROOT)} is missing; run `python benchmarks/method_costs.py`")
    return json.loads(COSTS.read_text())


def cost_block(name: str) -> str:
    """The method's rows of the measured cost table, with the machine that measured them."""
    _entry("methods", name)
    data = _costs()
    rows = [r for r in data["rows"] if r["method"] == name]
    m = data["machine"]
    dates = sorted({r["date"] for r in rows}) or [data["date"]]
    rounds = sorted({r["rounds"] for r in rows if r.get("rounds")})
    threads = f"{m['torch_threads']} torch thread" + ("s" if m["torch_threads"] != 1 else "")
    loads = sorted({tuple(r["load_average"]) for r in rows if r.get("load_average")})
    busy = (" The machine's 1-minute load average (start, end of the run): "
            + "; ".join(f"{a:g}, {b:g}" for a, b in loads) + ". Compare the ratios, not the seconds.") if loads else ""
    where = (f"Measured on {escape(m['cpu'])} ({m['cpu_count']} cores, bf16 kernels "
             f"{escape(m['cpu_kernels'] or 'unknown')}, {threads}, torch "
             f"{m['libraries'].get('torch')}, device {rows[0]['device'] if rows else 'cpu'}) on "
             f"{' and '.join(dates)} by `{data['generated_by']}` ("
             + (f"{' or '.join(map(str, rounds))} timed epochs per row, " if rounds else "")
             + "each epoch alternating with an epoch of the baseline in the same process, so a change of "
             f"load affects both sides of a ratio). Baseline: {escape(data['baseline'])}. The raw file: "
             "`docs/data/method_costs.json`." + busy)
    lead = ("Concat with `unimodal_loss=true` **is** the baseline of these measurements (ratio 1 by "
            "definition); the rows time plain Concat, one joint loss.\n\n") if name == "concat" else ""
    if not rows:
        return lead + f"*Not measured yet: `benchmarks/bench_methods.py` does not time `{name}`.*\n\n" + where
    body = lead + table(
        ["variant", "options", "dataset", "batches / epoch", "epoch time ratio (median)", "ratio of fastest epochs",
         "estimation outside the loop (s)"],
        [[escape(r["label"]), _settings_text(r["options"]) if r["options"] else "defaults", f"`{r['dataset']}`",
          str(r["batches_per_epoch"]), f"{r['ratio_median']:.2f}", f"{r['ratio_min']:.2f}",
          f"{r['estimation_s']:.2f}" if r["estimation_s"] else "—"] for r in rows],
    )
    full = ("\n\nOver whole runs, the benchmark's Table 4 ([results](../results/index.md)) gives every "
            "method's seconds per epoch and its ratio to Concat on each of its settings.")
    return body + "\n\n" + where + full


# ---- datasets ------------------------------------------------------------------------------------
def _recipe_rows(defaults: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for key, value in defaults.items():
        if key == "backbone":
            for mod, spec in value.items():
                spec = spec if isinstance(spec, Mapping) else {"name": spec}
                rows.append([f"`backbone.{mod}`", _settings_text(spec)])
        else:
            rows.append([code(key), code(value)])
    return rows


def _fingerprint_doc(cls: Any) -> str:
    from mmbalance.data import DatasetPlugin

    if not cls.needs_data_root and cls.data_fingerprint is DatasetPlugin.data_fingerprint:
        return "nothing (it reads no files)"
    doc = inspect.getdoc(cls.data_fingerprint) or ""
    if cls.data_fingerprint is DatasetPlugin.data_fingerprint:
        doc = ("the resolved data root plus the names, sizes and modification times of its top-level "
               "entries (the default for large file datasets; cheap, and it changes when the folder "
               "is swapped, rebuilt or moved)")
    return escape(doc.split("\n\n")[0])


def dataset_facts(name: str) -> str:
    from mmbalance.config import PAPER_PROTOCOL

    entry = _entry("datasets", name)
    cls = entry.obj
    rows = [
        ["registered name", f"`{name}` (`mmbalance run --dataset {name} ...`)"],
        ["summary", escape(entry.description)],
        ["plugin class", f"`{cls.__module__}.{cls.__qualname__}` (source `datasets/{cls.__module__.rsplit('.', 1)[-1]}.py`)"],
        ["modalities (default order)", ", ".join(f"`{m}`" for m in cls.modality_names) or "read from the files"],
        ["reads files", "yes, under the data root" + (f" (in its `{cls.data_subdir}/` folder when present)"
                                                     if cls.data_subdir else "") if cls.needs_data_root else "no"],
    ]
    if cls.prepare_command:
        rows.append(["one-time preparation", f"`{cls.prepare_command}`"])
    rows.append(["identity of its data (fingerprint)", _fingerprint_doc(cls)])
    rows.append(["build shared by the cells of a grid worker", "yes (`pure_build`)" if cls.pure_build else "no"])
    if cls.method_defaults:
        rows.append(["paper values per method", "; ".join(f"`{m}`: {_settings_text(v)}"
                                                         for m, v in cls.method_defaults.items())])
    paper = {**PAPER_PROTOCOL, **getattr(cls, "paper_protocol", {})}
    rows.append(["`--protocol paper` sets", _settings_text(paper)])
    out = table(["fact", "value"], rows)
    out += "\n\n**Training recipe** (the dataset's defaults; every method runs with them unless told otherwise):\n\n"
    out += table(["setting", "value"], _recipe_rows(cls.defaults)) if cls.defaults else "*none: the trainer's defaults*"
    if cls.layout_help:
        out += "\n\n**Layout it reads** (the text its data errors print):\n\n> " + escape(cls.layout_help)
    out += prepare_block(cls.prepare_command)
    return out


def prepare_block(command: str | None) -> str:
    """What ``mmbalance prepare NAME`` reads and writes, and its options (from the preparer)."""
    from mmbalance.prepare import RAW_LAYOUTS, preparer_options

    names = [n for n in RAW_LAYOUTS if command and re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", command)]
    out = ""
    for name in names:
        opts = preparer_options(name)
        out += (f"\n\n**`mmbalance prepare {name} --raw RAW --out ROOT`** (once, before the first run):\n\n> "
                + escape(RAW_LAYOUTS[name]))
        if opts:
            out += "\n\nIts settings (`--set key=value`): " + ", ".join(f"{code(k)} = {code(v)}" for k, v in opts.items()) + "."
    return out


def trainer_options() -> str:
    from mmbalance.config import TRAINER_OPTIONS

    return options_table({k: v for k, v in TRAINER_OPTIONS.items() if k not in ("method", "dataset")})


# ---- includes ------------------------------------------------------------------------------------
def include(path: str) -> str:
    """A committed markdown file, its headings one level down (the page has its own title)."""
    src = (ROOT / path).resolve()
    if ROOT not in src.parents or not src.is_file():
        raise DocsError(f"cannot include '{path}': not a file of the repository")
    text = src.read_text(encoding="utf-8")
    return re.sub(r"^(#{1,5}) ", r"#\1 ", text, flags=re.MULTILINE)


# ---- the page renderer ---------------------------------------------------------------------------
def _options_marker(args: list[str]) -> str:
    if args == ["trainer"]:
        return trainer_options()
    if len(args) != 2 or args[0] not in ("method", "dataset"):
        raise DocsError(f"options marker takes 'method NAME', 'dataset NAME' or 'trainer', got {args}")
    kind = args[0] + "s"
    return options_table(_entry(kind, args[1]).obj.options)


def render_page(markdown: str, page_path: str = "index.md") -> str:
    """Replace every marker of a page by its generated block (what the build does)."""
    handlers: dict[str, Callable[[list[str]], str]] = {
        "method": lambda a: method_facts(*a),
        "options": _options_marker,
        "cost": lambda a: cost_block(*a),
        "dataset": lambda a: dataset_facts(*a),
        "registry": lambda a: registry_table(a[0], page_path),
        "include": lambda a: include(*a),
    }

    def replace(match: re.Match[str]) -> str:
        kind, args = match.group(1), match.group(2).split()
        if kind not in handlers:
            raise DocsError(f"{page_path}: unknown marker 'mmbalance:{kind}'")
        try:
            return handlers[kind](args)
        except TypeError as exc:
            raise DocsError(f"{page_path}: bad arguments {args} for marker 'mmbalance:{kind}': {exc}") from exc

    return MARKER.sub(replace, markdown)


def missing_pages(pages: set[str]) -> list[str]:
    """The pages (relative to docs/) that built-in methods and datasets lack among ``pages``."""
    return [page_of(kind, name) for kind in ("methods", "datasets") for name in builtin(kind)
            if page_of(kind, name) not in pages]


# ---- MkDocs events -------------------------------------------------------------------------------
def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    from mkdocs.exceptions import PluginError

    try:
        return render_page(markdown, page.file.src_uri)
    except DocsError as exc:
        raise PluginError(f"docs/hooks.py: {exc}") from exc


def on_files(files: Any, config: Any) -> Any:
    """The leaderboards' pictures beside the results pages that include them; a built-in
    plugin without its page fails the build."""
    from mkdocs.exceptions import PluginError
    from mkdocs.structure.files import File

    for png in sorted((ROOT / "leaderboards").glob("*.png")):
        files.append(File.generated(config, f"results/{png.name}", abs_src_path=str(png)))
    missing = missing_pages({f.src_uri for f in files})
    if missing:
        raise PluginError(f"docs/hooks.py: built-in plugins without a documentation page: {', '.join(missing)}")
    return files
