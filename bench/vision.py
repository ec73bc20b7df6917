"""The vision encoder: images per second, ours vs transformers, on the same random full-size weights.

    python bench/vision.py                         # E2B encoder + projection, 280 and 1120 soft tokens, CPU
    python bench/vision.py --variant 31b --budgets 70,280 --rounds 2

One photograph (scikit-image's astronaut, 512x512) preprocessed at each budget; both sides encode it and project
it into the text width (`image_embeddings` vs `Gemma4VisionModel` + `Gemma4MultimodalEmbedder` with transformers'
default attention, sdpa; float32). Each figure is the best of `--rounds` alternating calls after a warm-up (ours:
compiled first). The table also gives the largest difference between the two outputs, relative to their scale
(random weights amplify float32 rounding: both sides are ~5e-4 from a float64 run of ours on E2B).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import limit_cpus, log
from towers import best_of, hf_encoder, print_table, random_encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="e2b", help="e2b (default), e4b, 31b, 26b_a4b")
    parser.add_argument("--budgets", default="280,1120", help="soft tokens per image (default 280,1120)")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per side and budget (best kept)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    limit_cpus(args.threads)

    import jax
    import numpy as np
    import torch
    from skimage import data as skimage_data

    from gemma4_jax import config, image, vision

    torch.set_num_threads(args.threads)
    cfg = config.get_config(args.variant)
    photo = os.path.join(skimage_data.data_dir, "astronaut.png")
    log(f"random {cfg.name} vision encoder + projection (float32), {args.threads} threads")
    params, hf_state = random_encoder(cfg, "vision")
    tower, embedder = hf_encoder(cfg, "vision", hf_state)
    del hf_state
    encode = jax.jit(lambda p, x, y: vision.image_embeddings(p, x, y, cfg.vision))

    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        done = image.preprocess(photo, budget)
        patches, positions = done.patches[None], done.positions[None]
        pixels, ids = torch.from_numpy(patches), torch.from_numpy(positions.astype(np.int64))

        def ours(patches=patches, positions=positions):
            return jax.block_until_ready(encode(params, patches, positions))

        def theirs(pixels=pixels, ids=ids):
            with torch.inference_mode():
                return embedder(tower(pixel_values=pixels, pixel_position_ids=ids).last_hidden_state)

        log(f"budget {budget}: {len(done.patches)} patch slots, {done.num_soft_tokens} soft tokens; warming up")
        mine, valid = ours()
        reference = theirs().numpy()
        mine = np.asarray(mine)[0][np.asarray(valid)[0]]
        difference = np.abs(mine - reference).max() / np.abs(reference).max()
        ours_s, theirs_s = best_of(args.rounds, ours, theirs)
        rows.append(
            (budget, done.num_soft_tokens, f"{1000 * ours_s:.0f}", f"{1 / ours_s:.3g}", f"{1000 * theirs_s:.0f}",
             f"{1 / theirs_s:.3g}", f"{theirs_s / ours_s:.2f}x", f"{difference:.1e}")
        )  # fmt: skip
    header = ("budget", "tokens", "ours ms/img", "ours img/s", "HF ms/img", "HF img/s", "speed-up", "max rel diff")
    print_table(
        f"{cfg.name} vision encoder, batch 1, CPU ({args.threads} threads), best of {args.rounds}", header, rows
    )
    summary = ", ".join(f"{r[0]} tokens {r[6]}" for r in rows)
    print(f"gemma4-jax vision encoder vs transformers ({cfg.name}): {summary}")


if __name__ == "__main__":
    main()
