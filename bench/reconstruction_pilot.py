"""Reconstruction pilot for inversion settings (issue #12): `*` in every stage, read back, on *pilot* references.

    python bench/reconstruction_pilot.py --setting snr_gamma=5 --setting snr_gamma=0

Each setting (InversionConfig fields over the benchmark's: 150 steps, lr 5e-3, batch 10, initializer
'shape', flip 0, 6 vectors) inverts references 0..R-1 of ``--seed`` (default 1: never the held-out
seed 0), generates 8 images with the learned tokens in every stage (DDIM 20, CFG 5, the same image
seeds for every setting) and prints the fraction of images with each attribute right, and all of them.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from prospect import InversionConfig, ProSpectPipeline, invert
from prospect.distributed import seeded_images
from prospect.toyworld import benchmark as bm
from prospect.toyworld import world
from prospect.toyworld.reader import read_batch

BASE = InversionConfig(steps=150, lr=5e-3, batch_size=10, initializer="shape", flip_p=0.0, vectors_per_stage=6,
                       checkpoint_every=0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", action="append", required=True, help="FIELD=VALUE[,FIELD=VALUE]; repeatable")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--references", type=int, default=4)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--steps", type=int, default=BASE.steps, help="inversion steps (a smoke run: a few)")
    p.add_argument("--model", default=None, help="model folder (default: the embedded toy-world model)")
    args = p.parse_args(argv)
    pp = ProSpectPipeline.from_pretrained(args.model)
    pp.pipe.set_progress_bar_config(disable=True)
    print(f"| setting | {' | '.join(world.ATTRIBUTES)} | all | s / reference |\n|---" + "|---" * (len(world.ATTRIBUTES) + 2) + "|")
    for setting in args.setting:
        fields = dict(kv.split("=") for kv in setting.split(","))
        cfg = replace(BASE, seed=args.seed, steps=args.steps, **{k: type(getattr(BASE, k))(v) for k, v in fields.items()})
        hits = {a: 0 for a in world.ATTRIBUTES}
        every, n, seconds = 0, 0, 0.0
        for r in range(args.references):
            scene = bm.reference_scene(args.seed, r)
            start = time.time()
            pp.load_concept(invert(pp, [world.render_pil(scene)], cfg, progress=False))
            seconds += time.time() - start
            seeds = [args.seed * 1_000_003 + r * 1_000 + j for j in range(args.images)]
            for reading in read_batch(seeded_images(pp, ["*"] * args.images, seeds, num_inference_steps=20,
                                                    guidance_scale=5.0)):
                got = bm.hits(reading, scene.attributes())
                for a in hits:
                    hits[a] += got[a]
                every += all(got.values())
                n += 1
        print(f"| {setting} | " + " | ".join(f"{hits[a] / n:.2f}" for a in world.ATTRIBUTES)
              + f" | {every / n:.2f} | {seconds / args.references:.0f} |", flush=True)


if __name__ == "__main__":
    main()
