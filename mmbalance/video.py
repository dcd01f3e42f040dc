"""Reading (and writing) frame ranges of video files with PyAV.

The NVGesture loaders of this line of work read ``sk_color.avi`` / ``sk_depth.avi`` with
OpenCV: seek to the first annotated frame, read ``end - start`` frames into a fixed-length
buffer (missing frames stay zero), and resize each frame bilinearly. The suite reads them
with PyAV (FFmpeg) instead (OpenCV is a dependency only for optical flow and image
augmentation): frames are decoded in presentation order and counted from 0, which is what
OpenCV's frame position means for these constant-frame-rate AVIs. Converting and resizing
happen in one libswscale call per frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np

from mmbalance.errors import DataError

_PIX_FMTS = {"rgb": "rgb24", "bgr": "bgr24"}


def read_frames(
    path: str | Path,
    start: int,
    end: int,
    size: int | tuple[int, int] | None = None,
    order: str = "rgb",
    buffer_len: int | None = None,
) -> np.ndarray:
    """Frames ``start .. end-1`` of a video as uint8 ``(T, H, W, 3)``.

    ``size`` resizes every frame (an int means a square ``size x size``; a pair is
    ``(height, width)``) with bilinear interpolation, like ``cv2.resize``. ``order`` is
    ``"rgb"`` or ``"bgr"`` (OpenCV's order, which the official NVGesture code never converts).
    ``buffer_len`` fixes T: the official loader reads into an 80-slot zero buffer, so a clip
    that ends early leaves zero frames and a longer range is cut. Without it T = end - start
    and a video that ends early is an error.
    """
    if order not in _PIX_FMTS:
        raise ValueError(f"order must be 'rgb' or 'bgr', got {order!r}")
    if end <= start or start < 0:
        raise DataError(f"Video '{path}': bad frame range {start}:{end} (need 0 <= start < end).")
    wanted = end - start if buffer_len is None else min(end - start, buffer_len)
    frames = _decode_range(Path(path), start, start + wanted, size, _PIX_FMTS[order])
    if buffer_len is None and len(frames) < wanted:
        raise DataError(
            f"Video '{path}' has only {start + len(frames)} frames, but frames {start}:{end} "
            f"were asked for. Check the frame range in the split list or re-extract the video."
        )
    return _stack(frames, buffer_len if buffer_len is not None else wanted, path, size)


def _decode_range(
    path: Path, first: int, stop: int, size: int | tuple[int, int] | None, pix_fmt: str
) -> list[np.ndarray]:
    """Decode frames [first, stop) in presentation order, resizing each."""
    height, width = (size, size) if isinstance(size, int) else (size or (None, None))
    try:
        container = av.open(str(path))
    except (av.error.FileNotFoundError, FileNotFoundError) as exc:
        raise DataError(f"Video file '{path}' does not exist.") from exc
    except av.error.FFmpegError as exc:
        raise DataError(f"Could not open video '{path}': {exc}. Is it a valid video file?") from exc
    out: list[np.ndarray] = []
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            if index >= stop:
                break
            if index < first:
                continue
            img = frame.reformat(
                width=width, height=height, format=pix_fmt, interpolation="BILINEAR"
            )
            out.append(img.to_ndarray())
    return out


def _stack(
    frames: list[np.ndarray], length: int, path: str | Path, size: int | tuple[int, int] | None
) -> np.ndarray:
    if frames:
        h, w, c = frames[0].shape
    elif size is not None:
        h, w = (size, size) if isinstance(size, int) else size
        c = 3
    else:
        raise DataError(f"Video '{path}' holds no frames in the requested range.")
    buf = np.zeros((length, h, w, c), dtype=np.uint8)
    for i, f in enumerate(frames[:length]):
        buf[i] = f
    return buf


def count_frames(path: str | Path) -> int:
    """Number of decodable frames (decodes the whole file: exact, not the header's guess)."""
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(container.streams.video[0]))


def write_frames(
    path: str | Path, frames: Sequence[np.ndarray] | np.ndarray, fps: int = 30, codec: str = "mjpeg"
) -> None:
    """Write uint8 RGB frames ``(T, H, W, 3)`` to a video file (AVI with MJPEG by default).

    Used by dataset preparation and by tests to build real fixture clips. MJPEG keeps every
    frame a key frame, so frame-accurate reading is exact; width and height must be even for
    the yuv420p codecs (``mpeg4``).
    """
    arr = np.asarray(frames, dtype=np.uint8)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got shape {arr.shape}")
    pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = int(arr.shape[2]), int(arr.shape[1])
        stream.pix_fmt = pix_fmt
        if codec == "mjpeg":
            stream.options = {"qmin": "1", "qmax": "2"}
        for img in arr:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
