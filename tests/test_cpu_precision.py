"""amp=auto on a CPU: bf16 only with bf16 hardware, fp32 otherwise, and one run in one precision.

A CPU without AMX-BF16 or AVX512-BF16 emulates bf16 at 5-10x the cost of fp32
(benchmarks/cpu_precision.py), so ``auto`` trains there in fp32 and a forced ``bf16`` warns.
The CPU kinds are exercised in-process through the kernels dict, and for real in a subprocess
with oneDNN and ATen capped to AVX2 (the caps are read once, at start-up).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from mmbalance import records
from mmbalance.engine.runtime import EmulatedBf16Warning, resolve_amp
from mmbalance.records import bf16_native
from mmbalance.report_runs import collect_runs, runs_frame
from mmbalance.runner import make_trainer, run

CPU = torch.device("cpu")
AVX512_BF16 = {"aten": "AVX512", "avx512_bf16": True, "amx_bf16": False, "onednn_max_cpu_isa": None,
               "aten_cpu_capability": None}
AVX2_ONLY = {"aten": "AVX2", "avx512_bf16": False, "amx_bf16": False, "onednn_max_cpu_isa": None,
             "aten_cpu_capability": None}
QUICK = {"progress": "off", "log_epochs": False, "epochs": 1, "batch_size": 32, "diagnostics": False,
         "n_train": 96, "n_test": 48, "device": "cpu"}


def test_bf16_hardware_is_read_from_the_cpu_and_its_caps(monkeypatch) -> None:
    """Wrong variants caught: trusting oneDNN's own answer alone (it says yes on AVX-512
    without BF16), ignoring ONEDNN_MAX_CPU_ISA or ATEN_CPU_CAPABILITY caps."""
    monkeypatch.setattr(records, "_onednn_bf16_supported", lambda: True)
    assert bf16_native(AVX512_BF16)
    assert bf16_native({**AVX512_BF16, "avx512_bf16": False, "amx_bf16": True})
    assert not bf16_native(AVX2_ONLY)
    assert not bf16_native({**AVX512_BF16, "avx512_bf16": False})  # AVX-512 without BF16
    assert not bf16_native({**AVX512_BF16, "onednn_max_cpu_isa": "AVX2"})
    assert not bf16_native({**AVX512_BF16, "onednn_max_cpu_isa": "AVX512_CORE"})
    assert bf16_native({**AVX512_BF16, "onednn_max_cpu_isa": "AVX512_CORE_BF16"})
    assert bf16_native({**AVX512_BF16, "onednn_max_cpu_isa": "ALL"})
    assert not bf16_native({**AVX512_BF16, "aten_cpu_capability": "avx2"})
    monkeypatch.setattr(records, "_onednn_bf16_supported", lambda: False)
    assert not bf16_native(AVX512_BF16)


def test_auto_follows_the_hardware_and_forced_bf16_warns_where_emulated() -> None:
    """Wrong variants caught: auto = fp32 on every CPU (the earlier rule), auto = bf16 on every
    CPU, bf16 forced silently on an emulating CPU, bf16 refused there."""
    native = {**AVX512_BF16, "bf16_native": True}
    emulating = {**AVX2_ONLY, "bf16_native": False}
    assert resolve_amp("auto", CPU, native) is torch.bfloat16
    assert resolve_amp("auto", CPU, emulating) is None
    assert resolve_amp("none", CPU, native) is None
    assert resolve_amp("auto", torch.device("cuda"), emulating) is torch.bfloat16
    assert resolve_amp("none", torch.device("cuda"), native) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_amp("bf16", CPU, native) is torch.bfloat16  # no warning where native
    with pytest.warns(EmulatedBf16Warning, match=r"without bf16 hardware \(AVX2\).*slower than fp32.*amp=auto"):
        assert resolve_amp("bf16", CPU, emulating) is torch.bfloat16


def _run_capped(tmp_path, amp: str) -> tuple[dict, str]:
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mmbalance.cli", "run", "--method", "concat", "--dataset", "synthetic",
           "--device", "cpu", "--epochs", "1", "--records", str(tmp_path), "--set", f"amp={amp}",
           "--set", "n_train=96", "--set", "n_test=48", "--set", "progress=off", "--set", "diagnostics=false"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir() and f"amp{amp}" in json.dumps(
        records.load_record(p)["header"]["config"]).replace('"amp": "', "amp").replace('"', "")]
    return records.load_record(folder)["header"], proc.stderr


def test_a_cpu_capped_to_avx2_trains_auto_in_fp32_and_warns_on_bf16(tmp_path) -> None:
    """For real: oneDNN and ATen capped to AVX2 in a fresh process."""
    header, err = _run_capped(tmp_path, "auto")
    assert header["cpu_kernels"]["bf16_native"] is False and header["amp"] == "none"
    assert "EmulatedBf16Warning" not in err
    header, err = _run_capped(tmp_path, "bf16")
    assert header["amp"] == "bfloat16" and "without bf16 hardware" in err


def test_this_cpu_records_what_auto_resolved_to(tmp_path) -> None:
    result = run("concat", "synthetic", {**QUICK, "records": str(tmp_path), "amp": "auto"})
    header = records.load_record(result.run_dir)["header"]
    expected = "bfloat16" if records.cpu_kernels()["bf16_native"] else "none"
    assert header["amp"] == expected and header["cpu_kernels"]["bf16_native"] == (expected == "bfloat16")


def test_a_checkpoint_is_not_continued_in_the_other_precision(tmp_path) -> None:
    """A run started in bf16 on a CPU with bf16 hardware, resumed where auto means fp32 (or
    back), would mix two precisions in one record: refused, naming both and the fix.
    Wrong variants caught: no check; a checkpoint without the key (older code) read as
    matching whatever this process resolves to."""
    cfg = {**QUICK, "epochs": 2, "records": str(tmp_path), "amp": "auto"}
    first = make_trainer("concat", "synthetic", cfg)
    first.setup()
    first.train_epoch(0)
    first.history = [{"epoch": 0}]
    records.ensure_dir(first.run_dir)
    first._save_checkpoint(0)
    path = first.run_dir / records.CHECKPOINT
    state = torch.load(path, weights_only=True)
    mine = state["amp"]
    other = "none" if mine == "bfloat16" else "bfloat16"
    state["amp"] = other
    torch.save(state, path)
    again = make_trainer("concat", "synthetic", cfg)
    again.setup()
    word = {"none": "fp32", "bfloat16": "bf16"}
    with pytest.raises(records.RecordError, match=rf"trained in {word[other]}.*means {word[mine]}.*--fresh"):
        again.restore_checkpoint()
    # a checkpoint from before the key existed trained in fp32 on a CPU
    del state["amp"]
    torch.save(state, path)
    if mine == "bfloat16":
        with pytest.raises(records.RecordError, match="trained in fp32"):
            again.restore_checkpoint()
    else:
        assert again.restore_checkpoint() == 1


def test_the_leaderboard_keeps_two_resolved_precisions_apart(tmp_path) -> None:
    """Two machines ran the same amp=auto cell, one in bf16 and one in fp32: two rows, each
    labelled with its precision, and not a duplicate of each other."""
    root = tmp_path / "runs"
    result = run("concat", "synthetic", {**QUICK, "records": str(root), "amp": "auto"})
    copy = root / "other-machine" / result.run_dir.name
    import shutil

    shutil.copytree(result.run_dir, copy)
    rows = records.load_record(copy)
    header = rows["header"]
    header["amp"] = "none" if header["amp"] == "bfloat16" else "bfloat16"
    lines = (copy / records.RECORD).read_text().splitlines()
    first = json.loads(lines[0])
    first["amp"] = header["amp"]
    lines[0] = json.dumps(first)
    (copy / records.RECORD).write_text("\n".join(lines) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DuplicateRunWarning
        loaded = collect_runs(root)
    df = runs_frame(loaded[0])
    assert sorted(df["method"]) == ["Concat (precision=bf16)", "Concat (precision=fp32)"]
