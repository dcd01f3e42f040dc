"""Built-in method plugins, one module per method (installed as ``mmbalance.methods``); every
module here registers itself on import (``mmbalance list methods`` shows them)."""
