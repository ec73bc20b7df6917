"""The audio front end against transformers: `Gemma4AudioFeatureExtractor` (log-mel, masks, padding, 30 s cut),
`load_audio(..., backend="soundfile")` (decoding, downmix, resampling) and the processor's soft-token counts.

Features must agree to 1e-5 on the log scale (they agree bit for bit: same float32/float64 steps). Resampling is
ours, so resampled inputs are compared with the extractor fed the same 16 kHz signal, and the resampled signal
itself with transformers' loader (same soxr call) and with the analytic tone.

Needs soundfile, soxr and the `espeak-ng` program (apt-get install espeak-ng). Without them the tests skip,
except under CI (env CI=1/true), where a missing dependency fails.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import subprocess
import types

import numpy as np
import pytest
import transformers
from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

from gemma4_jax import audio_features as af
from gemma4_jax.errors import Gemma4Error

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TOLERANCE = 1e-5  # max abs difference of log-mel values


def _require(available: bool, what: str) -> None:
    if not available:
        if IN_CI:
            pytest.fail(f"{what} is required under CI")
        pytest.skip(f"{what} is not installed")


@pytest.fixture(scope="module")
def sf():
    installed = all(importlib.util.find_spec(name) is not None for name in ("soundfile", "soxr"))
    _require(installed, "soundfile + soxr (pip install soundfile soxr)")
    import soundfile

    return soundfile


@pytest.fixture(scope="module")
def extractor():
    return transformers.Gemma4AudioFeatureExtractor()


def _hf_features(extractor, clips):
    # Always a list: the extractor mishandles a single un-batched array (it pads the wrong axis); its processor
    # always passes a list.
    out = extractor(list(clips), return_tensors="np")
    return out["input_features"], out["input_features_mask"]


def _assert_features_match(extractor, clips):
    expected, expected_mask = _hf_features(extractor, clips)
    features, mask = af.log_mel_features(list(clips))
    assert features.shape == expected.shape and features.dtype == np.float32
    assert np.array_equal(mask, expected_mask)
    error = np.abs(features - expected).max()
    assert error <= TOLERANCE, f"log-mel max abs error {error:.3g}"
    for clip, clip_mask in zip(clips, mask, strict=True):
        assert clip_mask.sum() == af.num_mel_frames(len(clip))
    return features, mask


def _hf_load(path, rate=af.SAMPLE_RATE):
    return transformers.audio_utils.load_audio(str(path), rate, backend="soundfile")


def _sweep(seconds, rate=af.SAMPLE_RATE, f0=50.0, f1=7_900.0, amplitude=0.5):
    """Exponential sine sweep f0 -> f1 Hz."""
    t = np.arange(round(seconds * rate)) / rate
    k = math.log(f1 / f0) / max(seconds, 1e-9)
    return (amplitude * np.sin(2 * np.pi * f0 * (np.exp(k * t) - 1) / k)).astype(np.float32)


# ----- real speech ---------------------------------------------------------------------------------------------

PHRASES = [
    "The quick brown fox jumps over the lazy dog.",
    "Gemma four listens: one, two, three.",
    "Audio soft tokens arrive every forty milliseconds, and the encoder sees twelve frames of context.",
]


@pytest.fixture(scope="module")
def speech_files(tmp_path_factory, sf):
    _require(shutil.which("espeak-ng") is not None, "espeak-ng (apt-get install espeak-ng)")
    folder = tmp_path_factory.mktemp("speech")
    paths = []
    for i, text in enumerate(PHRASES):
        path = folder / f"phrase{i}.wav"
        subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
        paths.append(path)
    return paths


def test_espeak_speech_matches_extractor(speech_files, extractor, sf):
    clips = []
    for path in speech_files:
        assert sf.info(str(path)).samplerate != af.SAMPLE_RATE  # espeak's native rate (22 050 Hz): resampled
        clip = af.load_audio(path)
        assert np.array_equal(clip, _hf_load(path))  # same decode + soxr_hq as transformers' soundfile backend
        assert np.abs(clip).max() > 0.05  # really speech, not silence
        _assert_features_match(extractor, [clip])
        clips.append(clip)
    # as one batch: different lengths, so the shorter clips are padded and their tail frames masked
    features, mask = _assert_features_match(extractor, clips)
    assert len({int(m.sum()) for m in mask}) == len(clips)
    got_features, got_mask, tokens = af.file_features(speech_files)
    assert np.array_equal(got_features, features) and np.array_equal(got_mask, mask)
    assert tokens == [af.num_audio_tokens(len(c)) for c in clips]


# ----- synthetic signals -------------------------------------------------------------------------------------


def _signal(kind, seconds):
    n = round(seconds * af.SAMPLE_RATE)
    rng = np.random.default_rng(int(seconds * 1000))
    if kind == "sweep":
        return _sweep(seconds)
    if kind == "silence":
        return np.zeros(n, np.float32)
    if kind == "clipped":  # a loud tone hard-clipped at full scale
        return np.clip(3 * _sweep(seconds, f0=220, f1=440), -1, 1).astype(np.float32)
    if kind == "over_range":  # samples beyond [-1, 1] are not clipped by the extractor either
        return (2.5 * _sweep(seconds)).astype(np.float32)
    if kind == "noise":
        return (0.1 * rng.standard_normal(n)).astype(np.float32)
    if kind == "impulses":
        x = np.zeros(n, np.float32)
        x[rng.integers(0, n, 20)] = 1.0
        return x
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["sweep", "silence", "clipped", "over_range", "noise", "impulses"])
def test_signals_match_extractor(extractor, kind):
    _assert_features_match(extractor, [_signal(kind, 1.7)])


@pytest.mark.parametrize("seconds", [0.1, 0.5, 1.0, 2.5, 10.0, 30.0, 45.0])
def test_lengths_match_extractor(extractor, seconds):
    clip = _signal("sweep", seconds)
    features, mask = _assert_features_match(extractor, [clip])
    if seconds > 30:  # transformers truncates to 30 s; so do we
        assert mask.sum() == af.num_mel_frames(af.MAX_SAMPLES) == 2999
        np.testing.assert_array_equal(features, af.log_mel_features(clip[: af.MAX_SAMPLES])[0])


def test_batch_padding_matches_extractor(extractor):
    """Lengths that are and are not multiples of 128 samples, shorter and longer than 30 s, in one batch."""
    lengths = [161, 1_600, 16_000, 23_457, 480_000, 700_001]
    clips = [_signal("noise", n / af.SAMPLE_RATE)[:n] for n in lengths]
    features, mask = _assert_features_match(extractor, clips)
    assert features.shape[1] == 2999
    assert not features[~mask].any()  # invalid frames are zero


def test_float64_input_is_computed_in_float32(extractor):
    clip = _signal("sweep", 0.8).astype(np.float64) + 1e-9  # the extractor casts to float32 before framing
    features, _ = _assert_features_match(extractor, [clip])
    np.testing.assert_array_equal(features, af.log_mel_features(clip.astype(np.float32))[0])


def test_mel_filters_and_window_equal_extractor(extractor):
    assert np.array_equal(af.mel_filter_bank(), extractor.mel_filters)
    assert np.array_equal(af._WINDOW, extractor.window)


# ----- files: sample rates, channels, formats --------------------------------------------------------------------


@pytest.mark.parametrize("rate", [8_000, 16_000, 22_050, 44_100, 48_000])
def test_sample_rates(tmp_path, extractor, sf, rate):
    seconds = 1.3
    path = tmp_path / f"sweep{rate}.wav"
    sf.write(str(path), _sweep(seconds, rate, f1=min(7_900.0, 0.45 * rate)), rate, subtype="FLOAT")
    clip = af.load_audio(path)
    n = round(seconds * rate)
    assert clip.dtype == np.float32 and len(clip) == math.ceil(n * af.SAMPLE_RATE / rate)
    assert np.array_equal(clip, _hf_load(path))
    _assert_features_match(extractor, [clip])


@pytest.mark.parametrize("rate", [8_000, 22_050, 44_100, 48_000])
def test_resampling_is_accurate(sf, rate):
    """A 1 kHz tone resampled to 16 kHz is the 1 kHz tone at 16 kHz (away from the edges)."""
    seconds, tone = 0.5, 1_000.0
    x = np.sin(2 * np.pi * tone * np.arange(round(seconds * rate)) / rate).astype(np.float32)
    y = af.resample(x, rate)
    expected = np.sin(2 * np.pi * tone * np.arange(len(y)) / af.SAMPLE_RATE)
    inner = slice(400, len(y) - 400)
    assert np.abs(y[inner] - expected[inner]).max() < 1e-3


def test_stereo_is_averaged(tmp_path, extractor, sf):
    rate = 44_100
    left, right = _sweep(1.0, rate, f1=3_000), 0.3 * _sweep(1.0, rate, f0=500, f1=900)
    path = tmp_path / "stereo.wav"
    sf.write(str(path), np.stack([left, right], axis=1), rate, subtype="FLOAT")
    clip = af.load_audio(path)
    assert np.array_equal(clip, _hf_load(path))
    np.testing.assert_array_equal(clip, af.resample((left + right) / 2, rate))
    np.testing.assert_array_equal(af.to_mono(np.stack([left, right], axis=1)), (left + right) / 2)
    _assert_features_match(extractor, [clip])


@pytest.mark.parametrize("fmt, subtype", [("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")])
def test_formats(tmp_path, sf, fmt, subtype):
    _require(fmt in sf.available_formats(), f"libsndfile with {fmt} support (pip install -U soundfile)")
    rate = 22_050
    stereo = np.stack([_sweep(1.0, rate, f1=5_000), _sweep(1.0, rate, f1=2_000)], axis=1)
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(str(path), stereo, rate, format=fmt, subtype=subtype)
    clip = af.load_audio(path)
    assert np.array_equal(clip, _hf_load(path))
    assert abs(len(clip) - af.SAMPLE_RATE) < 0.1 * af.SAMPLE_RATE  # lossy codecs may pad/trim a frame
    assert 0.2 < np.abs(clip).max() < 1.1


# ----- soft-token counts --------------------------------------------------------------------------------------


def test_token_counts_spec_table():
    """Spec §7.6, HF column (16 kHz): mel frames and soft tokens."""
    table = {8_000: (49, 13), 16_000: (99, 25), 40_000: (249, 63), 160_000: (999, 250), 480_000: (2999, 750)}
    for samples, (frames, tokens) in table.items():
        assert af.num_mel_frames(samples) == frames
        assert af.num_audio_tokens(samples) == tokens
    assert af.num_audio_tokens(45 * af.SAMPLE_RATE) == 750  # truncated to 30 s


def test_token_counts_match_processor(extractor):
    """Both ways transformers' processor counts audio placeholders: the length formula and the frame mask."""
    processor = types.SimpleNamespace(
        feature_extractor=extractor, audio_seq_length=750, boa_token="[", audio_token="a", eoa_token="]"
    )
    lengths = [0, 100, 160, 161, 320, 321, 481, 1_600, 8_000, 12_345, 16_000, 40_000, 479_999, 480_000, 500_000]
    for n in lengths:
        expected = Gemma4Processor._compute_audio_num_tokens(processor, np.zeros(n), af.SAMPLE_RATE)
        assert af.num_audio_tokens(n) == expected, n
    clips = [np.zeros(n, np.float32) for n in lengths if n >= af.MIN_SAMPLES]
    _, mask = af.log_mel_features(clips)
    inputs = {"input_features_mask": list(mask)}
    for i, clip in enumerate(clips):
        placeholder = Gemma4Processor.replace_audio_token(processor, inputs, audio_idx=i)
        assert placeholder.count("a") == af.num_audio_tokens(len(clip)), len(clip)


# ----- bad input ------------------------------------------------------------------------------------------------


def _one_line_error(call, *match):
    with pytest.raises(Gemma4Error) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and all(m in message for m in match), message


def test_bad_files(tmp_path, sf):
    _one_line_error(lambda: af.load_audio(tmp_path / "missing.wav"), "no such audio file")
    text = tmp_path / "notes.wav"
    text.write_text("not audio at all\n" * 10)
    _one_line_error(lambda: af.load_audio(text), "not a readable audio file", "supported")
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, np.float32), af.SAMPLE_RATE)
    _one_line_error(lambda: af.load_audio(empty), "no audio samples")
    aac = tmp_path / "voice.m4a"
    aac.write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(64))
    _one_line_error(lambda: af.load_audio(aac), ".m4a", "ffmpeg")
    truncated = tmp_path / "truncated.flac"
    truncated.write_bytes(b"fLaC" + bytes(40))
    _one_line_error(lambda: af.load_audio(truncated), "not a readable audio file")


def test_bad_waveforms():
    _one_line_error(lambda: af.log_mel_features([]), "no audio clips")
    _one_line_error(lambda: af.log_mel_features(np.zeros(0, np.float32)), "empty audio")
    _one_line_error(lambda: af.log_mel_features(np.zeros(af.MIN_SAMPLES - 1, np.float32)), "too short")
    _one_line_error(lambda: af.log_mel_features(np.full(1_000, np.nan, np.float32)), "NaN")
    _one_line_error(lambda: af.log_mel_features(np.zeros(1_000, np.int16)), "float samples")
    _one_line_error(lambda: af.log_mel_features([np.zeros((1_000, 2), np.float32)]), "to_mono")
    _one_line_error(lambda: af.to_mono(np.zeros((2, 3, 4))), "channels")
    _one_line_error(lambda: af.resample(np.zeros(10, np.float32), 0), "positive")
