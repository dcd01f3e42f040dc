"""MMCosine method plugin: the cosine logits by hand, the step, the two evaluations, runs.

Each test that catches a wrong variant of the rule names the variant in its docstring.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from method_checks import assert_resume_identical
from mmbalance.methods.mmcosine import CosineConcatHead, cosine_logits

from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.runner import make_trainer, resolve_config, run
from mmbalance.trainer import to_device

SYN = {"epochs": 2, "n_train": 300, "n_test": 100}
R2 = 1 / math.sqrt(2.0)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest


def hand_head(scale: float = 10.0) -> CosineConcatHead:
    """Two modalities of width 2: block a = [[1, 1], [0, 2]], block b = [[0, 1], [-1, 0]], a bias
    that must not matter."""
    head = CosineConcatHead({"a": 2, "b": 2}, 2, scale)
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 2.0, -1.0, 0.0]]))
        head.fc.bias.copy_(torch.tensor([5.0, -5.0]))
    return head


# ---- mathematics by hand -----------------------------------------------------------------------
def test_cosine_logits_by_hand():
    # z = (3, 4): cos with (1, 0) = 0.6, with (0, 2) = 0.8; times s = 10
    out = cosine_logits(torch.tensor([[3.0, 4.0], [0.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]]), 10.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[6.0, 8.0], [0.0, 0.0]]))  # a zero row adds 0, not NaN


def test_head_logits_by_hand():
    """o = s cos(z_a, W_a[c]) + s cos(z_b, W_b[c]), bias unused.

    Wrong variants caught: the weight block normalised along the feature axis (columns, i.e.
    ``F.normalize(W_m, dim=0)``) instead of per class row (the official normalises ``W_m^T``
    along dim 0); the bias added; s / M per modality (the mean of the cosines); ``scaling``
    hard-coded."""
    head = hand_head(10.0)
    feats = {"a": torch.tensor([[3.0, 4.0]]), "b": torch.tensor([[1.0, 0.0]])}
    # a: cos((0.6, 0.8), (1, 1)/sqrt 2) = 1.4/sqrt 2 = 0.9899494937, cos(., (0, 1)) = 0.8
    # b: cos((1, 0), (0, 1)) = 0, cos((1, 0), (-1, 0)) = -1
    parts = head.parts(feats)
    torch.testing.assert_close(parts["a"], torch.tensor([[10 * 1.4 * R2, 8.0]]))
    torch.testing.assert_close(parts["b"], torch.tensor([[0.0, -10.0]]))
    torch.testing.assert_close(head(feats), torch.tensor([[10 * 1.4 * R2, -2.0]]))
    torch.testing.assert_close(hand_head(2.0)(feats), torch.tensor([[2 * 1.4 * R2, -0.4]]))
    # the raw head (official evaluation): W [z_a; z_b] + b = (3 + 4 + 0 + 5, 8 - 1 - 5)
    torch.testing.assert_close(head.raw(feats), torch.tensor([[12.0, 2.0]]))


def test_logits_ignore_feature_and_weight_norms():
    """Wrong variants caught: only the features normalised (a longer class row then wins), or
    only the weights (a longer feature then dominates the sum)."""
    head = hand_head()
    feats = {"a": torch.tensor([[3.0, 4.0], [1.0, -2.0]]), "b": torch.tensor([[1.0, 0.0], [0.5, 0.5]])}
    before = head(feats)
    with torch.no_grad():
        head.fc.weight[0].mul_(3.0)  # one class row of both blocks 3 x longer
    scaled = {"a": feats["a"] * 7.0, "b": feats["b"] * 0.01}
    torch.testing.assert_close(head(scaled), before)


def test_three_modalities_sum_with_the_same_scale():
    """Logits in [-M s, M s]: each modality keeps the full s (the paper's form)."""
    head = CosineConcatHead({"a": 1, "b": 1, "c": 1}, 2, 3.0)
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, 1.0]]))
    out = head({"a": torch.tensor([[2.0]]), "b": torch.tensor([[5.0]]), "c": torch.tensor([[1.0]])})
    torch.testing.assert_close(out, torch.tensor([[9.0, -3.0]]))


# ---- the step and the evaluation ---------------------------------------------------------------
def trainer(tmp_path, **overrides):
    t = make_trainer("mmcosine", "synthetic", {**SYN, "records": str(tmp_path / "runs"), "progress": "off",
                                               "device": "cpu", **overrides})
    t.setup()
    t.method.on_fit_start()
    return t


def test_step_loss_and_gradients_by_hand(tmp_path):
    """Wrong variants caught: the plain linear logits trained (the method never reaching the
    step); the unimodal CEs added; the logged cosine not the true class's.
    The bias gets no gradient (it is not in the logits)."""
    t = trainer(tmp_path, scaling=4.0)
    t._step_logs = {}
    model = t.model
    model.train()
    batch = to_device(next(iter(t.loader(t.splits.train, train=False))), t.device)
    loss = t.method.training_step(batch, 0)
    fc = model.fusion.fc
    y = batch["label"]
    with torch.no_grad():
        feats = model.encode(batch)
        d1 = feats["m1"].shape[1]
        c1 = F.normalize(feats["m1"], dim=1) @ F.normalize(fc.weight[:, :d1], dim=1).t()
        c2 = F.normalize(feats["m2"], dim=1) @ F.normalize(fc.weight[:, d1:], dim=1).t()
        expected = F.cross_entropy(4.0 * (c1 + c2), y)
    torch.testing.assert_close(loss, expected)
    rows = torch.arange(len(y))
    torch.testing.assert_close(t._step_logs["cos_m1"][-1], c1[rows, y].mean())
    torch.testing.assert_close(t._step_logs["cos_m2"][-1], c2[rows, y].mean())
    loss.backward()
    assert fc.bias.grad is None and fc.weight.grad is not None
    assert all(p.grad is None for p in model.uni_heads.parameters())


@pytest.mark.parametrize("rule", ["cosine", "raw_head"])
def test_predict_by_rule(tmp_path, rule):
    """Wrong variants caught: the raw head used by default; ``eval_logits`` never reaching
    predict; per-modality logits from the raw head's b/2 parts instead of the cosine parts."""
    t = trainer(tmp_path, eval_logits=rule)
    t.model.eval()
    with torch.no_grad():
        t.model.fusion.fc.bias.copy_(torch.linspace(-2.0, 2.0, t.model.fusion.fc.bias.numel()))
    batch = to_device(next(iter(t.loader(t.splits.test, train=False))), t.device)
    head = t.model.fusion
    with torch.no_grad():
        pred = t.method.predict(batch)
        feats = t.model.encode(batch)
        cos = head(feats)
        parts = head.parts(feats)
        raw = head.fc(torch.cat([feats["m1"], feats["m2"]], 1))
    assert not torch.allclose(cos, raw)
    for m in ("m1", "m2"):
        torch.testing.assert_close(pred.per_modality[m], parts[m])
    if rule == "cosine":
        torch.testing.assert_close(pred.fused, cos)
        assert set(pred.per_modality) == {"m1", "m2"}
    else:
        torch.testing.assert_close(pred.fused, raw)
        torch.testing.assert_close(pred.per_modality["fused_cosine"], cos)


def test_raw_head_changes_only_the_evaluation(fast):
    """Both evaluations of one training: the raw-head run records the cosine score as
    ``fused_cosine``, equal to the cosine run's fused score at every epoch.

    Wrong variant caught: ``eval_logits=raw_head`` also changing the training step."""
    cos = run("mmcosine", "synthetic", {**fast, **SYN, "records": fast["records"] + "/c"}).record
    raw = run("mmcosine", "synthetic", {**fast, **SYN, "eval_logits": "raw_head",
                                        "records": fast["records"] + "/r"}).record
    assert raw["header"]["method_label"] == "MMCosine (raw-head evaluation)"
    for a, b in zip(cos["epochs"], raw["epochs"], strict=True):
        assert a["train_loss"] == b["train_loss"]
        assert a["test"]["fused"] == b["test"]["fused_cosine"]
        assert a["test"]["m1"] == b["test"]["m1"]


def test_bf16_autocast_step(tmp_path):
    t = trainer(tmp_path, amp="bf16")
    batch = to_device(next(iter(t.loader(t.splits.train, train=False))), t.device)
    with t.autocast():
        loss = t.method.training_step(batch, 0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# ---- runs --------------------------------------------------------------------------------------
def test_resume_is_identical(tmp_path, monkeypatch):
    assert_resume_identical("mmcosine", "synthetic", {**SYN, "epochs": 3, "progress": "off", "device": "cpu"},
                            tmp_path, monkeypatch)


def test_mfeat_trains_well_above_chance(fast, shared_data):
    """Real data: mfeat zer+mor (10 classes, chance 10 %), a few epochs."""
    res = run("mmcosine", "mfeat", {**fast, "modalities": ["zer", "mor"], "epochs": 6})
    assert res.final["best_val"]["test"]["fused"]["acc"] > 60.0
    assert {"cos_zer", "cos_mor", "cos_spread"} <= set(res.record["epochs"][-1]["diagnostics"])


def test_avdigits_and_three_modalities_run(fast, shared_data):
    rec = run("mmcosine", "avdigits", {**fast, "epochs": 1, "limit_train_batches": 4, "limit_eval_batches": 2}).record
    assert {"cos_audio", "cos_image"} <= set(rec["epochs"][0]["diagnostics"])
    rec = run("mmcosine", "synthetic", {**fast, **SYN, "epochs": 1, "n_modalities": 3}).record
    assert {"m1", "m2", "m3"} <= set(rec["epochs"][0]["test"])


# ---- labels, refusals --------------------------------------------------------------------------
def test_labels_and_defaults():
    def label(**o):
        cfg, _, cls = resolve_config("mmcosine", "synthetic", o)
        return cls(cfg).label()

    assert label() == "MMCosine"
    assert label(scaling=15.0, eval_logits="raw_head") == "MMCosine (s=15, raw-head evaluation)"
    cfg, _, _ = resolve_config("mmcosine", "cremad", {})
    assert cfg["scaling"] == 10.0


def test_refusals(fast):
    with pytest.raises(UnsupportedError, match=r"Method 'mmcosine'.*at least 2"):
        make_trainer("mmcosine", "synthetic", {**fast, **SYN, "n_modalities": 1}).check()
    for key, value in (("scaling", 0.0), ("eval_logits", "raw")):
        with pytest.raises(ConfigError, match=key):
            make_trainer("mmcosine", "synthetic", {**fast, **SYN, key: value})


@pytest.mark.gpu
@pytest.mark.parametrize("rule", ["cosine", "raw_head"])
def test_cell_runs_on_cuda_with_bf16(tmp_path, rule):
    r = run("mmcosine", "synthetic", {**SYN, "device": "cuda", "progress": "off", "records": str(tmp_path),
                                      "eval_logits": rule})
    assert r.record["header"]["amp"] == "bfloat16"
    assert r.final["last"]["test"]["fused"]["acc"] > 20.0
