"""Metrics against hand-computed values; fused heads' per-modality parts."""

from __future__ import annotations

import pytest
import torch

from mmbalance.heads import ConcatHead, SumHead, WeightHead, coordinate_weights
from mmbalance.metrics import classification_metrics, final_metrics, select_epoch


def test_metrics_by_hand():
    # 4 samples, 2 classes. Scores for class 1 (softmax of these logits is monotone in l1 - l0).
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    y = torch.tensor([0, 0, 1, 1])
    m = classification_metrics(logits, y, 2)
    assert m["acc"] == pytest.approx(50.0)
    # class 1 ranking by score: s2 (pos), s1 (neg), s3 (pos), s0 (neg): AP = (1/1 + 2/3) / 2
    # class 0 ranking by score: s0 (pos), s3 (neg), s1 (pos), s2 (neg): AP = (1 + 2/3) / 2
    assert m["map"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    # predictions 0,1,1,0: per class precision = recall = 0.5 -> F1 0.5 each
    assert m["f1"] == pytest.approx(50.0)


def test_map_skips_absent_classes():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    m = classification_metrics(logits, torch.tensor([0, 1]), 3)
    assert m["map"] == pytest.approx(100.0)


def _entry(epoch, val, test):
    return {"epoch": epoch, "val": {"fused": {"acc": val}}, "test": {"fused": {"acc": test}}}


def test_selection_rules_first_max_wins():
    hist = [_entry(0, 50, 60), _entry(1, 70, 55), _entry(2, 70, 80), _entry(3, 60, 80)]
    assert select_epoch(hist, "last")["epoch"] == 3
    assert select_epoch(hist, "best_val")["epoch"] == 1
    assert select_epoch(hist, "best_test")["epoch"] == 2
    assert set(final_metrics(hist)) == {"last", "best_val", "best_test"}


def test_concat_parts_sum_to_fused():
    torch.manual_seed(0)
    head = ConcatHead({"a": 3, "b": 5}, 4)
    feats = {"a": torch.randn(2, 3), "b": torch.randn(2, 5)}
    parts = head.parts(feats)
    torch.testing.assert_close(parts["a"] + parts["b"], head(feats))
    w = head.fc.weight
    torch.testing.assert_close(parts["a"], feats["a"] @ w[:, :3].t() + head.fc.bias / 2)


def test_sum_head_parts():
    head = SumHead({"a": 3, "b": 3}, 2)
    feats = {"a": torch.randn(4, 3), "b": torch.randn(4, 3)}
    torch.testing.assert_close(sum(head.parts(feats).values()), head(feats))


def test_coordinate_weights_by_hand():
    za = torch.tensor([[0.0, 0.0]])
    zb = torch.tensor([[0.0, torch.log(torch.tensor(3.0))]])
    wa, wb = coordinate_weights([za, zb])
    # softmax(za) = [.5, .5]; softmax(zb) = [.25, .75] -> wa = [.5/.75, .5/1.25]
    torch.testing.assert_close(wa, torch.tensor([[2 / 3, 0.4]]))
    torch.testing.assert_close(wa + wb, torch.ones(1, 2))
    head = WeightHead({"a": 2, "b": 2}, 3)
    fused = head.fused_features({"a": za, "b": zb})
    torch.testing.assert_close(fused, wa * za + wb * zb)


def test_weight_head_needs_equal_widths():
    with pytest.raises(ValueError, match="equal feature widths"):
        WeightHead({"a": 2, "b": 3}, 2)
