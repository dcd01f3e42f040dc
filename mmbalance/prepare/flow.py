"""Dense optical flow for ``prepare nvgesture``: OpenCV's TV-L1, or our own Horn-Schunck.

The official NVGesture flow algorithm is unknown (docs/datasets/nvgesture.md). The default is TV-L1 (Zach,
Pock & Bischof 2007, the flow I3D's authors computed for their flow stream), taken from
OpenCV's contrib build (``cv2.optflow.DualTVL1OpticalFlow``, parameters at OpenCV's defaults)
wherever that installs; mmbalance's own coarse-to-fine Horn & Schunck (1981) in torch is the
option (and the fallback without the contrib build). Which method made each flow file is
recorded beside the files in ``mmbalance_flow.json`` (:func:`read_flow_meta`), and the loader
reports it with the run. torch and cv2 are imported inside the functions, so importing this
module stays light.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmbalance.errors import ConfigError, DataError

FLOW_METHODS = {
    "tvl1": "TV-L1 (OpenCV contrib cv2.optflow.DualTVL1OpticalFlow, OpenCV's default parameters)",
    "horn_schunck": "mmbalance's pyramidal Horn-Schunck (torch)",
}
FLOW_META_FILE = "mmbalance_flow.json"
FLOW_FORMAT = (
    "(H, W, 2, T) float32, channel 0 = u (x, rightwards), 1 = v (y, downwards), in pixels, "
    "prev(y, x) ~ next(y + v, x + u), between consecutive grey (BT.601) frames of sk_color"
)


def tvl1_available() -> bool:
    """Whether OpenCV's TV-L1 can be used: the contrib build (``cv2.optflow``) is installed."""
    try:
        import cv2
    except ImportError:
        return False
    return hasattr(cv2, "optflow") and hasattr(cv2.optflow, "DualTVL1OpticalFlow_create")


def resolve_flow_method(method: str) -> tuple[str, str | None]:
    """``auto`` -> tvl1 where OpenCV's contrib build is installed, else horn_schunck; returns
    (method, a note saying why when auto fell back). An explicit tvl1 without the contrib build
    is a ConfigError naming the package."""
    if method not in (*FLOW_METHODS, "auto"):
        raise ConfigError(f"method='{method}' is not one of auto, {', '.join(FLOW_METHODS)}.")
    if method == "auto":
        if tvl1_available():
            return "tvl1", None
        return "horn_schunck", (
            "method=auto fell back to Horn-Schunck: OpenCV's contrib build (cv2.optflow) is not "
            "installed; `pip install opencv-contrib-python-headless` gives TV-L1"
        )
    if method == "tvl1" and not tvl1_available():
        raise ConfigError(
            "method=tvl1 needs OpenCV's contrib build (cv2.optflow.DualTVL1OpticalFlow). Install "
            "it with `pip install opencv-contrib-python-headless` (and no other opencv-python "
            "package beside it), or pass --set method=horn_schunck."
        )
    return method, None


def tvl1_parameters() -> dict[str, Any]:
    """The parameters OpenCV's TV-L1 runs with here (its defaults), read back from OpenCV."""
    import cv2

    f = cv2.optflow.DualTVL1OpticalFlow_create()
    return {
        "tau": f.getTau(), "lambda": f.getLambda(), "theta": f.getTheta(),
        "nscales": f.getScalesNumber(), "warps": f.getWarpingsNumber(),
        "epsilon": f.getEpsilon(), "inner_iterations": f.getInnerIterations(),
        "outer_iterations": f.getOuterIterations(), "scale_step": f.getScaleStep(),
        "gamma": f.getGamma(), "median_filtering": f.getMedianFiltering(),
    }


def tvl1_flow(grey_frames: np.ndarray) -> np.ndarray:
    """TV-L1 flow between consecutive uint8 grey frames (T, H, W) -> (T - 1, H, W, 2) float32.

    OpenCV's Dual TV-L1 at its default parameters, one estimator per clip; the convention is
    OpenCV's (and :func:`horn_schunck`'s): prev(y, x) ~ next(y + v, x + u), u first.
    """
    import cv2

    frames = np.ascontiguousarray(grey_frames, dtype=np.uint8)
    if frames.ndim != 3 or frames.shape[0] < 2:
        raise DataError(f"TV-L1 needs at least 2 grey frames (T, H, W), got shape {frames.shape}.")
    estimator = cv2.optflow.DualTVL1OpticalFlow_create()
    return np.stack([estimator.calc(frames[t], frames[t + 1], None) for t in range(len(frames) - 1)]).astype(np.float32)


def flow_method_record(method: str, settings: FlowSettings | None, pad: bool, frame_size: int) -> dict[str, Any]:
    """What made a flow file: the method, its library and parameters, the input and padding."""
    if method == "tvl1":
        import cv2

        library = f"OpenCV {cv2.__version__} (contrib: cv2.optflow.DualTVL1OpticalFlow)"
        params: dict[str, Any] = tvl1_parameters()
    else:
        library = "mmbalance.prepare.flow.horn_schunck (torch)"
        params = asdict(settings or FlowSettings())
    return {
        "method": method,
        "description": FLOW_METHODS[method],
        "library": library,
        "parameters": params,
        "input": f"sk_color frames start..end-1, resized to {frame_size}x{frame_size} (bilinear), grey BT.601",
        "frames": "T = frames (last pair's flow repeated)" if pad else "T = frames - 1",
    }


def method_id(record: Mapping[str, Any]) -> str:
    """A short stable name for a method record: '<method>-<8 hex of its content>'."""
    digest = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()
    return f"{record.get('method', 'flow')}-{digest[:8]}"


def read_flow_meta(folder: Path) -> dict[str, Any]:
    """The ``mmbalance_flow.json`` of one ``flow_data/<split>`` folder, or an empty record.

    {"format", "methods": {id: record}, "files": {line: id}}. Plain JSON: reading it runs
    nothing. A damaged file is a DataError naming it.
    """
    path = Path(folder) / FLOW_META_FILE
    if not path.is_file():
        return {"format": FLOW_FORMAT, "methods": {}, "files": {}}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(meta.get("methods"), dict) or not isinstance(meta.get("files"), dict):
            raise ValueError("'methods' and 'files' must be objects")
    except (OSError, ValueError, AttributeError) as exc:
        raise DataError(
            f"Flow metadata '{path}' is damaged ({exc}). Delete it and re-run `mmbalance prepare "
            f"nvgesture ... --set overwrite=true`, or leave the flow's origin unrecorded."
        ) from exc
    return meta


def write_flow_meta(folder: Path, meta: Mapping[str, Any]) -> None:
    """Write ``mmbalance_flow.json`` atomically (temporary name, then rename)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FLOW_META_FILE
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def flow_provenance(metas: Mapping[str, Mapping[str, Any]], lines: Mapping[str, list[int]]) -> dict[str, Any]:
    """Which methods made the flow files a run reads: ``lines`` = split -> list lines used,
    ``metas`` = split -> :func:`read_flow_meta`. Returns {"methods": {id: record}, "counts":
    {id or "unrecorded": files}, "method": one id, "mixed", or "unrecorded"}."""
    counts: dict[str, int] = {}
    used: dict[str, Any] = {}
    for split, split_lines in lines.items():
        meta = metas.get(split) or {}
        files, methods = meta.get("files", {}), meta.get("methods", {})
        for line in split_lines:
            mid = files.get(str(line))
            key = mid if mid in methods else "unrecorded"
            counts[key] = counts.get(key, 0) + 1
            if key != "unrecorded":
                used[key] = methods[key]
    kinds = sorted(counts)
    summary = kinds[0] if len(kinds) == 1 else ("mixed" if kinds else "unrecorded")
    return {"method": summary, "methods": used, "counts": counts}


@dataclass(frozen=True)
class FlowSettings:
    """Horn-Schunck parameters; intensities are in [0, 1], so ``alpha`` is on that scale."""

    alpha: float = 0.03
    iterations: int = 30
    warps: int = 2
    levels: int = 4
    sigma: float = 1.0


def _torch_device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device='{name}' was asked for, but no CUDA device is visible. Use device=cpu.")
    return torch.device(name)


def _gaussian_blur(x: Any, sigma: float) -> Any:
    """Separable Gaussian blur of (B, 1, H, W) with replicate borders.

    Written as weighted sums of shifted slices (a 7-tap kernel at sigma 1) rather than
    ``conv2d``: as fast on a free machine and far faster on an oversubscribed CPU.
    """
    import torch

    if sigma <= 0:
        return x
    r = max(1, math.ceil(2.5 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    h, w = x.shape[-2:]
    p = _replicate_pad(x, r, 0)
    x = sum(k[j] * p[..., :, j : j + w] for j in range(2 * r + 1))
    p = _replicate_pad(x, 0, r)
    return sum(k[j] * p[..., j : j + h, :] for j in range(2 * r + 1))


def _replicate_pad(x: Any, rx: int, ry: int) -> Any:
    """Edge padding by clamped indexing.

    ``F.pad(mode="replicate")`` is orders of magnitude slower on CPUs shared with other
    processes (its OpenMP loop stalls when the cores are oversubscribed); indexing is not.
    """
    import torch

    h, w = x.shape[-2:]
    if rx:
        cols = torch.arange(-rx, w + rx, device=x.device).clamp_(0, w - 1)
        x = x.index_select(-1, cols)
    if ry:
        rows = torch.arange(-ry, h + ry, device=x.device).clamp_(0, h - 1)
        x = x.index_select(-2, rows)
    return x


def _gradients(x: Any) -> tuple[Any, Any]:
    """Central differences with replicate borders."""
    p = _replicate_pad(x, 1, 1)
    return (p[..., 1:-1, 2:] - p[..., 1:-1, :-2]) / 2, (p[..., 2:, 1:-1] - p[..., :-2, 1:-1]) / 2


def _neighbour_mean(f: Any) -> Any:
    """Horn & Schunck's weighted neighbourhood average (1/6 edge, 1/12 corner neighbours)."""
    p = _replicate_pad(f, 1, 1)
    sides = p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:]
    corners = p[..., :-2, :-2] + p[..., :-2, 2:] + p[..., 2:, :-2] + p[..., 2:, 2:]
    return sides / 6 + corners / 12


def warp(image: Any, flow: Any) -> Any:
    """Sample ``image`` (B, 1, H, W) at x + flow (bilinear, borders replicated)."""
    import torch
    import torch.nn.functional as F

    _, _, h, w = image.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=image.dtype, device=image.device),
        torch.arange(w, dtype=image.dtype, device=image.device),
        indexing="ij",
    )
    gx = (xs + flow[:, 0]) * (2 / max(w - 1, 1)) - 1
    gy = (ys + flow[:, 1]) * (2 / max(h - 1, 1)) - 1
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _refine(i1: Any, i2: Any, flow: Any, s: FlowSettings) -> Any:
    """Horn-Schunck at one pyramid level, linearised around ``flow`` and re-warped ``warps`` times.

    With I2 warped by the current flow w0, the data term Ix (u - u0) + Iy (v - v0) + It = 0 is
    solved jointly with the smoothness term by HS's Jacobi iteration on the total flow.
    """
    import torch

    for _ in range(s.warps):
        i2w = warp(i2, flow)
        g1x, g1y = _gradients(i1)
        g2x, g2y = _gradients(i2w)
        ix, iy = (g1x + g2x) / 2, (g1y + g2y) / 2
        it = i2w - i1 - ix * flow[:, :1] - iy * flow[:, 1:]
        grad = torch.cat([ix, iy], dim=1)
        inv_denom = 1.0 / (s.alpha**2 + ix**2 + iy**2)
        for _ in range(s.iterations):
            mean = _neighbour_mean(flow)
            r = (ix * mean[:, :1] + iy * mean[:, 1:] + it) * inv_denom
            flow = mean - grad * r
    return flow


def _pyramid(x: Any, levels: int) -> list[Any]:
    """Blur-and-halve levels, finest first; stops before a side drops below 16 pixels."""
    out = [x]
    while len(out) < levels and min(out[-1].shape[-2:]) >= 32:
        y = _gaussian_blur(out[-1], 1.0)
        h, w = (y.shape[-2] // 2) * 2, (y.shape[-1] // 2) * 2
        y = y[..., :h, :w]
        out.append((y[..., 0::2, 0::2] + y[..., 1::2, 0::2] + y[..., 0::2, 1::2] + y[..., 1::2, 1::2]) / 4)
    return out


def horn_schunck(prev: Any, nxt: Any, settings: FlowSettings | None = None) -> Any:
    """Dense optical flow (B, 2, H, W) from grey frames ``prev`` to ``nxt`` (B, H, W) in [0, 1].

    Our own coarse-to-fine Horn & Schunck (1981): Gaussian pre-smoothing, an image pyramid
    (halving down to >= 16 px), and at each level HS's iteration linearised around the
    upsampled coarser flow with the second frame warped by it, so displacements of several
    pixels are recovered. Convention (as OpenCV's): prev(y, x) ~ nxt(y + v, x + u); channel 0
    is u (x, rightwards), channel 1 is v (y, downwards), in pixels.
    """
    import torch
    import torch.nn.functional as F

    s = settings or FlowSettings()
    a = _gaussian_blur(prev.unsqueeze(1).float(), s.sigma)
    b = _gaussian_blur(nxt.unsqueeze(1).float(), s.sigma)
    pa, pb = _pyramid(a, s.levels), _pyramid(b, s.levels)
    flow = torch.zeros(a.shape[0], 2, *pa[-1].shape[-2:], dtype=a.dtype, device=a.device)
    for ia, ib in zip(reversed(pa), reversed(pb), strict=True):
        if flow.shape[-2:] != ia.shape[-2:]:
            sy, sx = ia.shape[-2] / flow.shape[-2], ia.shape[-1] / flow.shape[-1]
            flow = F.interpolate(flow, size=ia.shape[-2:], mode="bilinear", align_corners=False)
            flow = torch.cat([flow[:, :1] * sx, flow[:, 1:] * sy], dim=1)
        flow = _refine(ia, ib, flow, s)
    return flow


def grey(frames: np.ndarray) -> np.ndarray:
    """uint8 RGB (T, H, W, 3) -> float32 luma in [0, 1] (ITU-R BT.601, as OpenCV's RGB2GRAY)."""
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return (frames.astype(np.float32) @ weights) / 255.0
