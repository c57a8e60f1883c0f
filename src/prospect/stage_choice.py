"""Each stage keeps the learned token that denoises the reference best at its timesteps (after inversion).

A stage whose timesteps the model barely reads text at (the last denoising steps, where the image is
almost drawn) gets gradients that are mostly noise (more so where the VAE's posterior is wide: the
clean latent drawn from it is itself noisy), and Adam's normalised steps walk its token far from any word; at generation such a token can undo what the earlier stages drew (on the embedded
model: squares came out as circles, purple as orange). So after training every stage k is given a
choice among the N learned tokens: it keeps the one with the lowest denoising loss on the reference
at stage k's timesteps. The candidates are compared on the same fixed draws (timesteps spread evenly
over the stage, noise from the run's seed, the latent's posterior mean), a paired comparison whose noise cancels.
A stage keeps its own token unless another one does better there; so the result is still N tokens,
one per stage, and is used, exported and loaded as any concept.
"""

from __future__ import annotations

from typing import Callable

import torch

from .captions import template_pool


def stage_losses(run, samples: int, losses: Callable) -> torch.Tensor:
    """[stage, candidate] mean denoising loss of the reference at each stage's timesteps with each stage's token.

    ``losses(run, image, view, eps_latent, noise, t, keys)`` is the inversion's per-sample loss; the text encoders
    must hold the trained rows. Draws: ``samples`` per stage, from the run's seed alone (view 0, the image itself;
    no latent draw)."""
    n = run.cfg.num_stages
    gen = torch.Generator().manual_seed(run.cfg.seed * 1_000_003 + 999_983)
    shape = tuple(run.mean.shape[2:])
    noise = torch.randn((samples, *shape), generator=gen).to(run.device)
    eps_latent = torch.zeros((samples, *shape), device=run.device)  # the posterior mean: the reference itself
    image = (torch.arange(samples) % run.num_images).to(run.device)
    view = torch.zeros(samples, dtype=torch.long, device=run.device)
    out = torch.empty(n, n)
    with torch.no_grad():
        for stage in range(n):
            lo, hi = run.stage_map.bounds(stage)
            t = (lo + (torch.arange(samples) + 0.5) / samples * (hi - lo)).long().to(run.device)  # in [lo, hi)
            pools = [template_pool(run.cfg, int(ti)) for ti in t]  # the captions this stage's samples saw
            templates = [pool[i % len(pool)] for i, pool in enumerate(pools)]
            for cand in range(n):
                keys = [(cand, j) for j in templates]
                out[stage, cand] = losses(run, image, view, eps_latent, noise, t, keys).float().mean().cpu()
    return out


def choose(table: torch.Tensor, groups: list[int] | None = None) -> list[int]:
    """Per stage, the candidate of lowest loss (its own on a tie); with ``groups`` (one label per stage), only
    among the stages of its own group (hue jitter: a colour-free stage keeps a colour-free token, and back)."""
    own = torch.arange(table.shape[0])
    if groups is not None:
        label = torch.tensor(groups)
        table = table.masked_fill(label[:, None] != label[None, :], float("inf"))
    best = table.argmin(dim=1)
    keep = table[own, own] <= table[own, best]
    return torch.where(keep, own, best).tolist()


def apply(tables: list[torch.Tensor], choice: list[int]) -> list[torch.Tensor]:
    """Each text encoder's [N, ...] rows with stage k's replaced by those of stage ``choice[k]``."""
    index = torch.tensor(choice)
    return [t[index].clone() for t in tables]
