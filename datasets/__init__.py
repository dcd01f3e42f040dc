"""Built-in dataset plugins, one module per dataset (installed as ``mmbalance.datasets``).

This folder is meant to be imported only as ``mmbalance.datasets`` (pyproject's package-dir).
When the source tree's root is on ``sys.path`` (``python -m pytest`` or a REPL started there),
a plain ``import datasets`` would find this folder and shadow Hugging Face's ``datasets``
package, which ``transformers`` may import. The guard below hands such an import over to the
real top-level package, or fails as if this folder were not there.
"""

if __name__ == "datasets":  # imported as a top-level package by accident
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _tree = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _tree]
    _spec = importlib.machinery.PathFinder.find_spec("datasets", _path)
    if _spec is None or _spec.loader is None:
        del sys.modules["datasets"]
        raise ModuleNotFoundError(
            "No module named 'datasets' (the folder datasets/ in mmbalance's source tree holds "
            "mmbalance's dataset plugins; import them as mmbalance.datasets)",
            name="datasets",
        )
    _real = importlib.util.module_from_spec(_spec)
    sys.modules["datasets"] = _real
    _spec.loader.exec_module(_real)
