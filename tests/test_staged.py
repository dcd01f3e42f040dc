"""The staged-encoder protocol (mmbalance/backbones/staged.py): for every backbone that
implements it, stem -> stages -> pool is the encoder's forward, bit for bit, in fp32 and under
bf16 autocast, with and without channels_last; encoders that cannot be split say so."""

from __future__ import annotations

import pytest
import torch

from mmbalance.backbones.staged import per_sample, staged
from mmbalance.data import ModalitySpec
from mmbalance.registry import BACKBONES

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest

# (backbone, spec, out_dim, options, input shape without the batch, expected stage channels)
CASES = [
    ("cnn", ModalitySpec("spectrogram", (1, 20, 18)), None, {}, (1, 20, 18), (16, 32, 64, 128)),
    ("cnn", ModalitySpec("image", (3, 16, 16)), 24, {"widths": [8, 12, 16]}, (3, 16, 16), (8, 12, 16)),
    ("resnet18", ModalitySpec("spectrogram", (1, 40, 36)), 32, {}, (1, 40, 36), (64, 128, 256, 512)),
    ("resnet18", ModalitySpec("video", (3, 3, 36, 36)), None, {}, (3, 3, 36, 36), (64, 128, 256, 512)),
    ("resnet50", ModalitySpec("image", (3, 40, 40)), 24, {}, (3, 40, 40), (256, 512, 1024, 2048)),
    ("i3d", ModalitySpec("video", (3, 8, 40, 40)), 64, {"pool": "adaptive"}, (3, 8, 40, 40), (480, 832, 1024)),
]
IDS = [f"{c[0]}-{c[1].kind}-{c[2]}" for c in CASES]


def build(name, spec, out_dim, options):
    BACKBONES.load_plugins()
    torch.manual_seed(0)
    return BACKBONES.get(name)(spec, out_dim, **options)


def through_stages(enc, x):
    view = staged(enc)
    h = view.stem(x)
    maps = []
    for stage in view.stages:
        h = stage(h)
        maps.append(h)
    return view.pool(h, x.shape[0]), maps


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_stages_in_order_equal_the_forward_bit_for_bit(case, layout, mode):
    """Wrong variant caught here: a stage split that skips or repeats a module, a pool that
    forgets the projection or the ReLU'd fc, video frames unfolded with the wrong factor."""
    name, spec, out_dim, options, shape, channels = case
    enc = build(name, spec, out_dim, options)
    if layout == "channels_last":
        fmt = torch.channels_last_3d if name == "i3d" else torch.channels_last  # 5-D convolutions
        enc = enc.to(memory_format=fmt)
    enc.train(mode == "train")
    view = staged(enc)
    assert view is not None and view.stage_channels == channels
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    # BatchNorm in train mode updates running stats: run both from the same state
    state = {k: v.clone() for k, v in enc.state_dict().items()}
    expected = enc(x)
    enc.load_state_dict(state)
    got, maps = through_stages(enc, x)
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    folded = 3 if spec.kind == "video" and name == "resnet18" else 1
    for h, c in zip(maps, channels, strict=True):
        assert h.shape[1] == c and h.shape[0] == 2 * folded


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("cnn", "resnet18")],
                         ids=[i for i, c in zip(IDS, CASES, strict=True) if c[0] in ("cnn", "resnet18")])
def test_stages_equal_the_forward_under_bf16_autocast(case):
    name, spec, out_dim, options, shape, _ = case
    enc = build(name, spec, out_dim, options).eval()
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = enc(x)
        got, _ = through_stages(enc, x)
    assert torch.equal(got, expected)


def test_encoders_that_cannot_be_split_have_no_view():
    enc = build("mlp", ModalitySpec("vector", (8,)), 8, {})
    assert staged(enc) is None


def test_per_sample_groups_the_frames_of_each_clip():
    """Row b*T + t of a folded map belongs to clip b: the view must keep clips together and
    refuse a batch size that does not divide the rows (the official BalanceBenchmark code
    unfolds with a constant 64)."""
    h = torch.arange(6.0).reshape(6, 1)
    grouped = per_sample(h, 2)
    assert grouped.shape == (2, 3, 1)
    assert grouped[1, :, 0].tolist() == [3.0, 4.0, 5.0]
    with pytest.raises(ValueError, match="does not fold"):
        per_sample(h, 4)
