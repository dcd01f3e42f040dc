"""The benchmark report in the IPRM paper's table shapes, from a tiny set of real records."""

from __future__ import annotations

import pandas as pd
import pytest

from mmbalance import records
from mmbalance.cli import main
from mmbalance.markup import md_escape
from mmbalance.paper_tables import write_benchmark
from mmbalance.runner import run

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    base = {"records": str(root), "progress": "off", "epochs": 2, "n_train": 240, "n_test": 120, "log_epochs": False}
    cells = [("concat", {}), ("sum", {}), ("concat", {"unimodal_loss": True}), ("iprm", {}),
             ("iprm", {"mixup": "linear"}), ("iprm", {"alpha": 0.3}), ("ogm", {}), ("unimodal", {"modality": "m1"})]
    for method, extra in cells:
        for seed in (0, 1):
            for profile in ({}, {"modalities": ["m1", "m2"]}):
                run(method, "synthetic", {**base, **extra, **profile, "seed": seed})
    return root


def test_report_has_the_paper_tables_and_pictures(records_dir, tmp_path):
    files = write_benchmark(records_dir, tmp_path, "bench", title="Tiny benchmark")
    names = {p.name for p in files}
    assert {"bench.md", "bench.csv", "bench_cost.png", "bench_alpha.png"} <= names
    for p in files:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000
    md = (tmp_path / "bench.md").read_text()
    for heading in ("## Table 1.", "## Table 2.", "## Table 3.", "## Table 4.", "## Statistics", "## Imbalance diagnostics"):
        assert heading in md
    table1 = md.split("## Table 1.")[1].split("## Table 2.")[0]
    assert "Unimodal (m1)" in table1 and "| Sum" in table1 and "OGM-GE" not in table1
    table2 = md.split("## Table 2.")[1].split("## Table 3.")[0]
    assert "OGM-GE" in table2 and "<br>MAP" in table2 and "<br>macro-F1" in table2
    table3 = md.split("## Table 3.")[1].split("## Table 4.")[0]
    assert "IPRM (L-Mixup)" in table3 and "alpha=0.3" not in table3
    table4 = md.split("## Table 4.")[1].split("## Statistics")[0]
    assert "1.00×" in table4 and " MB" in table4 and "resident set" in table4
    assert "Wall time of the records" in md and "Per-dataset method values: none" in md
    assert "![IPRM alpha sensitivity](bench_alpha.png)" in md
    # the CPU kernels that set a bf16 run's rounding are named (AMX and AVX512-BF16 differ)
    kernels = md_escape(records.cpu_kernels_label(records.cpu_kernels()))
    assert f"on cpu ({kernels} kernels)" in md and "amp=auto (fp32)" in md  # what auto resolved to


def test_table_values_are_the_recorded_means(records_dir, tmp_path):
    write_benchmark(records_dir, tmp_path, "bench", pictures=False)
    df = pd.read_csv(tmp_path / "bench.csv")
    sub = df[(df.method == "Sum") & (df.dataset == "synthetic")]["best_val.fused.acc"]
    md = (tmp_path / "bench.md").read_text()
    assert f"{sub.mean():.2f} ± {sub.std():.2f}" in md.split("## Table 1.")[1].split("## Table 2.")[0]


def test_cli_layout_paper(records_dir, tmp_path, capsys):
    assert main(["leaderboard", "--records", str(records_dir), "--out", str(tmp_path), "--name", "b",
                 "--layout", "paper", "--no-pictures"]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "b.md").exists()


def test_busy_time_is_the_union_of_the_run_intervals():
    from mmbalance.paper_tables import busy_seconds

    # two workers overlapping (0-10, 5-12), a pause, a resumed cell (20-25), one inside another
    assert busy_seconds([(5.0, 12.0), (0.0, 10.0), (20.0, 25.0), (21.0, 22.0)]) == 17.0
    assert busy_seconds([]) == 0.0


@pytest.mark.parametrize(("info", "label"), [
    ({"aten": "AVX512", "avx512_bf16": True, "amx_bf16": True, "onednn_max_cpu_isa": None}, "AMX-BF16"),
    ({"aten": "AVX512", "avx512_bf16": True, "amx_bf16": False, "onednn_max_cpu_isa": None}, "AVX512-BF16"),
    ({"aten": "AVX512", "avx512_bf16": True, "amx_bf16": True, "onednn_max_cpu_isa": "AVX512_CORE_BF16"},
     "AVX512-BF16 (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16)"),
    ({"aten": "AVX2", "avx512_bf16": False, "amx_bf16": False, "onednn_max_cpu_isa": None}, "AVX2"),
    ({"aten": "AVX512", "avx512_bf16": True, "amx_bf16": True, "onednn_max_cpu_isa": "AVX512_CORE"},
     "AVX512 (ONEDNN_MAX_CPU_ISA=AVX512_CORE)"),
    ({"aten": "AVX512", "avx512_bf16": True, "amx_bf16": True, "onednn_max_cpu_isa": "avx512_core_amx"},
     "AMX-BF16 (ONEDNN_MAX_CPU_ISA=avx512_core_amx)"),
    ({"aten": "AVX2", "avx512_bf16": True, "amx_bf16": False, "onednn_max_cpu_isa": "AVX2",
      "mkl_enable_instructions": "AVX2"}, "AVX2 (ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2)"),
    (None, None),
])
def test_cpu_kernels_label(info, label):
    assert records.cpu_kernels_label(info) == label


def test_cpu_kernels_without_torch_private_probe(monkeypatch):
    import torch
    monkeypatch.delattr(torch._C._cpu, "_get_cpu_capability")
    info = records.cpu_kernels()
    assert info["amx_bf16"] is None and info["avx512_bf16"] is None
    assert records.cpu_kernels_label(info).split(" (")[0] == torch.backends.cpu.get_cpu_capability()


def test_report_compares_with_the_control_and_shows_the_imbalance_tables(records_dir, tmp_path):
    """The report carries the control comparison (Wilcoxon-Holm, Bayesian with its ROPE), the
    weight-vs-strength table and the missing-modality table, computed from the runs it counts."""
    from mmbalance.imbalance_tables import load_records, missing_modality_robustness

    write_benchmark(records_dir, tmp_path, "bench", pictures=False)
    md = (tmp_path / "bench.md").read_text()
    control = md.split("### Every method against Concat + uni CE, across settings")[1].split("\n## ")[0]
    assert "Holm p" in control and "P(equiv.)" in control and "±1 points" in control
    assert "below 6 the Wilcoxon test cannot reach" in control  # two settings: said, not hidden
    for method in ("| Concat ", "| IPRM ", "| OGM-GE ", "| Sum "):
        assert method in control
    weights = md.split("## What the imbalance diagnostics show")[1].split("## Missing-modality robustness")[0]
    assert "IPRM ω (fusion weight, Eq. 2)" in weights and "OGM-GE gradient coefficient" in weights
    robust = md.split("## Missing-modality robustness")[1]
    table = missing_modality_robustness(load_records(records_dir))
    row = table[(table.method == "Sum") & (table.absent == "m1")].iloc[0]
    sum_line = next(ln for ln in robust.splitlines() if ln.startswith("| Sum "))
    assert f"{row['acc']:.2f}" in sum_line and "no m1" in robust
