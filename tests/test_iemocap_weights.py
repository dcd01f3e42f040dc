"""The official IEMOCAP encoders load by name mapping: CAV-MAE (audio, visual) and M3AE (image, text).

MLA (whose IEMOCAP setup IPRM follows) loads a CAV-MAE checkpoint into its audio encoder and
an M3AE-base checkpoint into its image and text encoders. Each test writes a tiny checkpoint
in that code base's own parameter naming (``module.blocks_a.0.attn.qkv.weight``,
``encoder.blocks.0.attention.qkv_linear.weight``, ...), loads it through the backbone builder
and checks (1) that every tensor landed where the official forward pass uses it and (2) that
our forward equals a forward written here from the official semantics with plain torch ops
(no timm), so a wrong norm, a transposed patch grid or a missing modality token would fail.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmbalance.backbones.weights import PartialWeightsWarning, WeightsError
from mmbalance.data import ModalitySpec
from mmbalance.errors import ConfigError, MMBalanceError
from mmbalance.model import build_encoder

D, HEADS, P = 32, 2, 16  # width, heads, patch size of every tiny checkpoint
SPECIFIC, SHARED = 2, 1  # CAV-MAE: modality-specific + shared blocks (base: 11 + 1)
FBANK = ModalitySpec("spectrogram", (1, 64, 32))  # 64 frames x 32 mel -> 2 x 4 patches
IMAGE = ModalitySpec("image", (3, 32, 32))  # 2 x 2 patches
TOKENS = ModalitySpec("tokens", (7,))
VOCAB = 50
TINY = {"embed_dim": D, "depth": SPECIFIC + SHARED, "num_heads": HEADS}
CAV_BLOCK = ("norm1", "norm1_a", "norm1_v", "attn.qkv", "attn.proj", "norm2", "norm2_a", "norm2_v",
             "mlp.fc1", "mlp.fc2")
OUT_SHAPES = {"attn.qkv": (3 * D, D), "attn.proj": (D, D), "mlp.fc1": (4 * D, D), "mlp.fc2": (D, 4 * D)}


def _rand(g: torch.Generator, *shape: int, scale: float = 0.2) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def _linear_or_norm(g: torch.Generator, state: dict, name: str, piece: str) -> None:
    if piece.startswith(("norm", "layer_norm")):
        state[f"{name}.weight"] = 1 + _rand(g, D, scale=0.1)
        state[f"{name}.bias"] = _rand(g, D, scale=0.1)
    else:
        out, inp = OUT_SHAPES[piece]
        state[f"{name}.weight"] = _rand(g, out, inp)
        state[f"{name}.bias"] = _rand(g, out, scale=0.05)


def cavmae_state(audio_tokens: int = 8, visual_tokens: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A pre-training CAV-MAE state dict in its own naming (decoder and unified norm included)."""
    g = torch.Generator().manual_seed(seed)
    s: dict[str, torch.Tensor] = {
        "patch_embed_a.proj.weight": _rand(g, D, 1, P, P, scale=0.05),
        "patch_embed_a.proj.bias": _rand(g, D),
        "patch_embed_v.proj.weight": _rand(g, D, 3, P, P, scale=0.05),
        "patch_embed_v.proj.bias": _rand(g, D),
        "modality_a": _rand(g, 1, 1, D),
        "modality_v": _rand(g, 1, 1, D),
        "pos_embed_a": _rand(g, 1, audio_tokens, D),
        "pos_embed_v": _rand(g, 1, visual_tokens, D),
        "norm_a.weight": 1 + _rand(g, D, scale=0.1), "norm_a.bias": _rand(g, D, scale=0.1),
        "norm_v.weight": 1 + _rand(g, D, scale=0.1), "norm_v.bias": _rand(g, D, scale=0.1),
        "norm.weight": 1 + _rand(g, D, scale=0.1), "norm.bias": _rand(g, D, scale=0.1),
        "mask_token": _rand(g, 1, 1, 16),
        "decoder_embed.weight": _rand(g, 16, D), "decoder_embed.bias": _rand(g, 16),
        "decoder_pos_embed_a": _rand(g, 1, audio_tokens, 16),
        "decoder_pred_a.weight": _rand(g, P * P, 16),
    }
    for group, count in (("blocks_a", SPECIFIC), ("blocks_v", SPECIFIC), ("blocks_u", SHARED)):
        for i in range(count):
            for piece in CAV_BLOCK:
                shape_key = piece.split("_")[0] if piece.startswith("norm") else piece
                _linear_or_norm(g, s, f"{group}.{i}.{piece}", shape_key)
    return s


def m3ae_state(depth: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    """An M3AE state dict as MLA's PyTorch port names it (both branches share the encoder)."""
    g = torch.Generator().manual_seed(seed)
    s: dict[str, torch.Tensor] = {
        "text_embedding.weight": _rand(g, VOCAB, D, scale=0.5),
        "image_embedding.weight": _rand(g, D, 3 * P * P, scale=0.05),
        "image_embedding.bias": _rand(g, D),
        "encoder_image_type_embedding": _rand(g, 1, 1, D),
        "encoder_text_type_embedding": _rand(g, 1, 1, D),
        "cls_token": _rand(g, 1, 1, D),
        "encoder.layer_norm.weight": 1 + _rand(g, D, scale=0.1),
        "encoder.layer_norm.bias": _rand(g, D, scale=0.1),
    }
    pieces = {"layer_norm1": "norm", "attention.qkv_linear": "attn.qkv", "attention.fc": "attn.proj",
              "layer_norm2": "norm", "transformer_mlp.fc1": "mlp.fc1", "transformer_mlp.fc2": "mlp.fc2"}
    for i in range(depth):
        for theirs, shape_key in pieces.items():
            _linear_or_norm(g, s, f"encoder.blocks.{i}.{theirs}", shape_key)
    return s


def save(obj: object, path: Path) -> str:
    torch.save(obj, path)
    return str(path)


def dataparallel(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CAV-MAE's released files are saved from nn.DataParallel: every name has 'module.'."""
    return {f"module.{k}": v for k, v in state.items()}


def build(modality: str, spec: ModalitySpec, entry: dict, out_dim: int | None = None) -> torch.nn.Module:
    return build_encoder(modality, spec, {modality: entry}, out_dim).eval()


# ------------------------------------------------------------ reference forward passes


def ref_block(x: torch.Tensor, s: dict, names: dict[str, str], mask: torch.Tensor | None = None) -> torch.Tensor:
    """One pre-norm block from the official tensors; ``names`` gives each piece's full name.

    ``mask`` (B, N), 1 = padding: those keys get the logit -1e7, as M3AE writes it."""
    b, n, d = x.shape
    hd = d // HEADS

    def lin(h: torch.Tensor, key: str) -> torch.Tensor:
        return F.linear(h, s[f"{names[key]}.weight"], s[f"{names[key]}.bias"])

    def ln(h: torch.Tensor, key: str) -> torch.Tensor:
        return F.layer_norm(h, (d,), s[f"{names[key]}.weight"], s[f"{names[key]}.bias"], 1e-5)

    qkv = lin(ln(x, "norm1"), "qkv").reshape(b, n, 3, HEADS, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = q @ k.transpose(-2, -1) * hd**-0.5
    if mask is not None:
        logits = torch.where(mask[:, None, None, :] > 0, torch.tensor(-1e7), logits)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    x = x + lin(out, "proj")
    return x + lin(F.gelu(lin(ln(x, "norm2"), "fc1")), "fc2")


def cav_names(group: str, i: int, norm_suffix: str = "") -> dict[str, str]:
    p = f"{group}.{i}"
    return {"norm1": f"{p}.norm1{norm_suffix}", "norm2": f"{p}.norm2{norm_suffix}", "qkv": f"{p}.attn.qkv",
            "proj": f"{p}.attn.proj", "fc1": f"{p}.mlp.fc1", "fc2": f"{p}.mlp.fc2"}


def m3ae_names(i: int) -> dict[str, str]:
    p = f"encoder.blocks.{i}"
    return {"norm1": f"{p}.layer_norm1", "norm2": f"{p}.layer_norm2", "qkv": f"{p}.attention.qkv_linear",
            "proj": f"{p}.attention.fc", "fc1": f"{p}.transformer_mlp.fc1", "fc2": f"{p}.transformer_mlp.fc2"}


def cavmae_reference(s: dict, x: torch.Tensor, branch: str) -> torch.Tensor:
    """CAV-MAE ``forward_feat`` in mode 'a' / 'v', then the token mean MLA takes."""
    if branch == "a":  # (B, T, F) fbank -> (B, 1, F, T): frequency is the image height
        x = x.unsqueeze(1).transpose(2, 3)
    h = F.conv2d(x, s[f"patch_embed_{branch}.proj.weight"], s[f"patch_embed_{branch}.proj.bias"], stride=P)
    h = h.flatten(2).transpose(1, 2) + s[f"pos_embed_{branch}"] + s[f"modality_{branch}"]
    for i in range(SPECIFIC):
        h = ref_block(h, s, cav_names(f"blocks_{branch}", i))
    for j in range(SHARED):
        h = ref_block(h, s, cav_names("blocks_u", j, f"_{branch}"))
    h = F.layer_norm(h, (D,), s[f"norm_{branch}.weight"], s[f"norm_{branch}.bias"], 1e-5)
    return h.mean(dim=1)


def m3ae_sincos_2d(size: int, dim: int) -> np.ndarray:
    """M3AE's 2-D table, written from its description: meshgrid with the width first."""
    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_w, grid_h = np.meshgrid(np.arange(size), np.arange(size))  # 'xy': width coordinate first
    return np.concatenate([one_d(dim // 2, grid_w), one_d(dim // 2, grid_h)], axis=1)[None]


def m3ae_image_reference(s: dict, images: torch.Tensor, depth: int = 2) -> torch.Tensor:
    b, c, hgt, wid = images.shape
    gh, gw = hgt // P, wid // P
    # 'b c (h p1) (w p2) -> b (h w) (c p1 p2)', as MLA patchifies before image_embedding
    patches = images.reshape(b, c, gh, P, gw, P).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * P * P)
    table = torch.from_numpy(m3ae_sincos_2d(gh, D)).float()
    x = F.linear(patches, s["image_embedding.weight"], s["image_embedding.bias"]) + table
    x = x + s["encoder_image_type_embedding"]
    x = torch.cat([s["cls_token"].expand(b, 1, D), x], dim=1)
    for i in range(depth):
        x = ref_block(x, s, m3ae_names(i))
    x = F.layer_norm(x, (D,), s["encoder.layer_norm.weight"], s["encoder.layer_norm.bias"], 1e-5)
    return x.mean(dim=1)  # MLA: v.mean(dim=1), the class token included


def m3ae_text_reference(s: dict, ids: torch.Tensor, pad: torch.Tensor, depth: int = 2) -> torch.Tensor:
    b, length = ids.shape
    omega = 1.0 / 10000 ** (np.arange(D // 2, dtype=np.float64) / (D / 2.0))
    ang = np.einsum("m,d->md", np.arange(length, dtype=np.float64), omega)
    table = torch.from_numpy(np.concatenate([np.sin(ang), np.cos(ang)], axis=1)).float()
    x = s["text_embedding.weight"][ids] + table + s["encoder_text_type_embedding"]
    x = torch.cat([s["cls_token"].expand(b, 1, D), x], dim=1)
    mask = torch.cat([torch.zeros(b, 1), pad.float()], dim=1)
    for i in range(depth):
        x = ref_block(x, s, m3ae_names(i), mask)
    x = F.layer_norm(x, (D,), s["encoder.layer_norm.weight"], s["encoder.layer_norm.bias"], 1e-5)
    return x.mean(dim=1)  # MLA: t.mean(dim=1) over every position, padding included


def assert_block(block: torch.nn.Module, s: dict, names: dict[str, str]) -> None:
    ours = {"norm1": block.norm1, "norm2": block.norm2, "qkv": block.attn.qkv, "proj": block.attn.proj,
            "fc1": block.mlp.fc1, "fc2": block.mlp.fc2}
    for key, mod in ours.items():
        torch.testing.assert_close(mod.weight.detach(), s[f"{names[key]}.weight"], rtol=0, atol=0)
        torch.testing.assert_close(mod.bias.detach(), s[f"{names[key]}.bias"], rtol=0, atol=0)


# ------------------------------------------------------------------------------ CAV-MAE


def test_cavmae_audio_branch_lands_where_forward_feat_uses_it(tmp_path: Path) -> None:
    s = cavmae_state()
    path = save(dataparallel(s), tmp_path / "cav-mae-base.pth")
    enc = build("audio", FBANK, {"name": "fbank_transformer", "weights": path, **TINY})
    vit = enc.vit
    torch.testing.assert_close(vit.patch_embed.proj.weight.detach(), s["patch_embed_a.proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(vit.patch_embed.proj.bias.detach(), s["patch_embed_a.proj.bias"], rtol=0, atol=0)
    torch.testing.assert_close(vit.pos_embed.detach(), s["pos_embed_a"] + s["modality_a"], rtol=0, atol=0)
    for i in range(SPECIFIC):  # modality-specific blocks run with norm1 / norm2
        assert_block(vit.blocks[i], s, cav_names("blocks_a", i))
    for j in range(SHARED):  # the shared block runs with the audio norms norm1_a / norm2_a
        assert_block(vit.blocks[SPECIFIC + j], s, cav_names("blocks_u", j, "_a"))
    torch.testing.assert_close(vit.norm.weight.detach(), s["norm_a.weight"], rtol=0, atol=0)
    assert vit.norm.eps == 1e-5 and vit.blocks[0].norm1.eps == 1e-5  # nn.LayerNorm's, not timm's 1e-6
    assert vit.cls_token is None
    report = enc.weights_report
    assert report.format == "cavmae" and report.branch == "audio" and not report.missing
    assert len(report.loaded) == len(vit.state_dict())
    assert {"blocks_v.0.attn.qkv.weight", "blocks_a.0.norm1_a.weight", "norm.weight",
            "decoder_embed.weight", "pos_embed_v"} <= set(report.unused)
    assert not {"blocks_u.0.attn.qkv.weight", "blocks_u.0.norm1_a.weight", "modality_a"} & set(report.unused)
    x = torch.randn(3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), cavmae_reference(s, x, "a"), rtol=1e-4, atol=1e-5)


def test_cavmae_visual_branch_onto_vit_and_report_through_projection(tmp_path: Path) -> None:
    s = cavmae_state(seed=3)
    path = save(dataparallel(s), tmp_path / "cav.pth")
    enc = build("visual", IMAGE, {"name": "vit", "weights": path, **TINY}, out_dim=8)
    vit = enc.body
    assert vit.cls_token is None  # CAV-MAE has no class token
    for i in range(SPECIFIC):
        assert_block(vit.blocks[i], s, cav_names("blocks_v", i))
    assert_block(vit.blocks[SPECIFIC], s, cav_names("blocks_u", 0, "_v"))
    torch.testing.assert_close(vit.pos_embed.detach(), s["pos_embed_v"] + s["modality_v"], rtol=0, atol=0)
    assert enc.weights_report.branch == "visual" and "blocks_a.0.attn.qkv.weight" in enc.weights_report.unused
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), cavmae_reference(s, x, "v"), rtol=1e-4, atol=1e-5)
        assert enc(x).shape == (2, 8)


# --------------------------------------------------------------------------------- M3AE


def test_m3ae_image_branch_onto_vit(tmp_path: Path) -> None:
    s = m3ae_state()
    path = save({"model": s, "epoch": 7}, tmp_path / "m3ae_base.pth")  # a training-checkpoint wrapper
    enc = build("visual", IMAGE, {"name": "vit", "weights": path, "embed_dim": D, "depth": 2, "num_heads": HEADS})
    torch.testing.assert_close(enc.patch_embed.proj.weight.detach(),
                               s["image_embedding.weight"].reshape(D, 3, P, P), rtol=0, atol=0)
    torch.testing.assert_close(enc.cls_token.detach(), s["cls_token"], rtol=0, atol=0)
    table = torch.from_numpy(m3ae_sincos_2d(2, D)).float()
    torch.testing.assert_close(enc.pos_embed.detach(), table + s["encoder_image_type_embedding"])
    assert enc.pos_embed.shape == (1, 4, D)  # the class token gets no position (no_embed_class)
    for i in range(2):
        assert_block(enc.blocks[i], s, m3ae_names(i))
    assert {"text_embedding.weight", "encoder_text_type_embedding"} == set(enc.weights_report.unused)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), m3ae_image_reference(s, x), rtol=1e-4, atol=1e-5)
    # M3AE computes its table for any grid: a 48-px model (3 x 3 patches) loads the same file
    big = build("visual", ModalitySpec("image", (3, 48, 48)),
                {"name": "vit", "weights": path, "embed_dim": D, "depth": 2, "num_heads": HEADS})
    y = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(big(y), m3ae_image_reference(s, y), rtol=1e-4, atol=1e-5)


def test_m3ae_text_branch(tmp_path: Path) -> None:
    s = m3ae_state(seed=5)
    path = save(s, tmp_path / "m3ae_base.pth")
    entry = {"name": "m3ae_text", "weights": path, "vocab_size": VOCAB, "embed_dim": D, "depth": 2,
             "num_heads": HEADS}
    enc = build("text", TOKENS, entry)
    torch.testing.assert_close(enc.embed.weight.detach(), s["text_embedding.weight"], rtol=0, atol=0)
    torch.testing.assert_close(enc.type_embed.detach(), s["encoder_text_type_embedding"], rtol=0, atol=0)
    for i in range(2):
        assert_block(enc.blocks[i], s, m3ae_names(i))
    assert "image_embedding.weight" in enc.weights_report.unused
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (3, 7), generator=g)
    attention = torch.ones(3, 7, dtype=torch.long)
    attention[0, 4:] = 0
    attention[1, 2:] = 0
    ids = ids * attention  # MLA pads with id 0
    with torch.no_grad():
        out = enc({"input_ids": ids, "attention_mask": attention})
        torch.testing.assert_close(out, m3ae_text_reference(s, ids, 1 - attention), rtol=1e-4, atol=1e-5)
        # the padding is masked as attention keys: with pool=masked, padded ids change nothing
        masked = build("text", TOKENS, {**entry, "pool": "masked"})
        other = ids.clone()
        other[0, 5] = 9
        a = masked({"input_ids": ids, "attention_mask": attention})
        torch.testing.assert_close(a, masked({"input_ids": other, "attention_mask": attention}))
        assert not torch.allclose(a, out)
        blank = enc.blank_input({"input_ids": ids, "attention_mask": attention})
        assert torch.isfinite(enc(blank)).all() and blank["attention_mask"].sum() == 0
    with pytest.raises(ConfigError, match="'mean' is the bert backbone's option"):
        build("text", TOKENS, {**entry, "pool": "mean"})
    enc.train()
    enc({"input_ids": ids, "attention_mask": attention}).sum().backward()
    assert torch.isfinite(enc.embed.weight.grad).all()


def test_mla_saved_model_loads_one_encoder_by_prefix(tmp_path: Path) -> None:
    s = cavmae_state(seed=4)
    whole = {f"mae_a.{k}": v for k, v in s.items()} | {f"mae_v.{k}": v for k, v in m3ae_state().items()}
    path = save({"model": whole, "optimizer": {"state": {}}}, tmp_path / "mla_best.pth")
    enc = build("audio", FBANK, {"name": "fbank_transformer", "weights": path, "weights_prefix": "mae_a.", **TINY})
    torch.testing.assert_close(enc.vit.norm.bias.detach(), s["norm_a.bias"], rtol=0, atol=0)
    with pytest.raises(WeightsError, match=r"weights_prefix='mae_x\.'.*mae_a"):
        build("audio", FBANK, {"name": "fbank_transformer", "weights": path, "weights_prefix": "mae_x.", **TINY})


# ------------------------------------------------------------------------------- errors


def test_wrong_shape_names_both_tensors_and_shapes(tmp_path: Path) -> None:
    s = cavmae_state()
    s["blocks_a.1.mlp.fc1.weight"] = torch.zeros(48, D)
    path = save(dataparallel(s), tmp_path / "bad.pth")
    with pytest.raises(WeightsError) as err:
        build("audio", FBANK, {"name": "fbank_transformer", "weights": path, **TINY})
    msg = str(err.value)
    assert "'blocks_a.1.mlp.fc1.weight' (48, 32)" in msg and "'blocks.1.mlp.fc1.weight' (128, 32)" in msg
    # a checkpoint of another width fails the same way (every tensor named by the first three)
    path = save(dataparallel(cavmae_state()), tmp_path / "cav.pth")
    with pytest.raises(WeightsError, match="another shape"):
        build("audio", FBANK, {"name": "fbank_transformer", "weights": path, **TINY, "embed_dim": 64})


def test_missing_key_is_an_error_unless_partial_loading_is_asked_for(tmp_path: Path) -> None:
    s = cavmae_state()
    del s["blocks_u.0.norm1_a.weight"]
    path = save(dataparallel(s), tmp_path / "holey.pth")
    entry = {"name": "fbank_transformer", "weights": path, **TINY}
    with pytest.raises(WeightsError, match=r"blocks\.2\.norm1\.weight.*blocks_u\.0\.norm1_a\.weight.*weights_partial=true"):
        build("audio", FBANK, entry)
    with pytest.warns(PartialWeightsWarning, match="blocks.2.norm1.weight"):
        enc = build("audio", FBANK, {**entry, "weights_partial": True})
    assert enc.weights_report.missing == ["blocks.2.norm1.weight"]
    torch.testing.assert_close(enc.vit.blocks[2].norm1.weight.detach(), torch.ones(D))  # left at init
    torch.testing.assert_close(enc.vit.blocks[2].norm1.bias.detach(), s["blocks_u.0.norm1_a.bias"], rtol=0, atol=0)


def test_depth_and_format_mismatches(tmp_path: Path) -> None:
    path = save(dataparallel(cavmae_state()), tmp_path / "cav.pth")
    with pytest.raises(WeightsError, match=r"2 modality-specific \+ 1 shared.*Set depth=3"):
        build("audio", FBANK, {"name": "fbank_transformer", "weights": path, **TINY, "depth": 2})
    m3ae = save(m3ae_state(), tmp_path / "m3ae.pth")
    with pytest.raises(WeightsError, match="m3ae checkpoint, which this backbone cannot take"):
        build("audio", FBANK, {"name": "fbank_transformer", "weights": m3ae, **TINY})
    with pytest.raises(WeightsError, match="no M3AE transformer blocks.*blocks_a"):  # forced family
        build("visual", IMAGE, {"name": "vit", "weights": path, "weights_format": "m3ae", **TINY})
    with pytest.raises(ConfigError, match="weights_format='bogus'"):
        build("visual", IMAGE, {"name": "vit", "weights": path, "weights_format": "bogus", **TINY})
    with pytest.raises(ConfigError, match="layout='timm' with a cavmae checkpoint"):
        build("visual", IMAGE, {"name": "vit", "weights": path, "layout": "timm", **TINY})
    with pytest.raises(ConfigError, match="no class token"):
        build("visual", IMAGE, {"name": "vit", "weights": path, "pool": "token", **TINY})


def test_position_grid_mismatch_is_an_error_or_an_explicit_resample(tmp_path: Path) -> None:
    s = cavmae_state()
    path = save(dataparallel(s), tmp_path / "cav.pth")
    longer = ModalitySpec("spectrogram", (1, 96, 32))  # 2 x 6 patches; the file has 2 x 4
    entry = {"name": "fbank_transformer", "weights": path, **TINY}
    with pytest.raises(WeightsError, match=r"2 x 4 patch grid.*2 x 6 grid.*weights_resize_pos=true"):
        build("audio", longer, entry)
    enc = build("audio", longer, {**entry, "weights_resize_pos": True})
    grid = (s["pos_embed_a"] + s["modality_a"]).reshape(1, 2, 4, D).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(2, 6), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(enc.vit.pos_embed.detach(), want.permute(0, 2, 3, 1).reshape(1, 12, D))
    assert enc.weights_report.resized
    with pytest.raises(WeightsError, match=r"img_size=224"):
        build("visual", ModalitySpec("image", (3, 48, 48)), {"name": "vit", "weights": path, **TINY})


def test_non_checkpoint_files_are_clear_errors(tmp_path: Path) -> None:
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    entry = {"name": "vit", **TINY}
    with pytest.raises(WeightsError, match="not a PyTorch checkpoint"):
        build("visual", IMAGE, {**entry, "weights": str(text)})
    empty = save({"epoch": 3, "args": ["--lr", "0.1"]}, tmp_path / "meta.pth")
    with pytest.raises(WeightsError, match="holds no state dict"):
        build("visual", IMAGE, {**entry, "weights": empty})
    with pytest.raises(WeightsError, match="is a folder"):
        build("visual", IMAGE, {**entry, "weights": str(tmp_path)})
    assert issubclass(WeightsError, MMBalanceError)


class _Planted:
    """Unpickling this runs ``exec``: the payload writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - the pickle protocol's signature
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_planted_pickle_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "payload_ran"
    state = dataparallel(cavmae_state()) | {"module.extra": _Planted(marker)}
    path = save(state, tmp_path / "planted.pth")
    # the plant is live: a full unpickle runs it
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(WeightsError, match=r"Refused.*weights_only=True"):
        build("audio", FBANK, {"name": "fbank_transformer", "weights": path, **TINY})
    assert not marker.exists()


def test_family_layout_without_weights_and_timm_files_still_load(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete load warns about nothing
        cav = build("visual", IMAGE, {"name": "vit", "weights_format": "cavmae", **TINY})
        m3 = build("visual", IMAGE, {"name": "vit", "weights_format": "m3ae", **TINY})
        plain = build("visual", IMAGE, {"name": "vit", **TINY})
    assert cav.cls_token is None and m3.pos_embed.shape == (1, 4, D) and plain.pos_embed.shape == (1, 5, D)
    assert plain.norm.eps == 1e-6 and not hasattr(plain, "weights_report")
    # our own (timm-named) file round-trips through the same strict loader
    path = save(m3.state_dict(), tmp_path / "ours.pth")
    again = build("visual", IMAGE, {"name": "vit", "weights": path, "layout": "m3ae", **TINY})
    assert again.weights_report.format == "timm"
    for k, v in m3.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, rtol=0, atol=0)
    text = build("text", TOKENS, {"name": "m3ae_text", "vocab_size": VOCAB, **TINY})
    path = save(text.state_dict(), tmp_path / "text.pth")
    back = build("text", TOKENS, {"name": "m3ae_text", "weights": path, "vocab_size": VOCAB, **TINY})
    assert back.weights_report.format == "mmbalance"
    torch.testing.assert_close(back.embed.weight, text.embed.weight, rtol=0, atol=0)


@pytest.mark.gpu
def test_loaded_encoders_train_step_on_cuda_bf16(tmp_path: Path) -> None:
    dev = torch.device("cuda")
    cav = save(dataparallel(cavmae_state()), tmp_path / "cav.pth")
    m3ae = save(m3ae_state(), tmp_path / "m3ae.pth")
    small = {"embed_dim": D, "depth": 2, "num_heads": HEADS}
    ids = torch.randint(1, VOCAB, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 3:] = 0
    cases = [
        ("audio", FBANK, {"name": "fbank_transformer", "weights": cav, **TINY}, torch.randn(2, 64, 32)),
        ("visual", IMAGE, {"name": "vit", "weights": m3ae, **small}, torch.randn(2, 3, 32, 32)),
        ("text", TOKENS, {"name": "m3ae_text", "weights": m3ae, "vocab_size": VOCAB, **small},
         {"input_ids": ids, "attention_mask": mask}),
    ]
    for modality, spec, entry, batch in cases:
        enc = build(modality, spec, entry, out_dim=16).to(dev).train()
        x = {k: v.to(dev) for k, v in batch.items()} if isinstance(batch, dict) else batch.to(dev)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            z = enc(x)
        assert z.shape == (2, 16)
        z.float().square().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None), modality
