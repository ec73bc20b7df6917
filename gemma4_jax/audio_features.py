"""Audio front end of Gemma 4 (E2B, E4B): audio files -> 16 kHz mono -> log-mel features, as transformers does it.

Everything here runs on the host in numpy, like `transformers.Gemma4AudioFeatureExtractor`, whose computation it
reproduces step for step (spec §4.2, §6 #10, §7.6 HF column):

- **Reading** (`load_audio`): `soundfile` (libsndfile: WAV, FLAC, OGG Vorbis/Opus, MP3 from libsndfile 1.1 on, AIFF,
  ...), channels averaged to mono, any sample rate resampled to 16 kHz with soxr at "soxr_hq" and the length fixed
  to `ceil(n * 16000 / rate)`. These are exactly the steps of transformers' `load_audio(..., backend="soundfile")`
  (= `librosa.load`), which is what its processor uses when torchcodec is absent, so a file gives the same
  samples here and there. soxr (a band-limited polyphase resampler) rather than `scipy.signal.resample_poly`
  because it is what transformers/librosa use: the samples then agree bit for bit, not just closely.
- **Batching** (`log_mel_features`): each clip is cut at 30 s (480 000 samples): transformers' feature extractor
  *truncates* longer audio (`max_length=480_000, truncation=True`) and its processor neither splits nor refuses it,
  so audio after 30 s is dropped here as there. Clips are right-padded with zeros to the longest one, rounded up
  to a multiple of 128 samples.
- **Log-mel**: 160 zero samples are prepended ("semicausal" framing), frames of 320 samples every 160 (frame `i`
  covers padded samples `[160 i, 160 i + 320)`), periodic Hann window `0.5 − 0.5 cos(2πn/320)`, real FFT of
  size 512, **magnitude** (not power), 128 triangular HTK-mel filters over 0–8 kHz without area normalisation,
  `log(mel + 0.001)`, no per-bin normalisation. Frames: `(n_padded + 160 − 321) // 160 + 1`.
- **Mask**: a frame is valid when the last sample of its window is real audio (not batch padding); invalid frames
  are zeroed. Valid frames per clip: `(n + 160 − 321) // 160 + 1`.

Differences from the JAX OSS reference (`gemma.gm.nn.gemma4.audio.GemaxMelFilterbank`, spec §6 #10), which we do
*not* follow: JAX frames from sample 0 without the 160-sample left pad, uses the "non-zero" Hann window
`0.5 − 0.5 cos(2π(n + 0.5)/320)`, builds the mel matrix in float32, and derives the mask by scaling lengths
(`floor(len / compression)`) instead of checking each frame's last sample; it yields one mel frame fewer
(e.g. 0.5 s: 48 frames / 12 tokens vs 49 / 13 here).

Soft tokens per clip (`num_audio_tokens`) follow transformers' processor: the two stride-2 convolutions of the
encoder (`t -> (t − 1) // 2 + 1`, twice) on the valid mel frames, capped at 750 (= 30 s at 40 ms per token).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from gemma4_jax.errors import Gemma4Error

SAMPLE_RATE = 16_000
FRAME_LENGTH = 320  # 20 ms
HOP_LENGTH = 160  # 10 ms
FFT_LENGTH = 512
NUM_MEL_BINS = 128
MIN_FREQUENCY = 0.0
MAX_FREQUENCY = 8_000.0
MEL_FLOOR = 1e-3
MAX_SAMPLES = 480_000  # 30 s: longer clips are truncated (transformers' feature extractor does the same)
PAD_TO_MULTIPLE_OF = 128  # batch padding granularity of transformers' feature extractor (samples)
MAX_AUDIO_TOKENS = 750  # transformers' processor `audio_seq_length`
# One frame needs FRAME_LENGTH + 1 samples after the HOP_LENGTH-sample left pad (the extractor unfolds 321
# samples and drops the last, a remnant of its optional pre-emphasis): shorter audio has no valid frame at all.
MIN_SAMPLES = FRAME_LENGTH + 1 - FRAME_LENGTH // 2

# Containers libsndfile cannot decode at all (transformers needs torchcodec/ffmpeg for them).
_NOT_LIBSNDFILE = {".m4a", ".mp4", ".aac", ".wma", ".webm", ".mkv", ".mov", ".avi", ".amr", ".3gp", ".ac3"}


# ----- reading ---------------------------------------------------------------------------------------------


def _soundfile():
    try:
        import soundfile
    except ImportError as e:
        raise Gemma4Error(f"reading audio files needs the soundfile package: pip install soundfile ({e})") from None
    except OSError as e:  # the wheel loads libsndfile at import: a broken install raises OSError
        raise Gemma4Error(f"soundfile cannot load libsndfile ({e}): pip install --force-reinstall soundfile") from None
    return soundfile


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Reads an audio file as float32 mono at `sample_rate` (default 16 kHz): `[num_samples]`.

    Same samples as transformers' `load_audio(path, sampling_rate, backend="soundfile")`: soundfile decode to
    float32, channel average, soxr "soxr_hq" resampling, length `ceil(n * sample_rate / rate)`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise Gemma4Error(f"{path}: no such audio file")
    extension = os.path.splitext(path)[1].lower()
    if extension in _NOT_LIBSNDFILE:
        raise Gemma4Error(
            f"{path}: {extension} audio cannot be decoded by libsndfile; convert it first, e.g. "
            f"`ffmpeg -i {path} -ac 1 -ar 16000 audio.wav`"
        )
    sf = _soundfile()
    try:
        with sf.SoundFile(path) as f:
            rate = f.samplerate
            data = f.read(dtype="float32", always_2d=True)  # [frames, channels]
    except (RuntimeError, TypeError, ValueError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = "supported: WAV, FLAC, OGG (Vorbis/Opus), MP3, AIFF and the other libsndfile formats"
        if extension == ".mp3" and "MP3" not in sf.available_formats():
            hint = f"this libsndfile ({sf.__libsndfile_version__}) has no MP3 support: pip install -U soundfile"
        raise Gemma4Error(f"{path}: not a readable audio file ({reason}); {hint}") from None
    if data.size == 0:
        raise Gemma4Error(f"{path}: the file contains no audio samples")
    if not np.all(np.isfinite(data)):
        raise Gemma4Error(f"{path}: the audio contains NaN or infinite samples")
    return resample(to_mono(data), rate, sample_rate)


def to_mono(audio: np.ndarray) -> np.ndarray:
    """`[num_samples]` or `[num_samples, channels]` (soundfile's layout) -> `[num_samples]`: the channel mean.

    Averaging is what transformers' soundfile and torchaudio loaders do (torchcodec asks ffmpeg for one channel).
    """
    audio = np.asarray(audio)
    if audio.ndim == 1:
        return audio
    if audio.ndim != 2:
        raise Gemma4Error(f"audio must be [samples] or [samples, channels], got shape {audio.shape}")
    channels_first = audio.T  # averaged over axis 0 exactly as transformers does, so the float rounding agrees
    return channels_first.mean(axis=0) if channels_first.shape[0] > 1 else channels_first[0]


def resample(audio: np.ndarray, rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float audio from `rate` to `target_rate` Hz (soxr "soxr_hq"), `ceil(n * target / rate)` samples."""
    audio = np.asarray(audio)
    if rate <= 0 or target_rate <= 0:
        raise Gemma4Error(f"sample rates must be positive, got {rate} -> {target_rate}")
    if rate != target_rate:
        try:
            import soxr
        except ImportError:
            raise Gemma4Error(f"resampling {rate} Hz audio to {target_rate} Hz needs soxr: pip install soxr") from None
        length = math.ceil(audio.shape[-1] * target_rate / rate)
        audio = soxr.resample(audio, rate, target_rate, quality="soxr_hq")
        audio = np.pad(audio, (0, max(0, length - len(audio))))[:length]
    return np.ascontiguousarray(audio, dtype=np.float32)


# ----- log-mel -----------------------------------------------------------------------------------------------


def _hertz_to_mel(frequency):
    return 2595.0 * np.log10(1.0 + frequency / 700.0)


def _mel_to_hertz(mel):
    return 700.0 * (np.power(10, mel / 2595.0) - 1.0)


def mel_filter_bank() -> np.ndarray:
    """`[257, 128]` float64: triangular HTK-mel filters over the FFT bins, 0–8 kHz, peak 1, no area normalisation."""
    mel = np.linspace(_hertz_to_mel(MIN_FREQUENCY), _hertz_to_mel(MAX_FREQUENCY), NUM_MEL_BINS + 2)
    edges = _mel_to_hertz(mel)  # filter m rises over edges[m]..edges[m+1], falls over edges[m+1]..edges[m+2]
    bins = np.linspace(0, SAMPLE_RATE // 2, FFT_LENGTH // 2 + 1)
    slopes = edges[None, :] - bins[:, None]
    widths = np.diff(edges)
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    return np.maximum(0.0, np.minimum(down, up))


# np.hanning(321)[:-1] is the periodic Hann window 0.5 - 0.5 cos(2 pi n / 320); built the same way as
# transformers' `window_function` so the float32 values are identical.
_WINDOW = np.hanning(FRAME_LENGTH + 1)[:-1].astype(np.float32)
_MEL_FILTERS = mel_filter_bank()


def num_mel_frames(num_samples: int) -> int:
    """Valid mel frames of a clip of `num_samples` samples at 16 kHz (after the 30 s cut); 0 if too short."""
    num_samples = min(num_samples, MAX_SAMPLES)
    return max(0, (num_samples + FRAME_LENGTH // 2 - (FRAME_LENGTH + 1)) // HOP_LENGTH + 1)


def num_audio_tokens(num_samples: int) -> int:
    """Soft tokens of a clip of `num_samples` samples at 16 kHz, as transformers' processor counts them.

    Two stride-2 convolutions (kernel 3, pad 1) on the valid mel frames, capped at 750 (spec §7.6 HF column:
    0.5 s -> 13, 1 s -> 25, 2.5 s -> 63, 10 s -> 250, 30 s and longer -> 750).
    """
    t = num_mel_frames(num_samples)
    if t == 0:
        return 0
    for _ in range(2):
        t = (t - 1) // 2 + 1
    return min(t, MAX_AUDIO_TOKENS)


def _check_waveform(audio, index: int) -> np.ndarray:
    audio = np.asarray(audio)
    where = f"audio clip {index}"
    if audio.ndim != 1:
        raise Gemma4Error(f"{where}: expected mono samples [num_samples], got shape {audio.shape} (see to_mono)")
    if not np.issubdtype(audio.dtype, np.floating):
        raise Gemma4Error(f"{where}: expected float samples in [-1, 1], got {audio.dtype} (scale integer PCM first)")
    if audio.size == 0:
        raise Gemma4Error(f"{where}: empty audio")
    if audio.size < MIN_SAMPLES:
        raise Gemma4Error(f"{where}: {audio.size} samples is too short, at least {MIN_SAMPLES} are needed at 16 kHz")
    if not np.all(np.isfinite(audio)):
        raise Gemma4Error(f"{where}: the audio contains NaN or infinite samples")
    # float64 becomes float32 as in transformers' padding step; the spectrum is computed from float32 samples.
    return audio[:MAX_SAMPLES].astype(np.float32)


def log_mel_features(clips: np.ndarray | Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """16 kHz mono float clips -> (features `[B, T, 128]` float32, mask `[B, T]` bool), as the HF extractor.

    `clips` is one 1-D array or a sequence of them. Each is cut at 30 s, the batch is right-padded to the
    longest clip rounded up to 128 samples, frames whose window reaches into the padding are invalid and zeroed.
    """
    if isinstance(clips, np.ndarray) and clips.ndim == 1:
        clips = [clips]
    if len(clips) == 0:
        raise Gemma4Error("no audio clips given")
    waves = [_check_waveform(clip, i) for i, clip in enumerate(clips)]
    longest = max(len(w) for w in waves)
    padded = -(-longest // PAD_TO_MULTIPLE_OF) * PAD_TO_MULTIPLE_OF
    pad_left = FRAME_LENGTH // 2
    frames = (padded + pad_left - (FRAME_LENGTH + 1)) // HOP_LENGTH + 1
    starts = np.arange(frames) * HOP_LENGTH
    features = np.zeros((len(waves), frames, NUM_MEL_BINS), np.float32)
    mask = np.zeros((len(waves), frames), bool)
    for b, wave in enumerate(waves):
        x = np.zeros(pad_left + padded, np.float32)
        x[pad_left : pad_left + len(wave)] = wave
        windows = x[starts[:, None] + np.arange(FRAME_LENGTH)] * _WINDOW  # [T, 320] float32
        magnitude = np.abs(np.fft.rfft(windows, n=FFT_LENGTH, axis=-1))  # float32 (numpy >= 2 keeps single)
        log_mel = np.log(magnitude.astype(np.float64) @ _MEL_FILTERS + MEL_FLOOR).astype(np.float32)
        # Last sample of frame i's unfolded window: padded index 160 i + 320 = real sample 160 i + 160.
        valid = starts + FRAME_LENGTH - pad_left < len(wave)
        features[b] = log_mel * valid[:, None]
        mask[b] = valid
    return features, mask


def file_features(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Audio files -> (features `[B, T, 128]`, mask `[B, T]`, soft tokens per file). Audio past 30 s is dropped."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    clips = [load_audio(p) for p in paths]
    features, mask = log_mel_features(clips)
    return features, mask, [num_audio_tokens(len(c)) for c in clips]
