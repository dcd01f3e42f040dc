"""The spine's backbones: shapes, the video fold-and-pool rule, local weights."""

from __future__ import annotations

import pytest
import torch

from mmbalance.data import ModalitySpec
from mmbalance.errors import ConfigError
from mmbalance.model import build_encoder


def test_mlp_and_cnn_shapes():
    mlp = build_encoder("x", ModalitySpec("vector", (10,)), {"x": {"name": "mlp", "hidden": 16}}, 8)
    assert mlp(torch.randn(3, 10)).shape == (3, 8) and mlp.out_dim == 8
    cnn = build_encoder("a", ModalitySpec("spectrogram", (1, 20, 30)), {"a": {"name": "cnn", "widths": [4, 8]}}, 6)
    assert cnn(torch.randn(2, 1, 20, 30)).shape == (2, 6)


def test_resnet18_audio_and_video_fold_frames_and_pool_over_time():
    torch.manual_seed(0)
    audio = build_encoder("audio", ModalitySpec("spectrogram", (1, 64, 48)), {"audio": {"name": "resnet18"}}, None)
    assert audio(torch.randn(2, 1, 64, 48)).shape == (2, 512)
    video = build_encoder("visual", ModalitySpec("video", (3, 3, 32, 32)), {"visual": {"name": "resnet18"}}, None)
    video.eval()
    frame = torch.randn(2, 3, 32, 32)
    still = frame.unsqueeze(2).expand(2, 3, 3, 32, 32)  # three identical frames
    # pooling over (T, H, W) of identical frames equals pooling one frame over (H, W)
    torch.testing.assert_close(video(still), video.body.trunk(frame).mean((2, 3)), rtol=1e-4, atol=1e-5)
    two = torch.stack([torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)], dim=2)
    per_frame = torch.stack([video.body.trunk(two[:, :, t]).mean((2, 3)) for t in range(2)]).mean(0)
    torch.testing.assert_close(video(two), per_frame, rtol=1e-4, atol=1e-5)
    proj = build_encoder("visual", ModalitySpec("video", (3, 2, 32, 32)), {"visual": {"name": "resnet18"}}, 128)
    assert proj(torch.randn(1, 3, 2, 32, 32)).shape == (1, 128)


def test_local_weights_round_trip_and_missing_file(tmp_path):
    spec = ModalitySpec("spectrogram", (1, 32, 32))
    first = build_encoder("a", spec, {"a": {"name": "resnet18"}}, None)
    torch.save(first.body.state_dict(), tmp_path / "w.pt")
    second = build_encoder("a", spec, {"a": {"name": "resnet18", "weights": str(tmp_path / "w.pt")}}, None)
    for p, q in zip(first.body.parameters(), second.body.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ConfigError, match="does not exist"):
        build_encoder("a", spec, {"a": {"name": "resnet18", "weights": str(tmp_path / "none.pt")}}, None)


def test_unknown_backbone_and_missing_entry():
    from mmbalance.errors import MMBalanceError

    with pytest.raises(MMBalanceError, match="Unknown backbone 'resnet81'"):
        build_encoder("a", ModalitySpec("vector", (3,)), {"a": {"name": "resnet81"}}, 4)
    with pytest.raises(ConfigError, match="backbone.a.name"):
        build_encoder("a", ModalitySpec("vector", (3,)), {}, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cnn_pools_before_its_relu_with_the_numbers_of_relu_then_pool(dtype):
    """The swap is a speed change only: forward and every gradient equal the conv-BN-ReLU-pool
    order to the bit, on inputs with ties, zeros and all-negative windows."""
    from torch import nn

    from mmbalance.backbones.cnn import SmallCNN

    torch.manual_seed(0)
    net = SmallCNN(1, (4, 8), 16).to(dtype)
    assert [type(m) for m in net.features[:4]] == [nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.ReLU]
    reference = SmallCNN(1, (4, 8), 16).to(dtype)
    reference.load_state_dict(net.state_dict())  # same parameter names in either order
    mods = list(reference.features)
    for i in range(0, len(mods), 4):
        mods[i + 2], mods[i + 3] = mods[i + 3], mods[i + 2]  # back to conv-BN-ReLU-pool
    reference.features = nn.Sequential(*mods)
    x = torch.randn(6, 1, 13, 11).round().to(dtype)  # rounded: many ties and exact zeros
    x[0] = -1.0  # constant input: BN gives all-zero activations
    outs, grads = [], []
    for model in (net, reference):
        xi = x.clone().requires_grad_()
        y = model(xi)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad for p in model.parameters()])
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[1], strict=True))
