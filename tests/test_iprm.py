"""IPRM method plugin: probe pass, equivalence with plain GMM fusion, state, variants, runs."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.fusion import gmm, linear_mix
from mmbalance.probe import ema, kl_to_fused, strength_weights
from mmbalance.runner import make_trainer, run
from mmbalance.trainer import to_device

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SMALL = {
    "device": "cpu",
    "progress": "off",
    "n_train": 240,
    "n_test": 120,
    "dim": 16,
    "embed_dim": 16,
    "batch_size": 32,
    "checkpoint": False,
}


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """These models are tiny: a second OpenMP thread only adds barrier waits, and on a loaded
    2-core machine those waits made each small op ~100x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def setup_trainer(tmp_path, **overrides):
    trainer = make_trainer("iprm", "synthetic", {**SMALL, "records": str(tmp_path / "runs"), **overrides})
    trainer.setup()
    return trainer


def first_batch(trainer):
    """The first (unshuffled) training batch, through the trainer's own loader and collate."""
    return to_device(next(iter(trainer.loader(trainer.splits.train, train=False))), trainer.device)


def params_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_probe_changes_no_parameter_and_builds_no_graph(tmp_path):
    trainer = setup_trainer(tmp_path)
    method, model = trainer.method, trainer.model
    batch = first_batch(trainer)
    feats = model.encode(batch)
    uni = method.unimodal_logits(feats)
    assert feats["m1"].requires_grad  # the inputs do carry a graph ...
    before = params_of(model)
    state_before = (model.fusion.lam.clone(), model.fusion.omega.clone())
    out = method.probe(0, feats["m1"], feats["m2"], uni["m1"], uni["m2"], 0.5)
    for t in out:  # ... the probe's outputs do not
        assert t.dim() == 0 and not t.requires_grad and t.grad_fn is None
    after = params_of(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model.fusion.lam, state_before[0])
    assert torch.equal(model.fusion.omega, state_before[1])
    # and it is Eq. (2) on the fused prediction at the probing weight
    head = model.fusion.heads[0]
    with torch.no_grad():
        q = head(gmm(feats["m1"], feats["m2"], 0.5))
        d1, d2 = kl_to_fused(uni["m1"], q), kl_to_fused(uni["m2"], q)
    torch.testing.assert_close(out[0], strength_weights(d1, d2)[0])
    torch.testing.assert_close(out[1], d1)


def _hand_gmm_step(model, trainer, batch, weight: float) -> None:
    """Plain GMM joint fusion at a constant weight, written out without the plugin.

    ``model`` is a deep copy of the trainer's model taken before the plugin's step; the SGD
    momentum buffers are copied over too (same parameter order), so both steps start equal.
    """
    opt, _ = trainer.default_optimizers(model.parameters())
    opt.load_state_dict(copy.deepcopy(trainer._opt_state_before))
    feats = model.encode(batch)
    y = batch["label"]
    loss = sum(F.cross_entropy(model.uni_heads[m](feats[m]), y) for m in ("m1", "m2"))
    fused = model.fusion.heads[0](gmm(feats["m1"], feats["m2"], weight))
    loss = loss + F.cross_entropy(fused, y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _plugin_step(trainer, batch) -> torch.Tensor:
    trainer._opt_state_before = copy.deepcopy(trainer.optimizer.state_dict())
    trainer.optimizer.zero_grad()
    loss = trainer.method.training_step(batch, 0)
    loss.backward()
    trainer.optimizer.step()
    return loss


def _warm_up(trainer, steps: int = 5) -> None:
    """A few plugin steps, so the encoders and the probe state are no longer at init."""
    loader = trainer.loader(trainer.splits.train, train=True)
    for batch, _ in zip(loader, range(steps), strict=False):
        _plugin_step(trainer, to_device(batch, trainer.device))


def test_step_with_weights_frozen_at_half_equals_plain_gmm_step(tmp_path):
    trainer = setup_trainer(tmp_path, fixed_weight=0.5, alpha=1.0)
    assert trainer.method.label() == "IPRM (alpha=1, fixed w=0.5)"
    _warm_up(trainer)
    batch = first_batch(trainer)
    reference = copy.deepcopy(trainer.model)
    before = params_of(reference)
    _plugin_step(trainer, batch)
    _hand_gmm_step(reference, trainer, batch, 0.5)
    got, want = params_of(trainer.model), params_of(reference)
    assert all(not torch.equal(before[k], want[k]) for k in want)  # every parameter moved
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5, msg=k)
    assert trainer.model.fusion.lam.tolist() == [0.5]
    assert trainer.model.fusion.omega.tolist() == [0.5]


def test_default_step_rebalances_at_the_probe_weight(tmp_path):
    """The rebalanced pass uses omega_t from the probe at lambda_t, not lambda_t itself."""
    trainer = setup_trainer(tmp_path)
    _warm_up(trainer)
    fusion = trainer.model.fusion
    lam_t = ema(fusion.lam[0], fusion.omega[0], 0.8)
    batch = first_batch(trainer)
    reference = copy.deepcopy(trainer.model)
    with torch.no_grad():
        feats = reference.encode(batch)
        uni = {m: reference.uni_heads[m](feats[m]) for m in ("m1", "m2")}
        q = reference.fusion.heads[0](gmm(feats["m1"], feats["m2"], lam_t))
        w_t = strength_weights(kl_to_fused(uni["m1"], q), kl_to_fused(uni["m2"], q))[0]
    assert abs(w_t.item() - 0.5) > 0.01  # the probe does rebalance here
    _plugin_step(trainer, batch)
    torch.testing.assert_close(fusion.lam[0], lam_t)
    torch.testing.assert_close(fusion.omega[0], w_t)
    _hand_gmm_step(reference, trainer, batch, float(w_t))
    for k, v in params_of(reference).items():
        torch.testing.assert_close(params_of(trainer.model)[k], v, atol=1e-6, rtol=1e-5, msg=k)


def test_state_follows_eq4_across_steps_and_round_trips(tmp_path):
    trainer = setup_trainer(tmp_path, alpha=0.6)
    method, fusion = trainer.method, trainer.model.fusion
    loader = trainer.loader(trainer.splits.train, train=True)
    lam_prev, omega_prev = torch.tensor(0.5), torch.tensor(0.5)
    for batch, _ in zip(loader, range(4), strict=False):
        _plugin_step(trainer, to_device(batch, trainer.device))
        torch.testing.assert_close(fusion.lam[0], ema(lam_prev, omega_prev, 0.6))
        lam_prev, omega_prev = fusion.lam[0].clone(), fusion.omega[0].clone()
    state = method.state_dict()
    assert state["pairs"] == ["m1+m2"]
    path = tmp_path / "state.pt"
    torch.save(state, path)

    fresh = setup_trainer(tmp_path, alpha=0.6)
    assert fresh.model.fusion.lam.tolist() == [0.5]
    fresh.method.load_state_dict(torch.load(path))
    torch.testing.assert_close(fresh.model.fusion.lam, fusion.lam)
    torch.testing.assert_close(fresh.model.fusion.omega, fusion.omega)

    # a state handed over before the model exists is applied at fit start
    early = make_trainer("iprm", "synthetic", {**SMALL, "alpha": 0.6})
    early.method.load_state_dict(state)
    early.setup()
    early.method.on_fit_start()
    torch.testing.assert_close(early.model.fusion.lam, fusion.lam)

    other = setup_trainer(tmp_path, n_modalities=3)
    with pytest.raises(ConfigError, match="modality pairs"):
        other.method.load_state_dict(state)


def test_predict_official_sum_and_fused_only(tmp_path):
    for rule in ("sum", "fused_only"):
        trainer = setup_trainer(tmp_path, inference=rule)
        model = trainer.model
        model.fusion.lam.fill_(0.3)
        model.eval()
        batch = first_batch(trainer)
        pred = trainer.method.predict(batch)
        with torch.no_grad():
            feats = model.encode(batch)
            uni = {m: model.uni_heads[m](feats[m]) for m in ("m1", "m2")}
            fused = model.fusion.heads[0](gmm(feats["m1"], feats["m2"], 0.3))
        want = fused + uni["m1"] + uni["m2"] if rule == "sum" else fused
        torch.testing.assert_close(pred.fused, want)
        torch.testing.assert_close(pred.per_modality["m2"], uni["m2"])
        assert ("official" in trainer.method.record_info()["inference_rule"]) == (rule == "sum")


def test_unequal_widths_and_bad_options_are_refused(tmp_path):
    trainer = make_trainer("iprm", "synthetic", {**SMALL})
    with pytest.raises(ConfigError, match="same width"):
        trainer.method.build_fusion({"m1": 16, "m2": 32}, 3)
    with pytest.raises(UnsupportedError, match="three modalities"):
        setup_trainer(tmp_path, replicate_official_head_bug=True)
    with pytest.raises(ConfigError, match="alpha"):
        make_trainer("iprm", "synthetic", {**SMALL, "alpha": 1.5})


@pytest.mark.parametrize(
    ("overrides", "label"),
    [
        ({}, "IPRM"),
        ({"mixup": "linear"}, "IPRM (L-Mixup)"),
        ({"ema": False}, "IPRM (w/o EMA)"),
        ({"alpha": 0.0}, "IPRM (w/o EMA)"),
        ({"probe_lambda": "fixed"}, "IPRM (probe at 0.5)"),
        ({"one_pass": True}, "IPRM (One-Pass)"),
        ({"unpaired": True}, "IPRM (unpaired)"),
        ({"alpha": 0.5}, "IPRM (alpha=0.5)"),
        ({"gmm_safe": True}, "IPRM (safe GMM)"),
        ({"pair_mode": "single_cls"}, "IPRM (Single-CLS)"),
    ],
)
def test_variant_labels(overrides, label):
    assert make_trainer("iprm", "synthetic", {**SMALL, **overrides}).method.label() == label


@pytest.mark.parametrize(
    "overrides",
    [{"mixup": "linear"}, {"ema": False}, {"probe_lambda": "fixed"}, {"one_pass": True},
     {"unpaired": True}, {"gmm_safe": True}, {"unpaired": True, "one_pass": True}],
)
def test_variant_steps_are_finite_and_advance_state(tmp_path, overrides):
    trainer = setup_trainer(tmp_path, **overrides)
    batch = first_batch(trainer)
    for _ in range(2):
        loss = _plugin_step(trainer, batch)
        assert torch.isfinite(loss)
    lam, omega = trainer.model.fusion.lam[0].item(), trainer.model.fusion.omega[0].item()
    assert 0.0 <= lam <= 1.0 and 0.0 <= omega <= 1.0
    if overrides.get("probe_lambda") == "fixed":
        assert lam == 0.5
    if "ema" in overrides:  # alpha = 0: the probe of step 2 used omega of step 1
        assert lam != 0.5


def test_one_pass_trains_the_fused_head_at_the_ema_weight(tmp_path):
    trainer = setup_trainer(tmp_path, one_pass=True)
    batch = first_batch(trainer)
    reference = copy.deepcopy(trainer.model)
    _plugin_step(trainer, batch)
    _hand_gmm_step(reference, trainer, batch, 0.5)  # step 1: lambda_1 = 0.5
    for k, v in params_of(reference).items():
        torch.testing.assert_close(params_of(trainer.model)[k], v, atol=1e-6, rtol=1e-5, msg=k)
    assert trainer.model.fusion.omega[0].item() != 0.5  # omega_1 still measured


def test_linear_mixup_variant_uses_linear_mix(tmp_path):
    trainer = setup_trainer(tmp_path, mixup="linear")
    model = trainer.model
    model.fusion.lam.fill_(0.7)
    batch = first_batch(trainer)
    pred = trainer.method.predict(batch)
    with torch.no_grad():
        feats = model.encode(batch)
        fused = model.fusion.heads[0](linear_mix(feats["m1"], feats["m2"], 0.7))
        want = fused + model.uni_heads["m1"](feats["m1"]) + model.uni_heads["m2"](feats["m2"])
    torch.testing.assert_close(pred.fused, want)


def test_three_modalities_tri_cls_structure(tmp_path):
    trainer = setup_trainer(tmp_path, n_modalities=3, fixed_weight=None)
    fusion = trainer.model.fusion
    assert [fusion.pair_name(k) for k in range(3)] == ["m1+m2", "m1+m3", "m2+m3"]
    assert len(fusion.heads) == 3
    batch = first_batch(trainer)
    _plugin_step(trainer, batch)
    assert all(v != 0.5 for v in fusion.omega.tolist())  # every pair probed
    fusion.lam.copy_(torch.tensor([0.2, 0.4, 0.9]))
    pred = trainer.method.predict(batch)
    with torch.no_grad():
        f = trainer.model.encode(batch)
        uni = sum(trainer.model.uni_heads[m](f[m]) for m in ("m1", "m2", "m3"))
        pairs = [("m1", "m2", 0.2), ("m1", "m3", 0.4), ("m2", "m3", 0.9)]
        fused = torch.stack([fusion.heads[k](gmm(f[a], f[b], w)) for k, (a, b, w) in enumerate(pairs)]).mean(0)
    torch.testing.assert_close(pred.fused, uni + fused)


def test_three_modalities_single_cls_draws_one_pair_reproducibly(tmp_path):
    trainer = setup_trainer(tmp_path, n_modalities=3, pair_mode="single_cls")
    fusion = trainer.model.fusion
    assert len(fusion.heads) == 1
    torch.manual_seed(3)
    draws = [trainer.method._pairs_this_step()[0] for _ in range(60)]
    torch.manual_seed(3)
    assert draws == [trainer.method._pairs_this_step()[0] for _ in range(60)]
    assert len(set(draws)) == 6  # all ordered pairs occur
    batch = first_batch(trainer)
    torch.manual_seed(0)
    (k, first, second), = trainer.method._pairs_this_step()
    torch.manual_seed(0)
    _plugin_step(trainer, batch)
    moved = [i for i, v in enumerate(fusion.omega.tolist()) if v != 0.5]
    assert moved == [k]  # only the drawn pair's state advanced


def test_official_head_bug_takes_third_logits_from_second_head(tmp_path):
    trainer = setup_trainer(tmp_path, n_modalities=3, replicate_official_head_bug=True)
    model = trainer.model
    batch = first_batch(trainer)
    pred = trainer.method.predict(batch)
    with torch.no_grad():
        f = model.encode(batch)
    torch.testing.assert_close(pred.per_modality["m3"], model.uni_heads["m2"](f["m3"]))
    assert trainer.method.label() == "IPRM (official head bug)"


def test_run_on_synthetic_learns_well_above_chance(tmp_path):
    result = run(
        "iprm",
        "synthetic",
        overrides={**SMALL, "n_train": 600, "epochs": 3, "records": str(tmp_path / "r")},
    )
    last = result.record["final"]["selection"]["last"]["test"]
    assert last["fused"]["acc"] > 50.0  # 10 classes: chance is 10 %
    diag = result.record["epochs"][-1]["diagnostics"]
    assert {"omega_m1", "lambda_m1", "kl_m1", "omega_m2", "lambda_m2", "kl_m2"} <= set(diag)
    assert diag["omega_m1"] + diag["omega_m2"] == pytest.approx(1.0, abs=1e-6)
    assert result.record["header"]["method_label"] == "IPRM"


@pytest.mark.parametrize("mode", ["tri_cls", "single_cls"])
def test_three_modality_runs(tmp_path, mode):
    result = run(
        "iprm",
        "synthetic",
        overrides={**SMALL, "n_modalities": 3, "pair_mode": mode, "epochs": 3, "n_train": 480,
                   "records": str(tmp_path / "r")},
    )
    last = result.record["final"]["selection"]["last"]["test"]
    assert last["fused"]["acc"] > 35.0  # chance: 10 %
    assert {"m1", "m2", "m3"} <= set(last)
    diag = result.record["epochs"][-1]["diagnostics"]
    assert "omega_m1@m1+m2" in diag and "kl_m3@m2+m3" in diag


def test_resume_restores_probe_state(tmp_path):
    overrides = {**SMALL, "epochs": 2, "checkpoint": True}
    full = run("iprm", "synthetic", overrides={**overrides, "records": str(tmp_path / "a")})

    killed = make_trainer("iprm", "synthetic", {**overrides, "records": str(tmp_path / "b")})
    real_epoch = killed.train_epoch

    def die_in_epoch_1(epoch: int):
        if epoch == 1:
            raise KeyboardInterrupt  # the process is killed after epoch 0's checkpoint
        return real_epoch(epoch)

    killed.train_epoch = die_in_epoch_1
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    assert killed.model.fusion.lam.item() != 0.5

    resumed = make_trainer("iprm", "synthetic", {**overrides, "records": str(tmp_path / "b")})
    record = resumed.fit()
    assert record["header"].get("resumed_from_epoch") == 1
    a, b = full.record["epochs"][-1], record["epochs"][-1]
    for key in ("lambda_m1", "omega_m1", "kl_m2"):
        assert b["diagnostics"][key] == pytest.approx(a["diagnostics"][key], abs=1e-6)
    assert b["test"]["fused"]["acc"] == pytest.approx(a["test"]["fused"]["acc"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("overrides", [{}, {"n_modalities": 3}, {"n_modalities": 3, "pair_mode": "single_cls"}])
def test_cuda_bf16_step_never_syncs_with_the_host(tmp_path, overrides):
    """Probe, rebalance, state update and logging stay on the device: with CUDA's sync debug
    mode set to "error", any .item()/bool() on a device tensor inside the step would raise."""
    trainer = setup_trainer(tmp_path, device="cuda", amp="bf16", **overrides)
    batch = first_batch(trainer)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with trainer.autocast():
            loss = trainer.method.training_step(batch, 0)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
    fusion = trainer.model.fusion
    assert fusion.lam.device.type == "cuda" and fusion.lam.dtype == torch.float32
    assert all(0.0 < w < 1.0 for w in fusion.omega.tolist())
