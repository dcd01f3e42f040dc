"""Greedy method plugin: the conditional learning speed, the state machine and its window, the
MMTM gates and running averages (fixed and as released) by hand; the staged forward; resume;
evaluation in the normal mode; absent modalities; real data; refusals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from method_checks import assert_resume_identical
from mmbalance.methods.greedy import (
    MMTM,
    Balance,
    Greedy,
    advance,
    bdr,
    running_average,
    speed,
    spread_and_caring,
    sum_sq,
)
from staged_nets import StagedMLP

from mmbalance.diagnostics import coalition_accuracy
from mmbalance.engine.services import _column
from mmbalance.errors import MMBalanceError, UnsupportedError
from mmbalance.registry import BACKBONES, Entry
from mmbalance.runner import make_trainer, run
from mmbalance.trainer import to_device

SMALL = {"epochs": 2, "n_train": 300, "n_test": 100, "dim": 16, "embed_dim": 16, "checkpoint": False,
         "diagnostics": False}
STAGED = {"backbone.m1.name": "staged_mlp", "backbone.m2.name": "staged_mlp"}

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest


@pytest.fixture
def staged_backbone(monkeypatch):
    BACKBONES.load_plugins()

    def build(spec, out_dim, weights=None, **options):
        return StagedMLP(math.prod(spec.shape), out_dim or 16)

    monkeypatch.setitem(BACKBONES._entries, "staged_mlp", Entry("staged_mlp", build, "test staged encoder"))


def setup_trainer(fast, **overrides):
    t = make_trainer("greedy", "synthetic", {**fast, **SMALL, **overrides})
    t.setup()
    t.method.on_fit_start()
    return t


def first_batch(t, split="train"):
    data = getattr(t.splits, split)
    return to_device(next(iter(t.loader(data, train=split == "train", epoch=0))), t.device)


# ---- the conditional learning speed by hand ---------------------------------------------------
def test_speed_is_the_ratio_of_summed_squared_norms():
    """speed = (sum_i ||g_i||^2) / (sum_i ||theta_i||^2) over the group: weights (3, 4) and (1,)
    with gradients (1, 2) and (2,) give (1 + 4 + 4) / (9 + 16 + 1) = 9 / 26. Wrong variants
    caught here: a mean of per-tensor ratios ((5/25 + 4/1) / 2), norms instead of squares
    (sqrt 9 / sqrt 26), the ratio inverted."""
    a = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    b = torch.nn.Parameter(torch.tensor([1.0]))
    a.grad, b.grad = torch.tensor([1.0, 2.0]), torch.tensor([2.0])
    assert speed([a, b]).item() == pytest.approx(9 / 26)
    c = torch.nn.Parameter(torch.tensor([5.0]))  # no gradient (e.g. outside the loss): skipped in G, counted in W
    assert speed([a, b, c]).item() == pytest.approx(9 / 51)
    assert sum_sq([None]).item() == 0.0


def test_bdr_spread_and_caring_by_hand():
    """S_byp = (0.2, 0.01), S_main = (0.02, 0.01): BDR = (1, 0), d = BDR_0 - BDR_1 = 1 > 0, so the
    official rule cares for modality 0 (the one whose gates learn faster). Wrong variants caught
    here: the ratio inverted (BDR = (-1, 0), caring 1), caring = argmin, the sign of d flipped."""
    b = bdr(torch.tensor([0.2, 0.01]), torch.tensor([0.02, 0.01]))
    assert b.tolist() == pytest.approx([1.0, 0.0])
    spread, caring = spread_and_caring(b)
    assert spread.item() == pytest.approx(1.0) and caring.item() == 0
    spread, caring = spread_and_caring(torch.tensor([-0.5, 0.25]))
    assert spread.item() == pytest.approx(0.75) and caring.item() == 1
    spread, caring = spread_and_caring(torch.tensor([0.1, 0.7, -0.2]))  # three modalities: max - min, argmax
    assert spread.item() == pytest.approx(0.9) and caring.item() == 1
    assert torch.isfinite(bdr(torch.zeros(2), torch.zeros(2))).all()  # no gradient yet: finite, not NaN


# ---- the state machine -------------------------------------------------------------------------
def test_window_covers_exactly_the_next_q_steps():
    """A firing regular step opens a window for the next Q steps, then the next step is regular
    and may fire again. Wrong variants caught here: a window of Q - 1 or Q + 1 steps (counter
    compared with > or started at 1), the firing step itself re-balancing, the caring modality
    lost inside the window."""
    q = 3
    s = Balance()
    s = advance(s, unlocked=True, fire=True, caring=1, window=q)  # step t fires
    seen = []
    for _ in range(q + 1):
        seen.append((s.curation, s.caring if s.curation else None))
        s = advance(s, unlocked=True, fire=s.curation is False, caring=0, window=q)
    assert seen == [(True, 1)] * q + [(False, None)]
    assert s == Balance(True, 0, 0)  # the regular step after the window fired again


def test_locked_and_quiet_steps_are_regular():
    """Warm-up (locked) and |d| <= eps give regular steps; a lock also ends a window."""
    assert advance(Balance(), unlocked=False, fire=True, caring=1, window=5) == Balance()
    assert advance(Balance(), unlocked=True, fire=False, caring=1, window=5) == Balance()
    assert advance(Balance(True, 1, 2), unlocked=True, fire=False, caring=0, window=5) == Balance(True, 1, 3)
    assert advance(Balance(True, 1, 4), unlocked=True, fire=False, caring=0, window=5) == Balance(False, 1, 5)


def test_windows_in_a_run_follow_warmup_and_window(fast):
    """In a run with eps = 0 (every regular unlocked step fires), one warm-up epoch and Q = 2:
    epoch 0 is all regular, epoch 1 alternates regular, 2 re-balancing, regular, ... Wrong
    variants caught here: warm-up compared with > (epoch 1 still locked), 1-based epochs, the
    window one step long or late, speeds updated inside a window (the BDR then changes during
    it), the state advanced before the forward that uses it."""
    t = setup_trainer(fast, greedy_epsilon=0.0, greedy_window=2, limit_train_batches=7, n_train=700)
    t.train_epoch(0)
    assert _column(t._step_logs["curation"]) == [0.0] * 7
    t.train_epoch(1)
    cur = _column(t._step_logs["curation"])
    assert cur == [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    bdrs = _column(t._step_logs["bdr_m1"])
    assert len(bdrs) == 3  # speeds measured only in regular steps
    caring = [(a, b) for a, b in zip(_column(t._step_logs["caring_m1"]), _column(t._step_logs["caring_m2"]),
                                      strict=True)]
    assert all(a + b == c for (a, b), c in zip(caring, cur, strict=True))


def test_caring_follows_the_larger_bdr_in_the_run(fast):
    """The modality cared for in a window is the argmax of the BDRs measured at the step that
    opened it. Wrong variant caught here: the other modality (argmin / d's sign flipped)."""
    t = setup_trainer(fast, greedy_epsilon=0.0, greedy_window=1, greedy_warmup_epochs=0, limit_train_batches=6, n_train=700)
    t.train_epoch(0)
    b1, b2 = _column(t._step_logs["bdr_m1"]), _column(t._step_logs["bdr_m2"])
    c1 = _column(t._step_logs["caring_m1"])
    # steps 0, 2, 4 are regular (they measure), steps 1, 3, 5 re-balance the argmax of the step before
    for j, step in enumerate((1, 3, 5)):
        assert c1[step] == (1.0 if b1[j] > b2[j] else 0.0)


def test_speed_groups(fast):
    """Bypass group of m: every MMTM's excitation head m plus the shared squeeze; main group:
    encoder m and head m. Wrong variants caught here: the other modality's excitation head,
    the squeeze left out, the head left out of main."""
    t = setup_trainer(fast)
    m = t.method
    mm = t.model.extra["mmtm"][0]
    (byp1, main1), (byp2, _) = m.speed_groups()
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(byp1) == ids(mm.excite[0].parameters()) | ids(mm.squeeze.parameters())
    assert ids(byp2) == ids(mm.excite[1].parameters()) | ids(mm.squeeze.parameters())
    assert ids(main1) == ids(t.model.encoder_params("m1")) | ids(t.model.uni_head_params("m1"))


# ---- the MMTM layer by hand --------------------------------------------------------------------
def hand_mmtm() -> MMTM:
    """channels (2, 2), ratio 4: squeeze width floor(2 * 4 / 4) = 2; simple weights."""
    mm = MMTM([2, 2], ratio=4.0)
    with torch.no_grad():
        mm.squeeze.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]))
        mm.squeeze.bias.zero_()
        mm.excite[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        mm.excite[0].bias.zero_()
        mm.excite[1].weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        mm.excite[1].bias.zero_()
    return mm


def test_mmtm_gates_by_hand():
    """Squeeze = spatial mean per sample and channel; z = ReLU(W [s_a; s_v]); g = sigmoid.
    A: (1, 2, 2) maps with means (1, 3); V with means (-2, 0.5). z = ReLU((1, 0.5)) = (1, 0.5);
    g_A = sigmoid(1, 0.5), g_V = sigmoid(0.5, 1). Wrong variants caught here: squeeze by max
    or sum, the ReLU left out, a gate from the other modality's head, the gate not broadcast
    over space."""
    mm = hand_mmtm()
    a = torch.tensor([[[0.0, 2.0], [2.0, 0.0]], [[3.0, 3.0], [3.0, 3.0]]]).unsqueeze(0)  # (1, 2, 2, 2)
    v = torch.tensor([[[-2.0, -2.0], [-2.0, -2.0]], [[0.0, 1.0], [0.0, 1.0]]]).unsqueeze(0)
    g = mm.gates([a, v], 1)
    assert g[0][0].tolist() == pytest.approx(torch.sigmoid(torch.tensor([1.0, 0.5])).tolist())
    assert g[1][0].tolist() == pytest.approx(torch.sigmoid(torch.tensor([0.5, 1.0])).tolist())
    out_a, out_v = mm([a, v], 1, update=False)
    assert torch.allclose(out_a, a * g[0].view(1, 2, 1, 1))
    assert torch.allclose(out_v, v * g[1].view(1, 2, 1, 1))
    assert mm.squeeze.out_features == 2  # floor(2 * (C_a + C_v) / ratio)


def test_squeeze_of_folded_video_averages_each_clip_over_its_frames():
    """Folded (B * T, C, h, w) maps: the squeeze of clip b is the mean over its T frames and
    space, and its gate multiplies all of its frames. Wrong variant caught here: a squeeze
    per frame (BalanceBenchmark's unfold with a constant), frames of two clips mixed."""
    mm = hand_mmtm()
    frames = torch.tensor([1.0, 3.0, 10.0, 30.0]).view(4, 1, 1, 1).expand(4, 2, 1, 1).contiguous()  # 2 clips x 2
    other = torch.zeros(2, 2, 1, 1)
    g = mm.gates([frames, other], 2)
    # clip 0: mean 2, clip 1: mean 20 in both channels; z = ReLU((s_a0, s_v1)) = (2, 0) and (20, 0)
    assert g[0][0].tolist() == pytest.approx(torch.sigmoid(torch.tensor([2.0, 0.0])).tolist())
    assert g[0][1].tolist() == pytest.approx(torch.sigmoid(torch.tensor([20.0, 0.0])).tolist())
    out, _ = mm([frames, other], 2, update=False)
    assert torch.allclose(out[1], frames[1] * g[0][0].view(2, 1, 1))  # frame 1 belongs to clip 0


def test_running_averages_fixed_and_as_released():
    """r <- (mean_batch(g) + s r) / (s + 1) after each forward; each modality from its own gate.
    As released (greedy_legacy_running_avg), the second average follows the first modality's
    gate. A re-balancing step replaces the caring gate by its average updated with this step.
    Wrong variants caught here: the official cross-wiring in the fixed mode, the fixed update
    in the legacy mode, an EMA instead of the cumulative mean, the average updated after it
    replaces the gate, a per-sample (not batch-mean) average."""
    assert running_average(torch.tensor([0.5]), torch.tensor(1), torch.tensor([0.8])).item() == pytest.approx(0.65)
    mm, legacy = hand_mmtm(), hand_mmtm()
    x1 = [torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(i)) for i in (1, 2)]
    x2 = [torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(i)) for i in (3, 4)]
    g1, g2 = mm.gates(x1, 3), mm.gates(x2, 3)
    mm(x1, 3)
    legacy(x1, 3, legacy=True)
    assert torch.allclose(mm.avg0, g1[0].mean(0)) and torch.allclose(mm.avg1, g1[1].mean(0))
    assert torch.allclose(legacy.avg1, g1[0].mean(0))  # the release's bug
    out = mm(x2, 3, caring=1)  # second forward re-balances modality 1
    expected1 = (g2[1].mean(0) + g1[1].mean(0)) / 2
    assert torch.allclose(mm.avg1, expected1) and int(mm.steps) == 2
    assert torch.allclose(out[1], x2[1] * expected1.view(1, 2, 1, 1))  # the updated average, every sample
    assert torch.allclose(out[0], x2[0] * g2[0].view(3, 2, 1, 1))  # the other modality keeps its gate
    legacy(x2, 3, caring=1, legacy=True)
    assert torch.allclose(legacy.avg1, (g2[0].mean(0) + g1[0].mean(0)) / 2)


def test_rebalancing_cuts_the_caring_branch_off():
    """In a re-balancing step the caring branch's output does not depend on the other modality
    (nor on its own squeeze); in a regular step it does. Wrong variant caught here: the other
    modality's gate frozen instead."""
    mm = hand_mmtm()
    a = torch.randn(2, 2, 2, 2, requires_grad=True)
    v = torch.randn(2, 2, 2, 2, requires_grad=True)
    out = mm([a, v], 2, caring=0, update=True)
    (gv,) = torch.autograd.grad(out[0].sum(), [v], allow_unused=True)
    assert gv is None or torch.count_nonzero(gv) == 0
    out = mm([a, v], 2, caring=None, update=False)
    (gv,) = torch.autograd.grad(out[0].sum(), [v])
    assert torch.count_nonzero(gv) > 0


# ---- the model's forward -----------------------------------------------------------------------
def test_staged_forward_with_open_gates_is_the_encoders_forward(fast, staged_backbone):
    """With every gate at exactly 1 the MMTMs are identities, so the staged forward must give
    the encoders' own outputs: stages run in order, once each, and pooled as the encoder does.
    MMTMs sit after the last three of the four stages (widths 10, 8, 6). Wrong variants caught
    here: MMTMs after the first stages, a stage run twice or skipped, the pool's head dropped."""
    t = setup_trainer(fast, **STAGED)
    m = t.method
    assert m.fusion_point == "staged" and m.label() == "Greedy"
    mmtms = t.model.extra["mmtm"]
    assert [mm.channels for mm in mmtms] == [(10, 10), (8, 8), (6, 6)]
    with torch.no_grad():
        for mm in mmtms:
            for head in mm.excite:
                head.weight.zero_()
                head.bias.fill_(100.0)  # sigmoid(100) == 1.0 in fp32
    batch = first_batch(t)
    t.model.eval()
    feats = m.gated_features(batch, None, update=False)
    for name in ("m1", "m2"):
        assert torch.equal(feats[name], t.model.encoders[name](batch[name]))
    assert m.record_info()["mmtm_after_stages"] == {"m1": [1, 2, 3], "m2": [1, 2, 3]}


def test_mlp_encoders_use_the_named_fallback(fast):
    """Encoders without stages: one MMTM on the pooled features, labelled as a departure."""
    t = setup_trainer(fast)
    assert t.method.fusion_point == "embedding"
    assert t.method.label() == "Greedy (embedding-level MMTM)"
    assert len(t.model.extra["mmtm"]) == 1 and t.model.extra["mmtm"][0].channels == (16, 16)
    assert t.method.per_modality_source() == "method" and t.model.fusion is None


def test_one_staged_and_one_flat_encoder_fall_back_for_the_whole_run(fast, staged_backbone):
    """AV-digits' case (a CNN and an MLP): the whole run uses the embedding-level MMTM."""
    t = setup_trainer(fast, **{"backbone.m1.name": "staged_mlp"})
    assert t.method.fusion_point == "embedding" and "embedding-level" in t.method.label()


def test_loss_is_the_sum_of_branch_ces(fast):
    """Wrong variant caught here: a CE on the averaged prediction instead of the sum of the
    branch CEs."""
    t = setup_trainer(fast)
    m = t.method
    batch = first_batch(t)
    state = {k: v.clone() for k, v in t.model.state_dict().items()}
    loss = m.training_step(batch, 0)
    t.model.load_state_dict(state)
    logits = t.model.unimodal_logits(m.gated_features(batch, None, update=True))
    expected = sum(F.cross_entropy(z, batch["label"]) for z in logits.values())
    assert torch.equal(loss, expected)


# ---- evaluation ----------------------------------------------------------------------------------
def test_evaluation_is_the_normal_mode(fast):
    """Evaluation inside a window neither re-balances nor moves the running averages (the
    default); greedy_legacy_eval does both, as released. Wrong variants caught here: predict
    using the training flags by default, evaluation forwards updating the averages."""
    t = setup_trainer(fast)
    m = t.method
    batch = first_batch(t, "test")
    t.model.eval()
    base = m.predict(batch)
    m.state = Balance(True, 0, 1)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    pred = m.predict(batch)
    assert torch.equal(pred.fused, base.fused)
    assert all(torch.equal(v, t.model.state_dict()[k]) for k, v in before.items())
    assert torch.allclose(pred.fused, (pred.per_modality["m1"] + pred.per_modality["m2"]) / 2)
    m.legacy_eval = True
    legacy = m.predict(batch)
    assert not torch.equal(legacy.fused, base.fused)
    assert int(t.model.extra["mmtm"][0].steps) == 1


def test_absent_modalities_reach_the_staged_forward(fast, staged_backbone):
    """The Shapley diagnostics blank a modality through model.encoder_inputs, which the staged
    forward uses: a coalition without m2 changes the prediction and raises no error."""
    t = setup_trainer(fast, **STAGED)
    view = t.eval_view()
    full = coalition_accuracy(view, ["m1", "m2"])
    alone = coalition_accuracy(view, ["m1"])
    assert isinstance(full, float) and isinstance(alone, float)
    batch = first_batch(t, "test")
    t.model.eval()
    inputs = t.model.encoder_inputs(batch, drop=["m2"])
    assert torch.count_nonzero(inputs["m2"]) == 0 and torch.equal(inputs["m1"], batch["m1"])


# ---- resume, real data, refusals ---------------------------------------------------------------
def test_resume_is_identical(tmp_path, monkeypatch, staged_backbone):
    """Speeds, the window state and the running averages carry across epochs, so all must be
    checkpointed. Wrong variants caught here: S or the state left out of state_dict, the
    averages as plain attributes (not buffers)."""
    assert_resume_identical("greedy", "synthetic", {**SMALL, **STAGED, "epochs": 3, "checkpoint": True,
                                                    "progress": "off", "device": "cpu", "greedy_epsilon": 0.001,
                                                    "greedy_window": 3}, tmp_path, monkeypatch)


def test_mfeat_trains_well_above_chance(fast, shared_data):
    """Real data: mfeat zer+mor (10 classes, chance 10 %), embedding-level fallback, a few epochs."""
    res = run("greedy", "mfeat", {**fast, "modalities": ["zer", "mor"], "epochs": 6, "diagnostics": False})
    assert res.record["header"]["method_label"] == "Greedy (embedding-level MMTM)"
    acc = res.record["final"]["selection"]["best_val"]["test"]["fused"]["acc"]
    assert acc > 40.0


@pytest.mark.slow
def test_avdigits_noisy_trains_well_above_chance(fast, shared_data):
    """Real data: AV-digits-noisy (10 classes, chance 10 %), embedding-level fallback (SmallCNN
    audio, MLP image), 8 epochs (3 epochs reach only about 28 %: the recipe starts slowly)."""
    res = run("greedy", "avdigits-noisy", {**fast, "epochs": 8, "diagnostics": False})
    assert res.record["header"]["method_label"] == "Greedy (embedding-level MMTM)"
    acc = res.record["final"]["selection"]["best_val"]["test"]["fused"]["acc"]
    assert acc > 50.0


def test_refusals(fast, staged_backbone):
    with pytest.raises(UnsupportedError, match="greedy_fusion_point=staged"):
        setup_trainer(fast, greedy_fusion_point="staged")
    with pytest.raises(UnsupportedError, match="greedy_legacy_running_avg"):
        setup_trainer(fast, greedy_legacy_running_avg=True, n_modalities=3)
    with pytest.raises(MMBalanceError, match="at least 2"):
        make_trainer("greedy", "synthetic", {**fast, "modalities": ["m1"]}).check()


def test_three_modalities_and_labels(fast):
    t = setup_trainer(fast, n_modalities=3, greedy_epsilon=0.0, greedy_warmup_epochs=0, limit_train_batches=3)
    t.train_epoch(0)
    assert t.model.extra["mmtm"][0].channels == (16, 16, 16)
    assert t.method.label() == "Greedy (embedding-level MMTM, eps=0, warm-up=0, M-way extension)"
    assert Greedy({"greedy_mode": "random", "greedy_legacy_running_avg": True}).label() == \
        "Greedy (embedding-level MMTM, random, running-average bug as released)"


def test_random_mode_draws_every_option(fast):
    t = setup_trainer(fast, greedy_mode="random", greedy_warmup_epochs=0, limit_train_batches=12, n_train=1100)
    t.train_epoch(0)
    cur, c1 = _column(t._step_logs["curation"]), _column(t._step_logs["caring_m1"])
    assert cur[0] == 0.0 and 0.0 < sum(cur[1:]) < 11 and 0 < sum(c1) < sum(cur)


@pytest.mark.gpu
def test_cuda_bf16_cell(tmp_path, staged_backbone):
    res = run("greedy", "synthetic", {"epochs": 2, "n_train": 600, "n_test": 200, "device": "cuda", **STAGED,
                                      "records": str(tmp_path), "progress": "off"})
    assert res.record["header"]["amp"] == "bfloat16"
    assert res.record["final"]["selection"]["last"]["test"]["fused"]["acc"] > 20.0
