"""What each stage's token carries, shown as a labelled grid (the paper's p_i figure).

Row 1, "only": stage i uses the concept token, every other stage the empty prompt.
Row 2, "from start": the stages from the start of generation (N-1) down to i use the token.
Columns run in generation order (stage N-1 first), all from the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from .outputs import make_grid
from .pipeline import ProSpectPipeline


@dataclass
class Visualization:
    """Images of the per-stage probe, their labels and the assembled grid."""

    only: list[Image.Image]  # index = column (stage N-1 first)
    from_start: list[Image.Image]
    labels: list[str]
    stage_words: list[list[str]]  # the prospect_words used for each image, "only" row then "from start" row
    grid: Image.Image


def probe_words(num_stages: int, placeholder: str, cumulative: bool) -> list[list[str]]:
    """prospect_words lists of the probe, one per column (generation order)."""
    rows = []
    for i in reversed(range(num_stages)):
        use = (lambda k: k >= i) if cumulative else (lambda k: k == i)
        rows.append([placeholder if use(k) else "" for k in range(num_stages)])
    return rows


def visualize(
    pipe: ProSpectPipeline,
    placeholder: str = "*",
    seed: int = 0,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    scale: int = 1,
    height: int | None = None,
    width: int | None = None,
) -> Visualization:
    """Generate the probe grid for a loaded concept (images of ``height`` x ``width``, default the model's size)."""
    if placeholder not in pipe.concepts:
        raise ValueError(f"no concept with placeholder {placeholder!r} is loaded")
    n = pipe.num_stages
    words = probe_words(n, placeholder, False) + probe_words(n, placeholder, True)
    images = []
    for entry in words:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        out = pipe("*", prospect_words=entry, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, generator=gen, height=height, width=width)
        images.append(out.images[0])
    labels = [f"s{i} only" for i in reversed(range(n))] + [f"s{n - 1}..s{i}" for i in reversed(range(n))]
    grid = make_grid(images, cols=n, labels=labels, scale=scale)
    return Visualization(images[:n], images[n:], labels, words, grid)
