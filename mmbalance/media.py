"""Audio and image helpers shared by the dataset plugins.

The field's loaders compute their inputs with librosa, PIL and torchvision; these functions
reproduce those recipes with soundfile, torchaudio and torch so every plugin gets the same
numbers for the same file (see docs/datasets/cremad.md and docs/datasets/ksounds.md):

* audio: read a WAV (soundfile), mix to mono (channel mean, as ``librosa.load``), resample
  with soxr at HQ quality and fix the length to ``ceil(n * new / old)`` (what
  ``librosa.load(sr=...)`` does by default: its ``res_type`` is ``soxr_hq``), tile/crop to a
  fixed length, clip to [-1, 1];
* "spectrogram" (librosa family): ``log(|STFT| + 1e-7)`` with a periodic Hann window, centred
  frames, so ``frames = 1 + n_samples // hop`` -> shape (1, 1 + n_fft // 2, frames);
* "fbank" (torchaudio family): kaldi fbank of the mean-removed waveform, 128 mel bins, 10 ms
  shift, zero-padded or cut to 1024 frames -> (1024, 128);
* frames: list a clip's frame folder (sorted, or in the filesystem's order as the official
  code does), choose k of them by a named rule (:data:`FRAME_RULES`: IPRM's random sorted
  indices, the first k, OGM-GE's fixed 1, 4, 7, BalanceMM's segments), load as RGB, ImageNet
  train/test transforms;
* audio + frame-folder plugins (CREMA-D, Kinetics-Sounds): their settings, audio input and the
  options of the input cache (:data:`CACHE_OPTIONS`; :func:`train_candidates` says which frames
  it must hold). Their base class, clip indexing and Splits assembly (from the files or from
  :mod:`mmbalance.cache`) are one layer up, in :mod:`mmbalance.av_clips`, so this module never
  imports the cache that reads through it.

Every failure to read a file raises :class:`DataError` naming that file, so a corrupt sample in
a 7,000-clip dataset points at itself instead of at a worker traceback.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mmbalance.config import Option
from mmbalance.data import ModalitySpec
from mmbalance.errors import ConfigError, DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
LOG_EPS = 1e-7
FBANK_SHAPE = (1024, 128)  # the stored kaldi fbanks of OGM-GE / BalanceMM / MLA: (frames, mel)

# ----------------------------------------------------------------------------------- audio


def read_wav(path: str | Path) -> tuple[torch.Tensor, int]:
    """Read a sound file as float32 (channels, samples) in [-1, 1] and its sample rate.

    soundfile scales integer PCM by 1/32768 (int16) like librosa, so values match the field's
    loaders. Any read failure (missing, truncated, not audio) becomes a DataError naming the
    file.
    """
    import soundfile as sf

    p = Path(path)
    if not p.is_file():
        raise DataError(f"Audio file '{p}' does not exist.")
    try:
        data, rate = sf.read(str(p), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise DataError(
            f"Audio file '{p}' is corrupt or not a readable sound file ({exc}). Replace it "
            f"from the raw release (or delete it so the sample is skipped) and run again."
        ) from exc
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(rate)


# What every loader that changes a sample rate uses; recorded with the run (the resampler's
# stop-band leakage is what fills the spectrogram rows above the source's Nyquist frequency).
RESAMPLER = "soxr HQ, length fixed to ceil(n * new / old) (librosa.load's default soxr_hq)"


def soxr_resample(samples: np.ndarray, orig: int, new: int) -> np.ndarray:
    """Resample the last axis of ``samples`` from ``orig`` Hz to ``new`` Hz as librosa does.

    The field's loaders call ``librosa.load(path, sr=new)``, whose default ``res_type`` is
    ``soxr_hq``: libsoxr at HQ quality, then the length fixed to ``ceil(n * new / orig)``
    (zero-padded or cut; soxr itself returns a rounded length) and the input dtype kept.
    Doing the same keeps the rows above the source's Nyquist frequency of a log spectrogram
    (the filter's leakage, tens of dB down) equal to the official inputs'; another filter
    (e.g. torchaudio's default sinc) leaves nats of difference there. Works on (samples,) and
    (channels, samples); identity when the rates are equal.
    """
    import soxr

    if orig == new:
        return samples
    x = np.asarray(samples)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float32)
    n_out = int(np.ceil(x.shape[-1] * (float(new) / orig)))  # librosa's arithmetic
    y = soxr.resample(np.ascontiguousarray(x.T), int(orig), int(new), quality="HQ").T
    if y.shape[-1] < n_out:
        y = np.pad(y, [(0, 0)] * (y.ndim - 1) + [(0, n_out - y.shape[-1])])
    return np.ascontiguousarray(y[..., :n_out], dtype=x.dtype)


def resample(wave: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """Resample the last axis from ``orig`` Hz to ``new`` Hz with :func:`soxr_resample`
    (librosa's default), identity when equal. float32 stays float32."""
    if orig == new:
        return wave
    out = soxr_resample(wave.detach().cpu().numpy(), int(orig), int(new))
    return torch.from_numpy(out).to(wave.device)


def load_audio(path: str | Path, sample_rate: int | None = None, mono: bool = True) -> torch.Tensor:
    """Load a sound file like ``librosa.load(path, sr=sample_rate, mono=mono)``.

    Returns float32 (samples,) when ``mono`` (channel mean, taken before resampling as
    librosa does), else (channels, samples). ``sample_rate=None`` keeps the file's rate;
    another rate is reached with :func:`resample` (soxr HQ, :data:`RESAMPLER`).
    """
    wave, rate = read_wav(path)
    if mono:
        wave = wave.mean(dim=0)
    if sample_rate is not None:
        wave = resample(wave, rate, sample_rate)
    return wave.to(torch.float32)


def tile_to_length(wave: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Repeat the waveform end to end until it has ``num_samples``, then keep the first ones.

    This is the field's loop "tile until at least N seconds, cut to N" (the IGM/AUG KS loader
    doubles, IPRM's CREMA-D loader tiles 20 times: both give this prefix whenever the clip is
    long enough for theirs to reach N). An empty waveform becomes silence, as in the lab code.
    """
    if wave.shape[-1] == 0:
        return wave.new_zeros(*wave.shape[:-1], num_samples)
    reps = math.ceil(num_samples / wave.shape[-1])
    if reps > 1:
        wave = wave.repeat(*([1] * (wave.dim() - 1)), reps)
    return wave[..., :num_samples]


def clip_unit(wave: torch.Tensor) -> torch.Tensor:
    """Clip to [-1, 1] (the loaders do this before the STFT)."""
    return wave.clamp(-1.0, 1.0)


def log_stft(
    wave: torch.Tensor,
    n_fft: int = 512,
    hop_length: int = 353,
    eps: float = LOG_EPS,
    pad_mode: str = "constant",
) -> torch.Tensor:
    """``log(|librosa.stft(wave, n_fft, hop_length)| + eps)`` as a (1 + n_fft // 2, T) tensor.

    librosa's defaults: periodic Hann window of length n_fft, centred frames (n_fft // 2
    padding each side), so T = 1 + len(wave) // hop_length. ``pad_mode`` "constant" (zeros) is
    librosa >= 0.10's default; older librosa reflected.
    """
    wave = wave.to(torch.float32)
    if pad_mode == "reflect" and wave.shape[-1] <= n_fft // 2:
        pad_mode = "constant"  # reflection needs more samples than the pad
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float32, device=wave.device)
    spec = torch.stft(
        wave,
        n_fft=n_fft,
        hop_length=hop_length,
        win_length=n_fft,
        window=window,
        center=True,
        pad_mode=pad_mode,
        return_complex=True,
    )
    return torch.log(spec.abs() + eps)


def wav_to_log_spectrogram(
    path: str | Path,
    sample_rate: int,
    seconds: float,
    n_fft: int = 512,
    hop_length: int = 353,
) -> torch.Tensor:
    """The librosa-family audio input of CREMA-D / Kinetics-Sounds: (1, F, T) float32.

    load mono at ``sample_rate`` -> tile/crop to ``seconds`` -> clip to [-1, 1] -> log STFT.
    """
    wave = load_audio(path, sample_rate)
    wave = clip_unit(tile_to_length(wave, int(round(sample_rate * seconds))))
    return log_stft(wave, n_fft, hop_length).unsqueeze(0).contiguous()


def spectrogram_shape(sample_rate: int, seconds: float, n_fft: int = 512, hop_length: int = 353) -> tuple[int, int, int]:
    """The (1, F, T) shape :func:`wav_to_log_spectrogram` returns, without reading a file."""
    return (1, 1 + n_fft // 2, 1 + int(round(sample_rate * seconds)) // hop_length)


def kaldi_fbank(
    wave: torch.Tensor,
    sample_rate: int,
    num_mel_bins: int = 128,
    target_frames: int | None = 1024,
    frame_shift_ms: float = 10.0,
    frame_length_ms: float = 25.0,
) -> torch.Tensor:
    """The torchaudio-family audio input: kaldi fbank of the mean-removed waveform.

    htk_compat, no energy, Hann ("hanning") window, no dither; then zero-padded or cut to
    ``target_frames`` (None keeps every frame). Returns float32 (frames, num_mel_bins), time
    first, as the ``.npy`` files of OGM-GE / BalanceMM / MLA store it.
    """
    from torchaudio.compliance import kaldi

    if wave.dim() == 1:
        wave = wave.unsqueeze(0)
    wave = wave.to(torch.float32)
    wave = wave - wave.mean()
    feats = kaldi.fbank(
        wave,
        htk_compat=True,
        sample_frequency=float(sample_rate),
        use_energy=False,
        window_type="hanning",
        num_mel_bins=num_mel_bins,
        dither=0.0,
        frame_shift=frame_shift_ms,
        frame_length=frame_length_ms,
    )
    if target_frames is not None:
        feats = pad_or_cut(feats, target_frames)
    return feats.to(torch.float32)


def pad_or_cut(feats: torch.Tensor, frames: int) -> torch.Tensor:
    """Zero-pad or cut the first axis to ``frames`` rows."""
    n = feats.shape[0]
    if n < frames:
        return torch.nn.functional.pad(feats, (0, 0, 0, frames - n))
    return feats[:frames]


def normalise_fbank(feats: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """AST-style normalisation ``(x - mean) / (2 std)`` (OGM-GE's KS: mean -4.503877, std 5.141276)."""
    return (feats - mean) / (2.0 * std)


def load_npy_feature(path: str | Path, ndim: int | None = None) -> torch.Tensor:
    """Load a precomputed feature array (.npy) as float32, DataError naming a bad file."""
    p = Path(path)
    try:
        arr = np.load(p, allow_pickle=False)
    except Exception as exc:
        raise DataError(
            f"Feature file '{p}' is missing, corrupt or not a .npy array ({exc})."
        ) from exc
    if ndim is not None and arr.ndim != ndim:
        raise DataError(
            f"Feature file '{p}' holds an array of shape {arr.shape}; expected {ndim} "
            f"dimensions."
        )
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


# ----------------------------------------------------------------------------------- images


def list_frames(folder: str | Path, sort: bool = True) -> list[str]:
    """Image file names in a clip's frame folder.

    ``sort=False`` keeps ``os.listdir`` order, which is what the official loaders index into
    (and which differs between filesystems, hence the sorted default).
    """
    try:
        names = os.listdir(folder)
    except OSError as exc:
        raise DataError(f"Frame folder '{folder}' cannot be listed ({exc}).") from exc
    names = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")]
    return sorted(names) if sort else names


def count_frames(folder: str | Path) -> int:
    """How many image files a frame folder holds (0 when it does not exist)."""
    try:
        return len(list_frames(folder, sort=False))
    except DataError:
        return 0


# How a loader picks k of a clip's n listed frames (indices into the listing), per source.
FRAME_RULES: dict[str, str] = {
    "random": "train: k distinct random indices, sorted (IPRM's CREMA-D rule); eval: the first k",
    "first": "train and eval: the first k of the listing (IGM/AUG's KS loader: it draws random "
    "indices but reads the first k entries)",
    "ogm_fixed": "train and eval: indices (n // k) * i + 1 for i < k, i.e. frames 1, 4, 7 of "
    "10 (OGM-GE's AV loader)",
    "segments": "k equal segments of s = n // k frames; train: a random index in "
    "[i*s + 1, i*s + s] capped at 9, eval: i*s + max(s // 2, 1); index 1 for all when n <= 6 "
    "(BalanceMM's KS loader)",
}


def choose_frames(available: int, k: int, train: bool, rule: str = "random") -> list[int]:
    """Which of ``available`` listed frames to read, by one of :data:`FRAME_RULES`.

    The rules are the official loaders' (each source picks frames its own way, and the pick
    changes what a visual encoder sees). ``random`` (IPRM's CREMA-D rule) draws in train k
    distinct indices, sorted, from torch's global RNG (the trainer's per-epoch / per-worker
    seeding makes them reproducible) and reads the first k in eval. ``first`` reads the first
    k in both (IGM's KS loader). ``ogm_fixed`` reads ``(n // k) * i + 1`` in both (OGM-GE:
    frames 1, 4, 7 of a 10-frame folder; the official code opens ``frame_0000{t}.jpg``, which
    is index t of a sorted 0-based folder). ``segments`` is BalanceMM's: k segments of
    ``s = n // k``; train draws t uniformly in ``[i*s + 1, i*s + s]`` (capped at 9, as its
    one-digit file names force), eval takes ``i*s + max(s // 2, 1)``; with n <= 6 every pick
    is index 1. Fewer frames than a rule needs -> DataError (the plugins drop such clips when
    indexing).
    """
    if rule not in FRAME_RULES:
        raise ConfigError(f"Unknown frame rule '{rule}'. Use one of {', '.join(FRAME_RULES)}.")
    if available < k:
        raise DataError(f"Need {k} frames but the clip has only {available}.")
    seg = available // k
    if rule == "first" or (rule == "random" and not train):
        picks = list(range(k))
    elif rule == "random":
        picks = sorted(torch.randperm(available)[:k].tolist())
    elif rule == "ogm_fixed":
        picks = [seg * i + 1 for i in range(k)]
    elif available <= 6:  # segments, a short folder
        picks = [1] * k
    elif train:
        picks = [min(int(torch.randint(i * seg + 1, i * seg + seg + 1, ()).item()), 9) for i in range(k)]
    else:
        picks = [i * seg + max(seg // 2, 1) for i in range(k)]
    if max(picks) >= available:
        raise DataError(
            f"The '{rule}' frame rule picks index {max(picks)} of a clip with only {available} "
            f"frames; it needs at least {max(picks) + 1}."
        )
    return picks


def train_candidates(available: int, k: int, rule: str = "random") -> list[int]:
    """Every listing index :func:`choose_frames` can return in train mode, sorted.

    What an input cache must hold per clip so a train-time draw never misses (mmbalance.cache):
    ``random`` can pick any of the n frames; ``first`` and ``ogm_fixed`` are deterministic;
    ``segments`` draws within each segment, capped at index 9 (index 1 when n <= 6). Fewer
    frames than ``k`` -> DataError, as in :func:`choose_frames`.
    """
    if rule not in FRAME_RULES:
        raise ConfigError(f"Unknown frame rule '{rule}'. Use one of {', '.join(FRAME_RULES)}.")
    if available < k:
        raise DataError(f"Need {k} frames but the clip has only {available}.")
    seg = available // k
    if rule == "random":
        picks = set(range(available))
    elif rule in ("first", "ogm_fixed"):
        picks = set(choose_frames(available, k, True, rule))
    elif available <= 6:
        picks = {1}
    else:
        picks = {min(t, 9) for i in range(k) for t in range(i * seg + 1, i * seg + seg + 1)}
    return sorted(t for t in picks if t < available)


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file as an RGB PIL image; DataError naming the file if it is unreadable."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as exc:
        raise DataError(
            f"Image file '{path}' is missing, corrupt or not an image ({exc})."
        ) from exc


def imagenet_transform(train: bool, size: int = 224) -> Callable[[Image.Image], torch.Tensor]:
    """The field's frame transforms, ImageNet-normalised.

    Train: RandomResizedCrop(size) + horizontal flip (torch's global RNG). Test:
    Resize((size, size)), no crop.
    """
    from torchvision import transforms as T

    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train:
        return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *norm])
    return T.Compose([T.Resize((size, size)), *norm])


def load_frame_stack(
    paths: Sequence[str | Path], transform: Callable[[Image.Image], torch.Tensor]
) -> torch.Tensor:
    """Load frames, transform each independently (as the official loaders do), stack to
    (C, T, H, W) float32."""
    frames = [transform(load_rgb(p)) for p in paths]
    return torch.stack(frames, dim=1).to(torch.float32).contiguous()


def read_text_lines(path: str | Path) -> list[str]:
    """Non-empty lines of a list/csv file: UTF-8 with optional BOM, CRLF stripped."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"List file '{p}' cannot be read as UTF-8 text ({exc}).") from exc
    return [ln.strip("\r\n\t ") for ln in text.splitlines() if ln.strip("\r\n\t ")]


# ------------------------------------------------------------------------- clip datasets


@dataclass(frozen=True)
class Clip:
    """One audio-visual sample on disk: an audio source and a folder of frames."""

    clip_id: str
    label: int
    audio: Path  # a sound file or a precomputed feature file, per the dataset's audio loader
    frame_dir: Path
    frame_names: tuple[str, ...]  # the folder listing, in the order frames are indexed


class AVClipDataset(Dataset):
    """Audio + frame-folder clips as the contract's dicts ``{"audio", "visual", "label", "index"}``.

    ``audio_loader`` maps a clip's audio path to a (1, F, T) float32 tensor (a
    ``functools.partial`` of a module-level function, so worker processes can pickle it).
    ``frame_rule`` (one of :data:`FRAME_RULES`) picks the k frames; train mode crops at random
    from torch's global RNG, eval mode resizes. Modalities not in ``modalities`` are never read.
    """

    def __init__(
        self,
        clips: Sequence[Clip],
        modalities: Sequence[str],
        audio_loader: Callable[[Path], torch.Tensor],
        frames: int,
        image_size: int,
        train: bool,
        fix: str = "",
        frame_rule: str = "random",
    ) -> None:
        if frame_rule not in FRAME_RULES:
            raise ConfigError(f"Unknown frame rule '{frame_rule}'. Use one of {', '.join(FRAME_RULES)}.")
        self.frame_rule = frame_rule
        self.clips = list(clips)
        self.fix = fix  # appended to a broken file's DataError: the dataset's own remedy
        self.modalities = tuple(modalities)
        self.audio_loader = audio_loader
        self.frames = frames
        self.image_size = image_size
        self.train = train
        self.transform = imagenet_transform(train, image_size)

    def __len__(self) -> int:
        return len(self.clips)

    def eval_view(self) -> AVClipDataset:
        """The same clips read as evaluation reads them (fixed frames, resize, no flip)."""
        return AVClipDataset(self.clips, self.modalities, self.audio_loader, self.frames, self.image_size,
                             False, self.fix, self.frame_rule)

    @property
    def labels(self) -> np.ndarray:
        return np.array([c.label for c in self.clips], dtype=np.int64)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            return self._item(i)
        except DataError as exc:
            if not self.fix:
                raise
            raise DataError(f"{exc} {self.fix}") from exc

    def _item(self, i: int) -> dict[str, Any]:
        clip = self.clips[i]
        item: dict[str, Any] = {}
        if "audio" in self.modalities:
            item["audio"] = self.audio_loader(clip.audio)
        if "visual" in self.modalities:
            picks = choose_frames(len(clip.frame_names), self.frames, self.train, self.frame_rule)
            paths = [clip.frame_dir / clip.frame_names[k] for k in picks]
            item["visual"] = load_frame_stack(paths, self.transform)
        item["label"] = int(clip.label)
        item["index"] = int(i)
        return item


def load_log_spectrogram(
    path: Path, sample_rate: int, seconds: float, n_fft: int, hop_length: int
) -> torch.Tensor:
    """Audio loader for :class:`AVClipDataset`: a WAV -> (1, F, T) log spectrogram."""
    return wav_to_log_spectrogram(path, sample_rate, seconds, n_fft, hop_length)


def load_fbank_npy(path: Path, shape: tuple[int, int] | None = None) -> torch.Tensor:
    """Audio loader for :class:`AVClipDataset`: a stored (frames, mel) fbank -> (1, frames, mel)."""
    feats = load_npy_feature(path, ndim=2)
    if shape is not None and tuple(feats.shape) != tuple(shape):
        raise DataError(
            f"Feature file '{path}' has shape {tuple(feats.shape)}; expected {tuple(shape)}."
        )
    return feats.unsqueeze(0).contiguous()


@dataclass(frozen=True)
class AudioInput:
    """How an audio-visual dataset turns a clip's audio file into its input tensor.

    ``loader`` is the :class:`AVClipDataset` audio loader (a picklable ``functools.partial``),
    ``spec`` the ModalitySpec it yields, ``rule`` the recipe recorded with the run.
    """

    loader: Callable[[Path], torch.Tensor]
    spec: ModalitySpec
    rule: str
    resampler: str | None = None  # how a sound file reaches the input's rate (None: no audio read)


def log_spectrogram_input(sample_rate: int, seconds: float, n_fft: int, hop_length: int) -> AudioInput:
    """The librosa-family input: WAVs -> (1, F, T) log spectrograms (:func:`wav_to_log_spectrogram`)."""
    shape = spectrogram_shape(sample_rate, seconds, n_fft, hop_length)
    return AudioInput(
        loader=functools.partial(
            load_log_spectrogram, sample_rate=sample_rate, seconds=seconds, n_fft=n_fft,
            hop_length=hop_length,
        ),
        spec=ModalitySpec(
            "spectrogram", shape, {"sample_rate": sample_rate, "seconds": seconds, "resampler": "soxr_hq"}
        ),
        rule=f"wav -> mono {sample_rate} Hz (resampled by {RESAMPLER}) -> tiled/cut to "
        f"{seconds:g} s -> clip [-1, 1] -> log(|STFT {n_fft}/{hop_length}, Hann, centred| + "
        f"1e-7) -> {shape}",
        resampler=RESAMPLER,
    )


def stored_fbank_input(feature: str, note: str) -> AudioInput:
    """The torchaudio-family input as released: stored (1024, 128) fbank .npy -> (1, 1024, 128).

    ``feature`` names it in the ModalitySpec; ``note`` (e.g. ", unnormalised") goes in the rule.
    """
    return AudioInput(
        loader=functools.partial(load_fbank_npy, shape=FBANK_SHAPE),
        spec=ModalitySpec("spectrogram", (1, *FBANK_SHAPE), {"feature": feature}),
        rule=f"stored kaldi fbank .npy (1024, 128){note} -> (1, 1024, 128)",
    )


MANIFEST_MODES = (True, False, "warn")

# The input-cache options of the audio + frames plugins (mmbalance.cache).
CACHE_OPTIONS: dict[str, Option] = {
    "cache": Option(
        None,
        "folder of an input cache (memory-mapped spectrograms / fbanks, uint8 frames; see "
        "mmbalance.cache): built there on first use (or by `mmbalance prepare DATASET ... --set "
        "cache=DIR`), refused when built for other data or settings; default: read the files",
        type=str,
        changes_results=False,  # where the decoded inputs are kept, not what they hold
    ),
    "cache_frame_size": Option(
        360,
        "input cache: largest shorter side (pixels) of the stored train frames; the most common "
        "frame size is stored as it is when its shorter side is at most this (exact crops)",
        min=16,
    ),
}


class MissingSamplesWarning(UserWarning):
    """Listed samples whose files are absent were skipped (``check_manifest=warn``)."""


def manifest_mode(value: Any) -> str:
    """``check_manifest`` -> "strict" (true, the default), "off" (false) or "warn"."""
    if value == "warn":
        return "warn"
    return "strict" if value is None or bool(value) else "off"


def warn_missing(dataset: str, split: str, listed: Sequence[str], usable: Sequence[str]) -> str | None:
    """Warn (:class:`MissingSamplesWarning`) how many listed samples were skipped for lack of
    files, as ``check_manifest=warn`` promises (the official loaders skip them silently);
    returns the message, or None when nothing is missing."""
    import warnings

    have = set(usable)
    missing = [i for i in listed if i not in have]
    if not missing:
        return None
    msg = (
        f"Dataset '{dataset}', split '{split}': {len(missing)} of {len(listed)} listed samples "
        f"have no files and are skipped (e.g. {', '.join(missing[:3])}); check_manifest=warn "
        f"goes on with {len(usable)}, as the official loader does silently."
    )
    warnings.warn(msg, MissingSamplesWarning, stacklevel=2)
    return msg


@dataclass(frozen=True)
class AVSettings:
    """What an audio + frames plugin resolves from its options (its own settings extend it)."""

    layout: str
    frames: int  # frames read per clip
    audio: AudioInput
    list_dir: Path
    image_size: int
    sort_frames: bool
    strict: bool  # check_manifest is true: a manifest mismatch is an error
    class_order: str
    # check_manifest as "strict" | "off" | "warn" (skip missing clips, warn with their count)
    manifest: str = field(default="strict", kw_only=True)
    frame_rule: str = field(default="random", kw_only=True)  # a key of FRAME_RULES
    # the input cache (mmbalance.cache): its folder (None = read the files) and the largest
    # shorter side of the train frames it stores
    cache: str | None = field(default=None, kw_only=True)
    cache_frame_size: int = field(default=360, kw_only=True)

    @classmethod
    def from_options(
        cls,
        cfg: Mapping[str, Any],
        dataset: str,
        root: Path,
        *,
        layout: str,
        frames: int,
        seconds: float | None,
        list_dir: str | Path,
        stored_fbank: AudioInput | None,
        default_rate: int,
        default_order: str,
        frame_rule: str = "random",
        **extra: Any,
    ) -> Self:
        """The settings from the options both AV plugins read alike; ``extra`` fills the
        subclass's own fields.

        Checks ``frames`` and ``seconds`` (the audio_seconds in effect), then reads the audio as
        ``stored_fbank`` when the layout stores fbanks, else as log spectrograms of
        ``sample_rate`` (default ``default_rate``), n_fft and hop_length; ``list_dir`` is joined
        to ``root`` (an absolute one wins the join). ``check_manifest`` may be true, false or
        "warn"; ``frame_rule`` is the :data:`FRAME_RULES` key the plugin chose.
        """
        if frames < 1:
            raise ConfigError(f"Dataset '{dataset}': frames must be at least 1, got {frames}.")
        if seconds is not None and seconds <= 0:
            raise ConfigError(f"Dataset '{dataset}': audio_seconds must be positive, got {seconds}.")
        if frame_rule not in FRAME_RULES:
            raise ConfigError(f"Dataset '{dataset}': unknown frame rule '{frame_rule}'.")
        manifest = manifest_mode(cfg.get("check_manifest", True))
        audio = stored_fbank or log_spectrogram_input(
            int(cfg.get("sample_rate", default_rate)), float(seconds or 0.0),
            int(cfg.get("n_fft", 512)), int(cfg.get("hop_length", 353)),
        )
        return cls(
            layout=layout,
            frames=frames,
            audio=audio,
            list_dir=root / Path(list_dir).expanduser(),
            image_size=int(cfg.get("image_size", 224)),
            sort_frames=bool(cfg.get("sort_frames", True)),
            strict=manifest == "strict",
            class_order=str(cfg.get("class_order", default_order)),
            manifest=manifest,
            frame_rule=frame_rule,
            cache=str(cfg["cache"]) if cfg.get("cache") else None,
            cache_frame_size=int(cfg.get("cache_frame_size") or 360),
            **extra,
        )
