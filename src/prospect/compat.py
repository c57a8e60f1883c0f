"""The official notebook's ``main(...)`` signature, so the official README examples run verbatim.

    from prospect.compat import load_model, main
    model = load_model(concept="concept.safetensors")      # the embedded model by default
    images = main(prompt='*', ddim_steps=50, strength=0.6, seed=42, height=512, width=768,
                  prospect_words=[...10 entries, index 0 = generation ends...], model=model)

As in the official notebook: DDIM, eta 0, guidance scale 10; ``content_dir`` (an image path)
switches to img2img with ``strength``, otherwise ``strength`` is unused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .verbosity import quiet_by_default

quiet_by_default()  # before diffusers' first import logs its notes

import torch
from diffusers import DDIMScheduler
from PIL import Image

from .data import open_image
from .outputs import ensure_dir, save_png
from .pipeline import ProSpectPipeline

OFFICIAL_GUIDANCE_SCALE = 10.0


def load_model(model: str | Path | None = None, concept: str | Path | Sequence[str | Path] | None = None,
               device: str | None = None) -> ProSpectPipeline:
    """A ProSpectPipeline with DDIM (the official sampler) and the given concept(s) loaded."""
    pipe = ProSpectPipeline.from_pretrained(model)
    pipe.pipe.scheduler = DDIMScheduler.from_config(pipe.pipe.scheduler.config)
    for c in [concept] if isinstance(concept, (str, Path)) else (concept or []):
        pipe.load_concept(c)
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def main(prompt: str = "*", content_dir: str | None = None, ddim_steps: int = 50, strength: float = 0.6,
         seed: int = 42, height: int = 512, width: int = 512, prospect_words: Sequence[str | int] | None = None,
         model: ProSpectPipeline | None = None, n_samples: int = 1, scale: float = OFFICIAL_GUIDANCE_SCALE,
         out_dir: str | Path | None = None) -> list[Image.Image]:
    """Generate as the official notebook's ``main`` does; returns the images (and saves them to ``out_dir``)."""
    if model is None:
        model = load_model()
    if not isinstance(model.pipe.scheduler, DDIMScheduler):
        model.pipe.scheduler = DDIMScheduler.from_config(model.pipe.scheduler.config)
    image = open_image(content_dir) if content_dir else None
    gen = torch.Generator(device="cpu").manual_seed(seed)
    result = model(prompt, prospect_words=prospect_words, image=image, strength=strength, height=height, width=width,
                   num_inference_steps=ddim_steps, guidance_scale=scale, num_images_per_prompt=n_samples,
                   eta=0.0, generator=gen)
    if out_dir is not None:
        folder = ensure_dir(out_dir)
        for k, im in enumerate(result.images):
            save_png(im, folder / f"{seed}-{k:03d}.png", dict(result.parameters, seed=seed))
    return result.images
