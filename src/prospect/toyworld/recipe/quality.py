"""Measures the embedded model: attribute accuracy, autoencoder PSNR, and its spectrum.

Run: ``python -m prospect.toyworld.recipe.quality [--model DIR] [--captions 200] [--out DIR]``.
Prints markdown tables (for the model card) and writes ``quality.json`` and ``spectrum.png``.

The spectrum probe switches the prompt from caption A (stages >= k, the start of generation)
to caption B (stages < k) for every stage boundary k and reads which caption each attribute
followed, so it shows at which stage each attribute is decided.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from .. import world
from ...files import atomic_write
from ...distributed import seeded_images
from ...pipeline import ProSpectPipeline
from .. import plots
from ..reader import read

COLOURS = {"position": "tab:red", "shape": "tab:green", "colour": "tab:blue", "texture": "goldenrod",
           "background": "0.5"}
READABLE_FIT = 0.5  # template IoU of a readable object (clean renders 1.0; broken images seen 0.04-0.22)


def _generate(pp: ProSpectPipeline, prompts: list[str], seed: int, steps: int, guidance: float, batch: int = 50):
    """One image per prompt, seeds seed, seed+1, ... so results do not depend on batching."""
    return seeded_images(pp, prompts, range(seed, seed + len(prompts)), batch, num_inference_steps=steps,
                         guidance_scale=guidance)


def generation_accuracy(pp: ProSpectPipeline, n: int = 200, seed: int = 0, steps: int = 50,
                        guidance: float = 5.0) -> dict[str, float]:
    """Fraction of generated images whose attribute matches the caption, per attribute."""
    rng = np.random.default_rng([seed, 77])
    scenes = [world.random_scene(rng) for _ in range(n)]
    images = _generate(pp, [world.caption(s) for s in scenes], seed, steps, guidance)
    hits = {a: 0 for a in world.ATTRIBUTES}
    for scene, image in zip(scenes, images):
        for attr, ok in read(image).matches(scene).items():
            hits[attr] += ok
    return {a: hits[a] / n for a in world.ATTRIBUTES}


@torch.no_grad()
def autoencoder_psnr(vae, n: int = 500, seed: int = 1) -> float:
    """PSNR (dB, [0, 1] scale) of VAE reconstructions of held-out renders (posterior mean)."""
    rng = np.random.default_rng([seed, 99])
    arr = np.stack([world.render(world.random_scene(rng)) for _ in range(n)]).astype(np.float32) / 127.5 - 1
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    mse = ((rec - x) / 2).pow(2).mean().item()
    return 10 * math.log10(1 / mse)


def _opposite_pairs(n: int, seed: int) -> list[tuple[world.Scene, world.Scene]]:
    """Pairs of scenes that differ in every attribute."""
    rng = np.random.default_rng([seed, 55])
    pairs = []
    while len(pairs) < n:
        a, b = world.random_scene(rng, jitter=0), world.random_scene(rng, jitter=0)
        if all(getattr(a, x) != getattr(b, x) for x in world.ATTRIBUTES):
            pairs.append((a, b))
    return pairs


def spectrum_probe(pp: ProSpectPipeline, pairs: int = 16, seed: int = 0, steps: int = 50,
                   guidance: float = 5.0) -> tuple[dict[str, list[float]], list[float]]:
    """For k = 0..N: fraction of images whose attribute follows A when A holds stages >= k.

    Also returns, per k, the fraction of images that are readable: one object whose mask matches
    a shape template with IoU >= ``READABLE_FIT``. A late switch between captions that differ in
    everything (background included) can leave a broken image, whose attributes the reader still
    names but which follows neither caption in any useful sense.
    """
    n = pp.num_stages
    scene_pairs = _opposite_pairs(pairs, seed)
    follows = {a: [] for a in world.ATTRIBUTES}
    readable = []
    for k in range(n + 1):
        prompts = []
        for a, b in scene_pairs:
            ca, cb = world.caption(a), world.caption(b)
            prompts.append(ca if k == 0 else cb if k == n else f"[{ca}:{cb}:{(n - k) / n}]")
        readings = [read(im) for im in _generate(pp, prompts, seed, steps, guidance)]
        for attr in world.ATTRIBUTES:
            got = [getattr(r, attr) == getattr(a, attr) for r, (a, _) in zip(readings, scene_pairs)]
            follows[attr].append(float(np.mean(got)))
        readable.append(float(np.mean([r.fit >= READABLE_FIT for r in readings])))
    return follows, readable


def decided_at(curve: list[float]) -> float:
    """The (interpolated) switch stage k where following A drops through 0.5."""
    for k in range(1, len(curve)):
        if curve[k - 1] >= 0.5 > curve[k]:
            return k - 1 + (curve[k - 1] - 0.5) / (curve[k - 1] - curve[k])
    return float("nan")


def plot_spectrum(follows: dict[str, list[float]], readable: list[float], path: Path) -> None:
    """x = switch stage k, y = fraction of images following caption A; dots = the readable share."""
    ks = list(range(len(readable)))
    series = [plots.Series(attr, ks, curve, COLOURS[attr], "-", width=2.5) for attr, curve in follows.items()]
    series.append(plots.Series("readable", ks, readable, "black", "o"))
    panel = plots.Panel("caption A in stages >= k (generation start), B in stages < k", "k", series,
                        ylabel="fraction of images following A", xticks=ks)
    plots.line_panels([panel], path, width=6.4, height=3.6)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Measure the embedded toy-world model.")
    p.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    p.add_argument("--captions", type=int, default=200)
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--out", type=Path, default=Path("runs/quality"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    pp = ProSpectPipeline.from_pretrained(args.model)
    pp.pipe.set_progress_bar_config(disable=True)
    acc = generation_accuracy(pp, args.captions, steps=args.steps, guidance=args.guidance_scale)
    psnr = autoencoder_psnr(pp.pipe.vae)
    follows, readable = spectrum_probe(pp, args.pairs, steps=args.steps, guidance=args.guidance_scale)
    print(f"| attribute accuracy ({args.captions} captions, DDIM {args.steps}, CFG {args.guidance_scale}) | value |")
    print("|---|---|")
    for attr, v in acc.items():
        print(f"| {attr} | {v:.3f} |")
    print(f"| autoencoder PSNR (500 held-out renders) | {psnr:.2f} dB |\n")
    print("| k (A in stages >= k) | " + " | ".join(world.ATTRIBUTES) + " | readable |")
    print("|---" * (len(world.ATTRIBUTES) + 2) + "|")
    for k in range(len(readable)):
        print(f"| {k} | " + " | ".join(f"{follows[a][k]:.2f}" for a in world.ATTRIBUTES) + f" | {readable[k]:.2f} |")
    decided = {a: decided_at(c) for a, c in follows.items()}
    print("\ndecided at stage (A/B crossing): " + ", ".join(f"{a} {v:.1f}" for a, v in decided.items()))
    plot_spectrum(follows, readable, args.out / "spectrum.png")
    result = dict(accuracy=acc, psnr=psnr, spectrum=follows, readable=readable, decided_at=decided, captions=args.captions,
                  pairs=args.pairs, steps=args.steps, guidance_scale=args.guidance_scale)
    atomic_write(args.out / "quality.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))


if __name__ == "__main__":
    main()
