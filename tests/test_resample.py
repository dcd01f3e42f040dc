"""Resampling as librosa.load does (soxr HQ), checked on real 8 kHz speech (shared/data/fsdd).

The official loaders call ``librosa.load(path, sr=...)``, whose default resampler is soxr at
HQ quality followed by a length fix to ``ceil(n * new / old)``. When 8 kHz audio is upsampled
to 22,050 Hz, every log-spectrogram row above 4 kHz (the source's Nyquist frequency) holds
only the resampler's leakage, so it is there that another filter shows: the reference below
is soxr plus a float64 STFT written by hand, and torchaudio's default resampler, the suite's
former one, serves as the negative control that this band can tell resamplers apart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from mmbalance import media

SRC, DST = 8000, 22050
N_FFT, HOP = 512, 353
RECORDINGS = ("0_george_0.wav", "3_jackson_12.wav", "7_theo_45.wav", "9_yweweler_3.wav")


def _recordings(shared_data: Path) -> list[Path]:
    paths = [shared_data / "fsdd" / "recordings" / name for name in RECORDINGS]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        pytest.skip(f"fsdd recordings {missing} not in the shared data")
    return paths


def _soxr_like_librosa(x: np.ndarray, orig: int, new: int) -> np.ndarray:
    """librosa.resample(res_type='soxr_hq'): soxr HQ, then zero-pad / cut to ceil(n * ratio)."""
    y = soxr.resample(x, orig, new, quality="soxr_hq")
    n = int(np.ceil(len(x) * new / orig))
    return np.pad(y, (0, max(0, n - len(y))))[:n]


def _hand_log_stft(x: np.ndarray) -> np.ndarray:
    """log(|STFT| + 1e-7) in float64: periodic Hann, centred zero-padded frames (librosa)."""
    padded = np.pad(x.astype(np.float64), N_FFT // 2)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)
    frames = 1 + len(x) // HOP
    mag = np.stack(
        [np.abs(np.fft.rfft(padded[t * HOP : t * HOP + N_FFT] * window)) for t in range(frames)], axis=1
    )
    return np.log(mag + 1e-7)


def _tile_clip(y: np.ndarray, n: int) -> np.ndarray:
    return np.clip(np.tile(y, int(np.ceil(n / len(y))))[:n], -1.0, 1.0)


def _above_nyquist() -> np.ndarray:
    """Rows whose centre frequency is above the source's Nyquist (4 kHz) plus one bin."""
    freqs = np.arange(1 + N_FFT // 2) * DST / N_FFT
    return freqs > SRC / 2 + DST / N_FFT


def test_upsampled_recording_log_spectrogram_matches_soxr_above_source_nyquist(shared_data):
    band = _above_nyquist()
    assert band.sum() == 163  # bins 94..256: 4.05 to 11.0 kHz at 43 Hz per bin
    for path in _recordings(shared_data):
        raw, rate = sf.read(str(path), dtype="float32")
        assert rate == SRC and raw.ndim == 1
        ref = _hand_log_stft(_tile_clip(_soxr_like_librosa(raw, SRC, DST), DST))
        suite = media.wav_to_log_spectrogram(path, DST, 1.0, N_FFT, HOP)[0].numpy()
        assert suite.shape == ref.shape == (257, 63)
        # Above 4 kHz there is nothing but leakage near -13 nats; float32 vs float64 STFT
        # rounding alone leaves ~0.1 there, another resampler leaves several nats.
        assert np.abs(suite - ref)[band].mean() < 0.3, path.name
        assert np.abs(suite - ref)[~band].mean() < 0.01, path.name

        # Negative control: torchaudio's default sinc filter (the suite's former resampler).
        import torchaudio

        other = torchaudio.functional.resample(torch.from_numpy(raw), SRC, DST).numpy()
        wrong = media.log_stft(torch.from_numpy(_tile_clip(other, DST).astype(np.float32)), N_FFT, HOP).numpy()
        assert np.abs(wrong - ref)[band].mean() > 2.0, path.name
        speech = np.arange(1 + N_FFT // 2) * DST / N_FFT < 0.9 * SRC / 2  # clear of the filter edge
        assert np.abs(wrong - ref)[speech].mean() < 0.1  # it agrees where the speech is


def test_load_audio_is_soxr_hq_with_librosas_length(shared_data):
    path = _recordings(shared_data)[0]
    raw, _ = sf.read(str(path), dtype="float32")
    wave = media.load_audio(path, DST)
    assert wave.dtype == torch.float32
    n = int(np.ceil(len(raw) * DST / SRC))  # librosa's fix_length target
    assert wave.shape == (n,)
    assert len(soxr.resample(raw, SRC, DST, quality="HQ")) in (n - 1, n)  # soxr alone rounds
    np.testing.assert_array_equal(wave.numpy(), _soxr_like_librosa(raw, SRC, DST))
    assert torch.equal(media.load_audio(path, SRC), torch.from_numpy(raw))  # no-op at the same rate


def test_soxr_resample_hand_cases():
    x = np.zeros(1148, dtype=np.float32)  # the shortest fsdd clip's length
    y = media.soxr_resample(x, 8000, 22050)
    assert y.shape == (3165,) and y.dtype == np.float32  # ceil(1148 * 2.75625) = ceil(3164.175)
    assert not y.any()  # silence stays silence
    # a 1 kHz tone keeps its frequency and (away from the edges) its amplitude
    t = np.arange(16000) / 16000
    tone = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    up = media.soxr_resample(tone, 16000, 22050)
    assert up.shape == (22050,)
    spectrum = np.abs(np.fft.rfft(up))
    assert abs(np.argmax(spectrum) * 22050 / len(up) - 1000) < 2
    assert abs(np.abs(up[2000:-2000]).max() - 0.5) < 0.01
    # (channels, samples): each channel alone, as librosa transposes for soxr
    both = np.stack([tone, -tone])
    out = media.soxr_resample(both, 16000, 22050)
    assert out.shape == (2, 22050)
    np.testing.assert_allclose(out[1], -out[0], atol=1e-6)
    np.testing.assert_allclose(out[0], up, atol=1e-6)
    assert media.soxr_resample(tone, 16000, 16000) is tone
    # the torch wrapper: same numbers, float32, on the input's device
    wave = media.resample(torch.from_numpy(tone), 16000, 22050)
    assert wave.dtype == torch.float32 and np.array_equal(wave.numpy(), up)


def test_stereo_is_mixed_to_mono_before_resampling(tmp_path):
    t = np.arange(8000) / 8000
    left = 0.4 * np.sin(2 * np.pi * 300 * t)
    right = 0.2 * np.sin(2 * np.pi * 700 * t)
    sf.write(str(tmp_path / "st.wav"), np.stack([left, right], axis=1), 8000, subtype="PCM_16")
    data, _ = sf.read(str(tmp_path / "st.wav"), dtype="float32")
    expect = _soxr_like_librosa(data.mean(axis=1), SRC, DST)
    np.testing.assert_array_equal(media.load_audio(tmp_path / "st.wav", DST).numpy(), expect)


def test_loaders_record_the_resampler():
    spec = media.log_spectrogram_input(22050, 3.0, N_FFT, HOP)
    assert spec.resampler == media.RESAMPLER and "soxr" in spec.rule
    assert spec.spec.extras["resampler"] == "soxr_hq"
    assert media.stored_fbank_input("kaldi fbank", "").resampler is None  # no sound file read
