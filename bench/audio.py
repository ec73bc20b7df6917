"""The audio encoder: seconds of audio encoded per second, ours vs transformers, same random full-size weights.

    python bench/audio.py                          # E2B Conformer + projection, 10 s and 30 s clips, CPU
    python bench/audio.py --seconds 5 --rounds 2

Speech spoken by `espeak-ng` (its native rate, resampled to 16 kHz as `load_audio` does), repeated to each length;
a chirp when espeak-ng is not installed (said in the output). Both sides take the same log-mel features and
project into the text width (`audio_soft_tokens` vs `Gemma4AudioModel` + `Gemma4MultimodalEmbedder`, float32;
the audio tower has only eager attention in transformers).
Each figure is the best of `--rounds` alternating calls after a warm-up (ours: compiled first).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import limit_cpus, log
from towers import best_of, hf_encoder, print_table, random_encoder

TEXT = (
    "Gemma four listens to speech at twenty five soft tokens per second. The encoder is a Conformer: convolution "
    "sub-sampling, then twelve layers of feed-forward, chunked local attention and light convolution."
)


def speech(af, np) -> tuple:
    """(16 kHz mono samples, what they are)."""
    if shutil.which("espeak-ng"):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "speech.wav")
            subprocess.run(["espeak-ng", "-w", path, TEXT], check=True, capture_output=True)
            return af.load_audio(path), "espeak-ng speech"
    t = np.arange(10 * af.SAMPLE_RATE) / af.SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * (200 + 150 * t) * t)).astype(np.float32), "a chirp (espeak-ng not installed)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="e2b", help="e2b (default) or e4b")
    parser.add_argument("--seconds", default="10,30", help="clip lengths in seconds (default 10,30; at most 30)")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per side and length (best kept)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    limit_cpus(args.threads)

    import jax
    import numpy as np
    import torch

    from gemma4_jax import audio, config
    from gemma4_jax import audio_features as af

    torch.set_num_threads(args.threads)
    cfg = config.get_config(args.variant)
    if cfg.audio is None:
        raise SystemExit(f"{cfg.name} has no audio encoder (E2B and E4B have one)")
    samples, what = speech(af, np)
    log(f"random {cfg.name} audio encoder + projection (float32), {args.threads} threads; input: {what}")
    params, hf_state = random_encoder(cfg, "audio")
    tower, embedder = hf_encoder(cfg, "audio", hf_state)
    del hf_state
    encode = jax.jit(lambda p, x, m: audio.audio_soft_tokens(p, x, m, cfg.audio))

    rows = []
    for seconds in (float(s) for s in args.seconds.split(",")):
        n = int(seconds * af.SAMPLE_RATE)
        clip = np.tile(samples, -(-n // len(samples)))[:n]
        features, mask = af.log_mel_features([clip])
        tokens = af.num_audio_tokens(n)
        feats, valid = torch.from_numpy(features), torch.from_numpy(mask)

        def ours(features=features, mask=mask):
            return jax.block_until_ready(encode(params, features, mask))

        def theirs(feats=feats, valid=valid):
            with torch.inference_mode():
                return embedder(tower(feats, valid).last_hidden_state)

        log(f"{seconds:g} s: {features.shape[1]} mel frames, {tokens} soft tokens; warming up")
        mine, token_mask = ours()
        reference = theirs().numpy()
        keep = np.asarray(token_mask)[0]
        difference = np.abs(np.asarray(mine)[0][keep] - reference[0][keep]).max() / np.abs(reference[0][keep]).max()
        ours_s, theirs_s = best_of(args.rounds, ours, theirs)
        rows.append(
            (f"{seconds:g}", tokens, f"{1000 * ours_s:.0f}", f"{seconds / ours_s:.1f}", f"{1000 * theirs_s:.0f}",
             f"{seconds / theirs_s:.1f}", f"{theirs_s / ours_s:.2f}x", f"{difference:.1e}")
        )  # fmt: skip
    header = ("audio s", "tokens", "ours ms", "ours audio-s/s", "HF ms", "HF audio-s/s", "speed-up", "max rel diff")
    print_table(f"{cfg.name} audio encoder, batch 1, CPU ({args.threads} threads), best of {args.rounds}", header, rows)
    summary = ", ".join(f"{r[0]} s {r[6]}" for r in rows)
    print(f"gemma4-jax audio encoder vs transformers ({cfg.name}, {what}): {summary}")


if __name__ == "__main__":
    main()
