"""The paper backbones: I3D, ResNet-50, BERT, CLIP towers and the IEMOCAP transformers.

Each is built tiny, run forward, saved in its real checkpoint format (piergiaj/timm state
dicts, Hugging Face save_pretrained folders), reloaded through the registered builder and
compared parameter by parameter. Nothing touches the network.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers import (
    BertConfig,
    BertForPreTraining,
    BertModel,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
)

from mmbalance.backbones.i3d import InceptionI3d, mixed5c_cells, official_pool
from mmbalance.data import ModalitySpec
from mmbalance.errors import ConfigError
from mmbalance.model import build_encoder
from mmbalance.registry import BACKBONES

BERT_TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 100,
    "max_position_embeddings": 32,
}
CLIP_VISION_TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 16,
    "projection_dim": 16,
}
CLIP_TEXT_TINY = {
    "hidden_size": 24,
    "intermediate_size": 48,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "vocab_size": 100,
    "max_position_embeddings": 16,
    "projection_dim": 16,
    "bos_token_id": 98,
    "eos_token_id": 99,
    "pad_token_id": 0,
}
VIT_TINY = {"embed_dim": 32, "depth": 1, "num_heads": 2}

VIDEO = ModalitySpec("video", (3, 4, 16, 16))
IMAGE = ModalitySpec("image", (3, 32, 32))
TOKENS = ModalitySpec("tokens", (7,))
FBANK = ModalitySpec("spectrogram", (1, 64, 32))
SEQ = ModalitySpec("sequence", (6, 5))


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny forwards are faster (and steadier on a shared 2-core box) with one thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def build(name: str, spec: ModalitySpec, out_dim: int | None = None, **kw) -> nn.Module:
    return BACKBONES.get(name)(spec, out_dim, **kw)


def tokens(batch: int = 2, length: int = 7, vocab: int = 90) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1, vocab, (batch, length), generator=g),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
    }


def assert_same_state(module: nn.Module, expected: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Every tensor of ``expected`` equals the module's (keys optionally prefixed)."""
    got = module.state_dict()
    for k, v in expected.items():
        assert torch.equal(got[prefix + k], v), k


def randomise(module: nn.Module) -> nn.Module:
    """Give every parameter and BN statistic non-default values so loading is visible."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    return module


def test_paper_backbones_are_registered() -> None:
    for name in ("i3d", "resnet50", "bert", "clip_vision", "clip_text", "fbank_transformer",
                 "vit", "seq_transformer"):
        assert name in BACKBONES


# ---------------------------------------------------------------------------------- I3D


@pytest.mark.parametrize("channels", [3, 2, 1])
def test_i3d_forward_shapes(channels: int) -> None:
    spec = ModalitySpec("video", (channels, 4, 16, 16))
    net = build("i3d", spec, pool="adaptive").eval()
    assert net.out_dim == 1024
    with torch.no_grad():
        z = net(torch.randn(2, channels, 4, 16, 16))
    assert z.shape == (2, 1024) and z.dtype == torch.float32
    proj = build("i3d", spec, 64, pool="adaptive").eval()
    assert proj.out_dim == 64
    with torch.no_grad():
        assert proj(torch.randn(2, channels, 4, 16, 16)).shape == (2, 64)


def test_i3d_bn_and_naming_match_piergiaj() -> None:
    net = InceptionI3d(3)
    bn = net.Mixed_4b.b1b.bn
    assert bn.eps == 1e-3 and bn.momentum == 0.01
    keys = set(net.state_dict())
    assert "Conv3d_1a_7x7.conv3d.weight" in keys and "Mixed_5c.b3b.bn.running_var" in keys
    assert net.Conv3d_1a_7x7.conv3d.weight.shape == (64, 3, 7, 7, 7)
    assert net.Mixed_5c.b0.conv3d.weight.shape == (384, 832, 1, 1, 1)
    assert sum(p.numel() for p in net.parameters()) == 12_287_264


def test_i3d_temporal_arithmetic() -> None:
    # the official clips: 64 frames -> 8 cells, 80 frames -> 10 cells, 224 px -> 7 cells
    assert mixed5c_cells(64, 224, 224) == (8, 7, 7)
    assert mixed5c_cells(80, 224, 224) == (10, 7, 7)
    assert mixed5c_cells(121, 224, 224) == (16, 7, 7)
    net = InceptionI3d(1, pool="adaptive").eval()
    with torch.no_grad():
        fmap = net.features(torch.randn(1, 1, 13, 70, 40))
    assert tuple(fmap.shape) == (1, 1024, *mixed5c_cells(13, 70, 40))


def test_i3d_official_pool_uses_first_eight_of_ten_cells() -> None:
    fmap = torch.randn(2, 1024, 10, 7, 7)
    z = official_pool(fmap)
    assert z.shape == (2, 1024)
    torch.testing.assert_close(z, fmap[:, :, :8].mean(dim=(2, 3, 4)))
    exact = torch.randn(2, 1024, 8, 7, 7)
    torch.testing.assert_close(official_pool(exact), exact.mean(dim=(2, 3, 4)))


@pytest.mark.parametrize("cells", [(16, 7, 7), (7, 7, 7), (8, 6, 7), (8, 7, 14)])
def test_i3d_official_pool_refuses_other_sizes(cells: tuple[int, int, int]) -> None:
    with pytest.raises(ConfigError, match="pool='adaptive'"):
        official_pool(torch.zeros(1, 1024, *cells))


def test_i3d_official_pool_is_default_and_refuses_tiny_clips() -> None:
    net = build("i3d", VIDEO).eval()
    assert net.pool == "official"
    with pytest.raises(ConfigError, match="64-frame"), torch.no_grad():
        net(torch.randn(1, 3, 4, 16, 16))
    with pytest.raises(ConfigError, match="pool"):
        build("i3d", VIDEO, pool="max")


def piergiaj_file(path: Path, channels: int, with_tracked: bool = False) -> dict[str, torch.Tensor]:
    """A state dict in the rgb_imagenet.pt / flow_imagenet.pt layout (with its logits layer)."""
    state = randomise(InceptionI3d(channels)).state_dict()
    if not with_tracked:  # the released files predate num_batches_tracked
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    state["logits.conv3d.weight"] = torch.randn(400, 1024, 1, 1, 1)
    state["logits.conv3d.bias"] = torch.randn(400)
    torch.save(state, path)
    return {k: v for k, v in state.items() if not k.startswith("logits.")}


@pytest.mark.parametrize("channels", [3, 2])
def test_i3d_loads_piergiaj_rgb_and_flow_files(tmp_path: Path, channels: int) -> None:
    path = tmp_path / ("rgb_imagenet.pt" if channels == 3 else "flow_imagenet.pt")
    saved = piergiaj_file(path, channels)
    net = build("i3d", ModalitySpec("video", (channels, 64, 224, 224)), weights=str(path))
    assert_same_state(net, saved)
    # with a projection the trunk is still loaded (under body.)
    proj = build("i3d", ModalitySpec("video", (channels, 4, 16, 16)), 32, weights=str(path))
    assert_same_state(proj, saved, prefix="body.")


def test_i3d_depth_takes_rgb_file_except_first_unit(tmp_path: Path) -> None:
    path = tmp_path / "rgb_imagenet.pt"
    saved = piergiaj_file(path, 3)
    torch.manual_seed(5)
    net = build("i3d", ModalitySpec("video", (1, 4, 16, 16)), weights=str(path))
    state = net.state_dict()
    first = {k for k in saved if k.startswith("Conv3d_1a_7x7.")}
    assert first == {
        "Conv3d_1a_7x7.conv3d.weight", "Conv3d_1a_7x7.bn.weight", "Conv3d_1a_7x7.bn.bias",
        "Conv3d_1a_7x7.bn.running_mean", "Conv3d_1a_7x7.bn.running_var",
    }
    assert_same_state(net, {k: v for k, v in saved.items() if k not in first})
    # the first unit keeps its fresh init: 1-channel conv, default BN
    assert state["Conv3d_1a_7x7.conv3d.weight"].shape == (64, 1, 7, 7, 7)
    assert torch.equal(state["Conv3d_1a_7x7.bn.weight"], torch.ones(64))
    assert torch.equal(state["Conv3d_1a_7x7.bn.running_mean"], torch.zeros(64))


def test_i3d_depth_checkpoint_with_official_name_loads_whole(tmp_path: Path) -> None:
    state = randomise(InceptionI3d(1)).state_dict()
    official = {k.replace("Conv3d_1a_7x7.", "Conv3d_1a_7x7_1."): v for k, v in state.items()}
    torch.save(official, tmp_path / "depth.pt")
    net = build("i3d", ModalitySpec("video", (1, 4, 16, 16)), weights=str(tmp_path / "depth.pt"))
    assert_same_state(net, state)


def test_i3d_wrong_channel_file_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "rgb_imagenet.pt"
    piergiaj_file(path, 3)
    with pytest.raises(ConfigError, match="flow_imagenet.pt"):
        build("i3d", ModalitySpec("video", (2, 4, 16, 16)), weights=str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        build("i3d", VIDEO, weights=str(tmp_path / "nope.pt"))
    torch.save({"Conv3d_1a_7x7.conv3d.weight": torch.zeros(64, 3, 7, 7, 7)}, tmp_path / "part.pt")
    with pytest.raises(ConfigError, match="missing"):
        build("i3d", VIDEO, weights=str(tmp_path / "part.pt"))


# ----------------------------------------------------------------------------- ResNet-50


def test_resnet50_forward_and_width() -> None:
    net = build("resnet50", IMAGE).eval()
    assert net.out_dim == 768 and net.proj.in_features == 2048
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 768)
    small = build("resnet50", IMAGE, 64).eval()
    with torch.no_grad():
        assert small(torch.randn(2, 3, 32, 32)).shape == (2, 64)


def test_resnet50_loads_timm_state_dict(tmp_path: Path) -> None:
    src = timm.create_model("resnet50", pretrained=False)  # with its 1000-way fc
    randomise(src)
    state = src.state_dict()
    torch.save(state, tmp_path / "resnet50.pth")
    net = build("resnet50", IMAGE, 128, weights=str(tmp_path / "resnet50.pth"))
    trunk = {k: v for k, v in state.items() if not k.startswith("fc.")}
    assert_same_state(net, trunk, prefix="trunk.")
    assert net.proj.weight.shape == (128, 2048)
    # a checkpoint of this encoder itself (trunk + proj) reloads whole
    torch.save(net.state_dict(), tmp_path / "enc.pt")
    again = build("resnet50", IMAGE, 128, weights=str(tmp_path / "enc.pt"))
    assert_same_state(again, net.state_dict())


def test_resnet50_bad_weights(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        build("resnet50", IMAGE, weights=str(tmp_path / "missing.pth"))
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ConfigError, match="resnet50"):
        build("resnet50", IMAGE, weights=str(tmp_path / "r18.pth"))


# ---------------------------------------------------------------------------------- BERT


def test_bert_cls_and_mean_pool() -> None:
    torch.manual_seed(0)
    net = build("bert", TOKENS, config=BERT_TINY).eval()
    assert net.out_dim == 32
    batch = tokens()
    with torch.no_grad():
        z = net(batch)
        hidden = net.bert(**batch).last_hidden_state
    assert z.shape == (2, 32)
    torch.testing.assert_close(z, hidden[:, 0])
    assert BertConfig().hidden_size == 768  # default config is bert-base
    mean = build("bert", TOKENS, 16, config=BERT_TINY, pool="mean").eval()
    with torch.no_grad():
        assert mean(batch).shape == (2, 16)


def test_bert_ignores_padding() -> None:
    net = build("bert", TOKENS, config=BERT_TINY, pool="mean").eval()
    batch = tokens()
    batch["attention_mask"][:, 5:] = 0
    other = {k: v.clone() for k, v in batch.items()}
    other["input_ids"][:, 5:] = 3  # change only padded positions
    with torch.no_grad():
        torch.testing.assert_close(net(batch), net(other))


def test_bert_loads_local_folder(tmp_path: Path) -> None:
    src = randomise(BertModel(BertConfig(**BERT_TINY)))  # with pooler, like bert-base files
    src.save_pretrained(tmp_path / "bert")
    net = build("bert", TOKENS, weights=str(tmp_path / "bert"))
    expected = {k: v for k, v in src.state_dict().items() if not k.startswith("pooler.")}
    assert_same_state(net, expected, prefix="bert.")
    assert net.out_dim == 32
    # the hub's bert-base-uncased folder is a pre-training model: 'bert.'-prefixed + MLM head
    hub_style = randomise(BertForPreTraining(BertConfig(**BERT_TINY)))
    hub_style.save_pretrained(tmp_path / "bert-base-uncased")
    net = build("bert", TOKENS, weights=str(tmp_path / "bert-base-uncased"))
    expected = {k: v for k, v in hub_style.bert.state_dict().items() if not k.startswith("pooler.")}
    assert_same_state(net, expected, prefix="bert.")


def test_bert_bad_weights(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        build("bert", TOKENS, weights=str(tmp_path / "no-bert"))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="folder"):
        build("bert", TOKENS, weights=str(tmp_path / "file.bin"))
    CLIPVisionModel(CLIPVisionConfig(**CLIP_VISION_TINY)).save_pretrained(tmp_path / "clip")
    with pytest.raises(ConfigError):
        build("bert", TOKENS, weights=str(tmp_path / "clip"))


# ---------------------------------------------------------------------------------- CLIP


def clip_folder(path: Path) -> CLIPModel:
    cfg = CLIPConfig(vision_config=CLIP_VISION_TINY, text_config=CLIP_TEXT_TINY, projection_dim=16)
    model = randomise(CLIPModel(cfg))
    model.save_pretrained(path)
    return model


def test_clip_towers_forward_shapes() -> None:
    vision = build("clip_vision", IMAGE, config=CLIP_VISION_TINY).eval()
    text = build("clip_text", TOKENS, config=CLIP_TEXT_TINY).eval()
    assert vision.out_dim == 16 and text.out_dim == 16  # projected joint space
    with torch.no_grad():
        assert vision(torch.randn(2, 3, 32, 32)).shape == (2, 16)
        assert vision(torch.randn(2, 3, 48, 48)).shape == (2, 16)  # interpolated positions
        assert text(tokens()).shape == (2, 16)
    plain_v = build("clip_vision", IMAGE, config=CLIP_VISION_TINY, projection=False)
    plain_t = build("clip_text", TOKENS, 8, config=CLIP_TEXT_TINY, projection=False).eval()
    assert plain_v.out_dim == 32
    with torch.no_grad():
        assert plain_t(tokens()).shape == (2, 8)
    default = CLIPVisionConfig(patch_size=16)
    assert (default.hidden_size, default.image_size, default.projection_dim) == (768, 224, 512)


def test_clip_loads_towers_from_clipmodel_folder(tmp_path: Path) -> None:
    src = clip_folder(tmp_path / "clip")
    vision = build("clip_vision", IMAGE, weights=str(tmp_path / "clip")).eval()
    text = build("clip_text", TOKENS, weights=str(tmp_path / "clip")).eval()
    torch.testing.assert_close(vision.tower.visual_projection.weight, src.visual_projection.weight)
    torch.testing.assert_close(text.tower.text_projection.weight, src.text_projection.weight)
    for mine, theirs in ((vision.tower.vision_model, src.vision_model),
                         (text.tower.text_model, src.text_model)):
        assert_same_state(mine, theirs.state_dict())
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = src.visual_projection(src.vision_model(pixel_values=pixels).pooler_output)
        torch.testing.assert_close(vision(pixels), expected)


def test_clip_bad_weights(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        build("clip_vision", IMAGE, weights=str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="does not exist"):
        build("clip_text", TOKENS, weights=str(tmp_path / "none"))
    # a vision-only folder has no projection: refused rather than left random
    CLIPVisionModel(CLIPVisionConfig(**CLIP_VISION_TINY)).save_pretrained(tmp_path / "tower")
    with pytest.raises(ConfigError, match="visual_projection"):
        build("clip_vision", IMAGE, weights=str(tmp_path / "tower"))
    plain = build("clip_vision", IMAGE, weights=str(tmp_path / "tower"), projection=False)
    assert plain.out_dim == 32


# ------------------------------------------------------------------------ IEMOCAP encoders


def test_fbank_transformer_layouts_and_tokens() -> None:
    net = build("fbank_transformer", FBANK, **VIT_TINY).eval()
    assert net.out_dim == 32
    assert net.vit.patch_embed.grid_size == (2, 4)  # (mel/16, frames/16): frequency is height
    x = torch.randn(2, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), net(x.unsqueeze(1)))
        assert net(x).shape == (2, 32)
    two_d = build("fbank_transformer", ModalitySpec("spectrogram", (64, 32)), 8, **VIT_TINY)
    with torch.no_grad():
        assert two_d(x).shape == (2, 8)
    freq_first = build("fbank_transformer", ModalitySpec("spectrogram", (1, 32, 64)),
                       time_first=False, **VIT_TINY)
    freq_first.load_state_dict(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(freq_first.eval()(x.transpose(1, 2)), net(x))
    with pytest.raises(ConfigError, match="multiple"):
        build("fbank_transformer", ModalitySpec("spectrogram", (1, 60, 32)), **VIT_TINY)
    with pytest.raises(ConfigError, match="divisible"):
        build("fbank_transformer", FBANK, embed_dim=30, depth=1, num_heads=4)


def test_fbank_transformer_weights(tmp_path: Path) -> None:
    src = randomise(build("fbank_transformer", FBANK, **VIT_TINY))
    torch.save(src.vit.state_dict(), tmp_path / "audio.pt")
    net = build("fbank_transformer", FBANK, weights=str(tmp_path / "audio.pt"), **VIT_TINY)
    assert_same_state(net.vit, src.vit.state_dict())
    # an image ViT checkpoint (3 channels, class token, head) initialises it, AST-style
    image_vit = randomise(VisionTransformer(img_size=32, num_classes=10, **VIT_TINY))
    torch.save(image_vit.state_dict(), tmp_path / "imagenet_vit.pt")
    net = build("fbank_transformer", FBANK, weights=str(tmp_path / "imagenet_vit.pt"), **VIT_TINY)
    torch.testing.assert_close(
        net.vit.patch_embed.proj.weight, image_vit.patch_embed.proj.weight.sum(1, keepdim=True)
    )
    torch.testing.assert_close(net.vit.blocks[0].attn.qkv.weight, image_vit.blocks[0].attn.qkv.weight)
    assert net.vit.pos_embed.shape == (1, 8, 32)
    with pytest.raises(ConfigError, match="does not exist"):
        build("fbank_transformer", FBANK, weights=str(tmp_path / "x.pt"), **VIT_TINY)


def test_vit_pools_and_weights(tmp_path: Path) -> None:
    avg = build("vit", IMAGE, **VIT_TINY).eval()
    cls = build("vit", IMAGE, 12, pool="token", **VIT_TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert avg(x).shape == (2, 32) and cls(x).shape == (2, 12)
        tokens_out = avg.forward_features(x)
        torch.testing.assert_close(avg(x), tokens_out[:, 1:].mean(1))  # CLS excluded
    src = randomise(VisionTransformer(img_size=32, num_classes=10, **VIT_TINY))
    torch.save(src.state_dict(), tmp_path / "vit.pt")
    net = build("vit", IMAGE, weights=str(tmp_path / "vit.pt"), **VIT_TINY)
    assert_same_state(net, {k: v for k, v in src.state_dict().items() if not k.startswith("head.")})
    # a 32-px checkpoint into a 48-px model: positions are resampled (4 -> 9 patches + CLS)
    big = build("vit", ModalitySpec("image", (3, 48, 48)), weights=str(tmp_path / "vit.pt"), **VIT_TINY)
    assert big.pos_embed.shape == (1, 10, 32)
    torch.testing.assert_close(big.cls_token, src.cls_token)
    with pytest.raises(ConfigError, match="does not exist"):
        build("vit", IMAGE, weights=str(tmp_path / "x.pt"), **VIT_TINY)


def test_seq_transformer_masking(tmp_path: Path) -> None:
    net = build("seq_transformer", SEQ, d_model=16, depth=1, num_heads=2).eval()
    assert net.out_dim == 16
    x = torch.randn(2, 6, 5)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[:, 4:] = 0
    changed = x.clone()
    changed[:, 4:] = 7.0
    with torch.no_grad():
        z = net({"features": x, "attention_mask": mask})
        assert z.shape == (2, 16)
        torch.testing.assert_close(z, net({"features": changed, "attention_mask": mask}))
        torch.testing.assert_close(z, net(x[:, :4]))  # padding == dropping those steps
    zeros = build("seq_transformer", SEQ, d_model=16, depth=1, num_heads=2, mask_zero_rows=True)
    zeros.load_state_dict(net.state_dict())
    padded = x.clone()
    padded[:, 4:] = 0
    with torch.no_grad():
        torch.testing.assert_close(zeros.eval()(padded), z)
        assert torch.isfinite(zeros(torch.zeros(1, 6, 5))).all()  # all-padding row
    torch.save(net.state_dict(), tmp_path / "seq.pt")
    again = build("seq_transformer", SEQ, 4, weights=str(tmp_path / "seq.pt"), d_model=16, depth=1,
                  num_heads=2)
    assert_same_state(again, net.state_dict(), prefix="body.")
    with pytest.raises(ConfigError, match="does not exist"):
        build("seq_transformer", SEQ, weights=str(tmp_path / "x.pt"))


def test_built_through_model_assembly() -> None:
    table = {
        "rgb": {"name": "i3d", "pool": "adaptive"},
        "text": {"name": "bert", "config": BERT_TINY, "pool": "mean"},
    }
    rgb = build_encoder("rgb", VIDEO, table, 24).eval()
    text = build_encoder("text", TOKENS, table, 24).eval()
    assert rgb.out_dim == text.out_dim == 24
    with torch.no_grad():
        assert rgb(torch.randn(1, 3, 4, 16, 16)).shape == (1, 24)
        assert text(tokens(1)).shape == (1, 24)
    with pytest.raises(ConfigError, match=r"(?s)Backbone 'i3d' of modality 'rgb' has no option 'depth'.*pool"):
        build_encoder("rgb", VIDEO, {"rgb": {"name": "i3d", "depth": 3}}, 24)


@pytest.mark.parametrize(
    ("name", "spec"),
    [
        ("i3d", IMAGE),
        ("resnet50", VIDEO),
        ("bert", IMAGE),
        ("clip_vision", TOKENS),
        ("clip_text", IMAGE),
        ("fbank_transformer", TOKENS),
        ("vit", FBANK),
        ("seq_transformer", IMAGE),
    ],
)
def test_wrong_modality_kind_is_a_config_error(name: str, spec: ModalitySpec) -> None:
    with pytest.raises(ConfigError, match="Pick another backbone"):
        build(name, spec)


# ------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
def test_paper_backbones_train_step_on_cuda_bf16() -> None:
    dev = torch.device("cuda")
    cases: list[tuple[str, ModalitySpec, dict, object]] = [
        ("i3d", ModalitySpec("video", (3, 64, 224, 224)), {}, torch.randn(2, 3, 64, 224, 224)),
        ("i3d", ModalitySpec("video", (1, 80, 224, 224)), {}, torch.randn(2, 1, 80, 224, 224)),
        ("resnet50", IMAGE, {}, torch.randn(2, 3, 224, 224)),
        ("bert", TOKENS, {"config": BERT_TINY}, tokens()),
        ("clip_vision", IMAGE, {"config": CLIP_VISION_TINY}, torch.randn(2, 3, 32, 32)),
        ("clip_text", TOKENS, {"config": CLIP_TEXT_TINY}, tokens()),
        ("fbank_transformer", ModalitySpec("spectrogram", (1, 1024, 128)), {},
         torch.randn(2, 1, 1024, 128)),
        ("vit", ModalitySpec("image", (3, 256, 256)), {}, torch.randn(2, 3, 256, 256)),
        ("seq_transformer", SEQ, {}, torch.randn(2, 6, 5)),
    ]
    for name, spec, kw, batch in cases:
        net = build(name, spec, 64, **kw).to(dev).train()
        opt = torch.optim.SGD(net.parameters(), lr=1e-3)
        x = {k: v.to(dev) for k, v in batch.items()} if isinstance(batch, dict) else batch.to(dev)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            z = net(x)
        assert z.shape == (2, 64), name
        loss = z.float().pow(2).mean()
        loss.backward()
        assert torch.isfinite(loss), name
        opt.step()
