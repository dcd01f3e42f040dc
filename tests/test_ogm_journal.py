"""The journal OGM of Wei et al. (TPAMI 2024) as settings of ``ogm``: the OGM+ coefficient by
hand, the boosted step, its noise, labels, resume and a real-data run.

Each test that catches a wrong variant of the OGM+ rule names the variant in its docstring.
"""

from __future__ import annotations

import json

import pytest
import torch
from method_checks import assert_resume_identical
from mmbalance.methods.ogm import ogm_plus_coefficients, true_class_scores
from test_ogm import SYN, one_step, step_trainer

from mmbalance.errors import ConfigError
from mmbalance.runner import make_trainer, resolve_config, run

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest


# ---- the coefficient by hand -------------------------------------------------------------------
def test_plus_coefficients_by_hand():
    """Wrong variants caught: the boost on the dominant modality instead of the weaker one; the
    dominant one still damped by 1 - tanh(alpha * rho); the boost hard-coded to 4."""
    # s_a = 3 > s_b = 1.5: b is the weaker one, boosted by 4; a stays at 1 (no damping)
    k_a, k_b, rho = ogm_plus_coefficients(torch.tensor(3.0), torch.tensor(1.5), 4.0)
    torch.testing.assert_close((k_a, k_b, rho), (torch.tensor(1.0), torch.tensor(4.0), torch.tensor(2.0)))
    # s_a = 1 < s_b = 4, boost 2.5: a is boosted
    k_a, k_b, rho = ogm_plus_coefficients(torch.tensor(1.0), torch.tensor(4.0), 2.5)
    torch.testing.assert_close((k_a, k_b, rho), (torch.tensor(2.5), torch.tensor(1.0), torch.tensor(0.25)))
    assert k_a.dtype == torch.float32 and k_a.dim() == 0


def test_plus_tie_follows_the_tie_rule_by_hand():
    """The journal code: ``ratio_1 > 1`` boosts modality 2, else modality 1, so at an exact tie
    the FIRST modality is boosted (the second counts as dominant: ``tie="second"``).

    Wrong variant caught: the tie rule ignored under OGM+ (``>=`` for both tie settings)."""
    k_a, k_b, _ = ogm_plus_coefficients(torch.tensor(2.0), torch.tensor(2.0), 4.0, tie="second")
    assert (k_a.item(), k_b.item()) == (4.0, 1.0)
    k_a, k_b, _ = ogm_plus_coefficients(torch.tensor(2.0), torch.tensor(2.0), 4.0, tie="first")
    assert (k_a.item(), k_b.item()) == (1.0, 4.0)
    with pytest.raises(ValueError, match="tie"):
        ogm_plus_coefficients(torch.tensor(1.0), torch.tensor(2.0), 4.0, tie="both")


# ---- the boosted step --------------------------------------------------------------------------
def test_plus_step_boosts_the_weaker_encoder_only(tmp_path):
    """Wrong variants caught: ``ogm_plus`` never reaching the step (the damping coefficients
    used); ``plus_boost`` ignored; the boost applied to the dominant encoder or to the head."""
    t = step_trainer(tmp_path, ge=False, ogm_plus=True, plus_boost=3.0)
    coeffs, before, after, batch = one_step(t)
    with torch.no_grad():
        s = true_class_scores(t.model.fusion.parts(t.model.encode(batch)), batch["label"])
    weak = "m2" if s["m1"] >= s["m2"] else "m1"
    assert coeffs[weak].item() == 3.0 and all(coeffs[m].item() == 1.0 for m in coeffs if m != weak)
    for name in before:
        if name.startswith(f"encoders.{weak}."):
            torch.testing.assert_close(after[name], before[name] * 3.0)
        else:  # the dominant encoder and the heads are untouched
            assert torch.equal(after[name], before[name]), name


def test_plus_noise_std_is_the_unboosted_gradients(tmp_path):
    """GE under OGM+: the journal code evaluates ``parms.grad.std()`` before reassigning the
    gradient, so the noise has the std of the UNboosted gradient.

    Wrong variant caught: the noise std taken after the boost (4x larger)."""
    t = step_trainer(tmp_path, ogm_plus=True)
    coeffs, before, after, _ = one_step(t)
    checked = 0
    for name in before:
        if name.startswith("encoders.") and before[name].numel() >= 2000:
            k = coeffs[name.split(".")[1]]
            residual = after[name] - k * before[name]
            assert residual.std().item() == pytest.approx(before[name].std().item(), rel=0.1), name
            checked += 1
    assert checked >= 2 and max(c.item() for c in coeffs.values()) == 4.0


@pytest.mark.parametrize(("epoch", "modulated"), [(0, False), (1, True), (2, False)])
def test_plus_respects_the_window(tmp_path, epoch, modulated):
    """Wrong variant caught: OGM+ boosting outside the modulation window (the journal's
    warm-up ``epoch <= 5`` is the window's start); outside it the logged coefficient is 1."""
    t = step_trainer(tmp_path, ge=False, ogm_plus=True, modulation_starts=1, modulation_ends=1)
    t._step_logs = {}
    _, before, after, _ = one_step(t, epoch)
    logged = sorted(t._step_logs[f"coeff_{m}"][-1].item() for m in ("m1", "m2"))
    assert any(not torch.equal(before[n], after[n]) for n in before) == modulated
    assert logged == ([1.0, 4.0] if modulated else [1.0, 1.0])


# ---- labels, defaults, refusals, runs ----------------------------------------------------------
def test_labels_name_the_journal_variant():
    """Wrong variant caught: OGM+ runs under the plain OGM-GE label (a leaderboard row mixing
    two rules)."""
    def label(**o):
        cfg, _, cls = resolve_config("ogm", "synthetic", o)
        return cls(cfg).label()

    assert label(ogm_plus=True) == "OGM-GE (journal OGM+ boost 4)"
    assert label(ogm_plus=True, plus_boost=2.0, ge=False) == "OGM (journal OGM+ boost 2)"
    assert label(tie="second", modulation_starts=6, modulation_ends=60, conv4d_only=True) == \
        "OGM-GE (window 6-60, 4-D kernels only, tie damps second)"
    cfg, _, _ = resolve_config("ogm", "ksounds", {})
    assert (cfg["ogm_plus"], cfg["plus_boost"]) == (False, 4.0)  # the journal default is OGM, not OGM+


def test_bad_boost_refused(fast):
    with pytest.raises(ConfigError, match="plus_boost"):
        make_trainer("ogm", "synthetic", {**fast, **SYN, "ogm_plus": True, "plus_boost": 0.0})


def test_plus_run_logs_the_applied_coefficients(fast):
    res = run("ogm", "synthetic", {**fast, **SYN, "epochs": 1, "ogm_plus": True, "plus_boost": 2.0})
    assert res.record["header"]["method_info"]["coefficient"].startswith("journal OGM+")
    rows = [json.loads(x) for x in (res.run_dir / "diagnostics" / "epoch_0000.jsonl").read_text().splitlines()]
    assert rows
    for r in rows:  # the weaker modality (ratio = s_m1 / s_m2) gets 2, the other 1
        expect = (1.0, 2.0) if r["ratio"] >= 1 else (2.0, 1.0)
        assert (r["coeff_m1"], r["coeff_m2"]) == expect


def test_plus_resume_is_identical(tmp_path, monkeypatch):
    assert_resume_identical("ogm", "synthetic", {**SYN, "progress": "off", "device": "cpu", "ogm_plus": True},
                            tmp_path, monkeypatch)


def test_plus_mfeat_trains_well_above_chance(fast, shared_data):
    """Real data: mfeat zer+mor (10 classes, chance 10 %), a few epochs of journal OGM+."""
    res = run("ogm", "mfeat", {**fast, "modalities": ["zer", "mor"], "epochs": 6, "diagnostics": False,
                               "ogm_plus": True})
    assert res.final["best_val"]["test"]["fused"]["acc"] > 60.0


@pytest.mark.gpu
def test_plus_cell_runs_on_cuda_with_bf16(tmp_path):
    r = run("ogm", "synthetic", {**SYN, "device": "cuda", "progress": "off", "records": str(tmp_path),
                                 "ogm_plus": True})
    assert r.record["header"]["amp"] == "bfloat16"
    assert r.final["last"]["test"]["fused"]["acc"] > 20.0
