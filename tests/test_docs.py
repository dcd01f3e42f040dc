"""The documentation: every built-in plugin has its page, and the generated reference tables
say what the code declares.

The pages are rendered through ``docs/hooks.py:render_page``, the function the MkDocs build
runs on every page, and the tables read back and compared with the ``Option`` declarations.
``mkdocs build --strict`` itself runs in CI (``.ci/run``) and in the slow test below.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mmbalance.config import TRAINER_OPTIONS, Option, Search, as_option, parse_value

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _load_hooks() -> Any:
    spec = importlib.util.spec_from_file_location("mmbalance_docs_hooks", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = _load_hooks()
from mmbalance.registry import DATASETS as REGISTERED_DATASETS  # noqa: E402
from mmbalance.registry import METHODS as REGISTERED_METHODS  # noqa: E402

METHODS = sorted(hooks.builtin("methods"))
DATASETS = sorted(hooks.builtin("datasets"))


def _nav_pages() -> set[str]:
    """Every page the mkdocs.yml nav lists (relative to docs/)."""
    text = (ROOT / "mkdocs.yml").read_text()
    nav = text[text.index("\nnav:"):]
    return set(re.findall(r"([\w./-]+\.md)\s*$", nav, flags=re.MULTILINE))


def _rendered(kind: str, name: str) -> str:
    rel = hooks.page_of(kind, name)
    return hooks.render_page((DOCS / rel).read_text(), rel)


def _unescape(cell: str) -> str:
    return re.sub(r"\\(.)", r"\1", cell)


def _code_text(cell: str) -> str:
    """The text of a code span cell (`x` or `` x ``)."""
    m = re.fullmatch(r"``? ?(.*?) ?``?", cell)
    assert m, f"not a code span: {cell!r}"
    return m.group(1)


def _declared_default(text: str, declared: Any) -> bool:
    """Whether a rendered default reads back (as `--set key=<text>` would) as the declaration."""
    if isinstance(declared, str):
        return text == declared
    value = parse_value(text)
    if isinstance(declared, tuple):
        declared = list(declared)
    return value == declared and type(value) is type(declared)


def assert_table_matches(rendered: str, options: dict[str, Any], where: str) -> None:
    """The options table in ``rendered`` has one row per declared option, in order, whose name,
    default, allowed values, changes-results flag and help are the declaration's."""
    opts = {k: as_option(v) for k, v in options.items()}
    if not opts:
        assert "declares no options" in rendered, where
        return
    rows = hooks.parse_options_table(rendered, next(iter(opts)))
    assert list(rows) == list(opts), f"{where}: table rows {list(rows)} != declared {list(opts)}"
    for key, opt in opts.items():
        row = rows[key]
        default = _code_text(row["default"])
        assert _declared_default(default, opt.default), f"{where}: {key} default shown {default!r}, declared {opt.default!r}"
        changes = opt.changes_results  # what enters the run's identity
        assert row["changes results"] == ("yes" if changes else "no"), f"{where}: {key} changes results"
        assert _unescape(row["what it does"]) == (" ".join(opt.help.split()) or "—"), f"{where}: {key} help"
        allowed = row["allowed values"]
        if opt.choices is not None:
            shown = re.findall(r"`([^`]*)`", allowed)
            assert shown == [str(_code_text(hooks.code(c))) for c in opt.choices], f"{where}: {key} choices"
        elif opt.range_text():
            assert _unescape(allowed).endswith(opt.range_text()), f"{where}: {key} range {allowed!r}"
        if opt.search is not None:  # the range `mmbalance tune` searches
            assert _unescape(row["`search`"]) == opt.search.text(), f"{where}: {key} search range"
        elif "`search`" in row:
            assert row["`search`"] == "—", f"{where}: {key} shows a search range it does not declare"


# ---- every plugin has its page -------------------------------------------------------------------
def test_builtin_registries_are_complete() -> None:
    """The pages are checked against the registries: every module of the built-in plugin
    packages registers at least one plugin, so no built-in method or dataset escapes them."""
    import importlib
    import pkgutil

    for package, registry in (("mmbalance.methods", REGISTERED_METHODS), ("mmbalance.datasets", REGISTERED_DATASETS)):
        modules = {f"{package}.{m.name}" for m in pkgutil.iter_modules(importlib.import_module(package).__path__)
                   if not m.name.startswith("_")}
        registered = {e.obj.__module__ for e in registry.entries()}
        assert modules - registered == set(), f"{package}: modules that register nothing"


@pytest.mark.parametrize("name", METHODS)
def test_every_method_has_a_page(name: str) -> None:
    """A method page exists, is in the nav, and carries the generated facts, options and cost."""
    rel = hooks.page_of("methods", name)
    assert (DOCS / rel).is_file(), f"docs/{rel} is missing: write the page of method '{name}'"
    assert rel in _nav_pages(), f"docs/{rel} is not listed in mkdocs.yml's nav"
    text = (DOCS / rel).read_text()
    for marker in (f"<!-- mmbalance:method {name} -->", f"<!-- mmbalance:options method {name} -->",
                   f"<!-- mmbalance:cost {name} -->"):
        assert re.search(rf"^{re.escape(marker)}$", text, flags=re.MULTILINE), f"docs/{rel} lacks {marker}"
    for section in ("## The idea", "## The update rule", "## Official code it follows",
                    "## Departures and how to switch them off", "## What it supports and refuses"):
        assert section in text, f"docs/{rel} lacks the section '{section}'"


@pytest.mark.parametrize("name", DATASETS)
def test_every_dataset_has_a_page(name: str) -> None:
    rel = hooks.page_of("datasets", name)
    assert (DOCS / rel).is_file(), f"docs/{rel} is missing: write the page of dataset '{name}'"
    assert rel in _nav_pages(), f"docs/{rel} is not listed in mkdocs.yml's nav"
    text = (DOCS / rel).read_text()
    for marker in (f"<!-- mmbalance:dataset {name} -->", f"<!-- mmbalance:options dataset {name} -->"):
        assert re.search(rf"^{re.escape(marker)}$", text, flags=re.MULTILINE), f"docs/{rel} lacks {marker}"


def test_the_build_refuses_a_missing_page() -> None:
    """The hook's own check (run by the build) names a built-in plugin without its page."""
    present = {hooks.page_of(k, n) for k, names in (("methods", METHODS), ("datasets", DATASETS)) for n in names}
    assert hooks.missing_pages(present) == []
    assert hooks.missing_pages(present - {"methods/ogm.md", "datasets/mfeat.md"}) == ["methods/ogm.md", "datasets/mfeat.md"]


def test_every_page_is_in_the_nav() -> None:
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages - _nav_pages() == set()
    assert _nav_pages() - pages == set()


# ---- the generated tables say what the code declares ---------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_method_options_table_matches_declarations(name: str) -> None:
    assert_table_matches(_rendered("methods", name), hooks.builtin("methods")[name].obj.options, f"method {name}")


@pytest.mark.parametrize("name", DATASETS)
def test_dataset_options_table_matches_declarations(name: str) -> None:
    assert_table_matches(_rendered("datasets", name), hooks.builtin("datasets")[name].obj.options, f"dataset {name}")


def test_trainer_options_table_matches_declarations() -> None:
    rendered = hooks.render_page((DOCS / "guides/settings.md").read_text(), "guides/settings.md")
    declared = {k: v for k, v in TRAINER_OPTIONS.items() if k not in ("method", "dataset")}
    assert_table_matches(rendered, declared, "trainer")


def test_table_check_catches_a_drifted_declaration() -> None:
    """A table rendered from other declarations than the page's plugin fails the comparison:
    a changed default, a dropped option and a changed help each."""
    options = dict(hooks.builtin("methods")["iprm"].obj.options)
    rendered = _rendered("methods", "iprm")
    changed = {**options, "alpha": dataclasses.replace(options["alpha"], default=0.5)}
    with pytest.raises(AssertionError, match="alpha default"):
        assert_table_matches(rendered, changed, "iprm")
    with pytest.raises(AssertionError, match="table rows"):
        assert_table_matches(rendered, {k: v for k, v in options.items() if k != "mixup"}, "iprm")
    helped = {**options, "ema": dataclasses.replace(options["ema"], help="something else")}
    with pytest.raises(AssertionError, match="ema help"):
        assert_table_matches(rendered, helped, "iprm")


def test_table_shows_extra_option_fields() -> None:
    """A field added to Option later gets a column wherever an option of the table sets it, and
    no column where none does: the search range shows as its one-line text, another field as
    YAML."""

    @dataclasses.dataclass(frozen=True)
    class TaggedOption(Option):
        tag: tuple[float, float] | None = None

    with_search = {"lr": Option(0.1, "learning rate", min=0, min_open=True, search=Search(1e-4, 1.0, log=True)),
                   "depth": Option(2, "layers")}
    table = hooks.options_table(with_search)
    rows = hooks.parse_options_table(table, "lr")
    assert rows["lr"]["`search`"] == "log 0.0001 .. 1"
    assert rows["depth"]["`search`"] == "—"
    assert "`search`" not in hooks.options_table({"depth": Option(2, "layers")})
    tagged = hooks.parse_options_table(hooks.options_table({"x": TaggedOption(1, "x", tag=(1e-4, 1.0))}), "x")
    assert tagged["x"]["`tag`"] == "`[0.0001, 1.0]`"


def test_table_cells_survive_markdown_specials() -> None:
    """Help text with pipes, stars, dollars and angle brackets stays one cell, read back as
    written (a pipe would split the row; a dollar pair would turn into math)."""
    opts = {"x": Option(1, "a | b, 2 * 3 * 4, $HOME and $PATH, <tag>, [link](y), under_score")}
    rows = hooks.parse_options_table(hooks.options_table(opts), "x")
    assert _unescape(rows["x"]["what it does"]) == opts["x"].help
    assert "$" not in hooks.options_table(opts).replace("\\$", "")


def test_unknown_markers_fail_the_build() -> None:
    with pytest.raises(hooks.DocsError, match="no built-in method named 'nosuch'"):
        hooks.render_page("<!-- mmbalance:options method nosuch -->\n", "x.md")
    with pytest.raises(hooks.DocsError, match="unknown marker"):
        hooks.render_page("<!-- mmbalance:optoins method ogm -->\n", "x.md")
    indented = "    <!-- mmbalance:options method NAME -->\n"  # an example inside a code block
    assert hooks.render_page(indented, "x.md") == indented


def test_dataset_facts_show_recipe_layout_and_preparation() -> None:
    """The recipe rows, the layout text and the preparer's text come from the plugin."""
    from mmbalance.prepare import RAW_LAYOUTS

    cls = hooks.builtin("datasets")["cremad"].obj
    facts = hooks.dataset_facts("cremad")
    assert f"| `lr` | `{cls.defaults['lr']}` |" in facts
    assert "| `backbone.audio` | `name` = `resnet18` |" in facts
    assert hooks.escape(cls.layout_help) in facts
    assert hooks.escape(RAW_LAYOUTS["cremad"]) in facts
    assert "No files: the generated data is fixed by the config" in hooks.dataset_facts("synthetic")
    assert "Content hash of the .npz files" in hooks.dataset_facts("features")


# ---- the cost data ------------------------------------------------------------------------------
def test_cost_data_covers_every_benchmarked_method() -> None:
    """docs/data/method_costs.json comes from one run of benchmarks/bench_methods.py with its
    current method list (regenerate with `python benchmarks/method_costs.py`), names the machine,
    and every method page can quote it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_methods
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    data = json.loads((DOCS / "data" / "method_costs.json").read_text())
    assert data["machine"]["cpu"] and data["date"] and data["generated_by"] == "python benchmarks/method_costs.py"
    timed = {(r["method"], json.dumps(r["options"], sort_keys=True)) for r in data["rows"]}
    shipped = set(hooks.builtin("methods"))  # methods that tests register are not shipped
    wanted = {(m, json.dumps(o, sort_keys=True)) for m, o in bench_methods.METHODS[1:] if m in shipped}
    assert wanted <= timed, f"not timed: {sorted(wanted - timed)}; run python benchmarks/method_costs.py"
    for row in data["rows"]:
        assert row["ratio_median"] > 0 and row["ratio_min"] > 0
    for name in METHODS:
        block = hooks.cost_block(name)
        assert data["machine"]["cpu"] in block


def test_cost_rows_come_from_the_benchmark_json() -> None:
    """The script reads pytest-benchmark's extra_info, never typed numbers."""
    spec = importlib.util.spec_from_file_location("method_costs", ROOT / "benchmarks" / "method_costs.py")
    assert spec is not None and spec.loader is not None
    mc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mc)
    report = {"benchmarks": [{
        "params": {"method": "ogm", "options": {}, "dataset": "synthetic"},
        "extra_info": {"method": "OGM-GE", "dataset": "synthetic", "device": "cpu", "batches": 43,
                       "ratio_to_joint": 1.23456, "ratio_to_joint_min": 1.1, "median_epoch_s": 0.5,
                       "baseline_median_epoch_s": 0.4, "estimation_s": 0.0}}]}
    rows = mc.rows_from_benchmark(report, "2026-12-07", 5, [1.0, 2.0])
    assert rows == [{"method": "ogm", "options": {}, "label": "OGM-GE", "dataset": "synthetic", "device": "cpu",
                     "batches_per_epoch": 43, "ratio_median": 1.235, "ratio_min": 1.1, "median_epoch_s": 0.5,
                     "baseline_median_epoch_s": 0.4, "estimation_s": 0.0, "date": "2026-12-07", "rounds": 5,
                     "load_average": [1.0, 2.0]}]
    # --update keeps the rows not re-measured, from the same kind of CPU only
    machine = {"cpu": "AMD EPYC", "cpu_kernels": "AVX512-BF16"}
    other = {**rows[0], "dataset": "avdigits", "ratio_median": 2.0}
    old = {"machine": machine, "rows": [other, {**rows[0], "ratio_median": 9.9}]}
    assert mc.merge_rows(old, rows, machine) == [other, rows[0]]
    assert mc.merge_rows(old, rows, {**machine, "cpu_kernels": "AMX-BF16"}) == rows


# ---- the entry points -------------------------------------------------------------------------------
def test_readme_links_the_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "mkdocs build" in readme and "docs/" in readme


def test_mkdocs_config_runs_the_hook_strictly() -> None:
    cfg = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert cfg["hooks"] == ["docs/hooks.py"] and cfg["strict"] is True and cfg["theme"]["name"] == "material"


@pytest.mark.slow
def test_site_builds_strictly(tmp_path: Path) -> None:
    """What CI runs: the whole site, warnings are errors (broken links, pages outside the nav)."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    page = (tmp_path / "site" / "methods" / "ogm" / "index.html").read_text()
    assert "modulation_starts" in page and "conv4d_only" in page
