"""Prompt-spectrum generation: a different prompt per denoising stage, txt2img and img2img.

Implements the sampling side of ProSpect (Zhang et al., 2023): stage ``stage(t)`` of the
timestep being evaluated picks that stage's conditioning. The stage prompts that the call's
timesteps reach are encoded once per call, in one text-encoder batch; the denoising loop reuses
the stock diffusers pipelines' own helpers (latent preparation, scheduler handling, decoding), so
with one prompt in every stage the output equals ``StableDiffusionPipeline`` /
``StableDiffusionImg2ImgPipeline`` for the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .verbosity import quiet_by_default

quiet_by_default()  # before diffusers' first import logs its notes

import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from PIL import Image

from .concept import Concept, add_concept
from .spectrum import build_spectrum
from .data import MAX_SIDE
from .stages import StageMap

MAX_IMAGES = 10_000  # per call
MAX_GUIDANCE = 100.0


@dataclass
class GenerationResult:
    """What one call produced: the images and the per-stage texts that made them."""

    images: list[Image.Image]  # num_prompts * num_images_per_prompt images, prompt-major
    stage_prompts: list[list[str]]  # per prompt, the N stage texts (index = stage)
    timesteps: list[int]  # the timesteps that were denoised, in order
    stages: list[int]  # the stage used at each of those timesteps
    parameters: dict = field(default_factory=dict)  # the call's settings, for PNG metadata


class ProSpectPipeline:
    """A Stable Diffusion pipeline that conditions each denoising stage on its own prompt."""

    def __init__(self, pipe: StableDiffusionPipeline, num_stages: int = 10):
        self.pipe = pipe
        self.img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
        self.concepts: dict[str, Concept] = {}
        self.stage_map = StageMap(num_stages, pipe.scheduler.config.num_train_timesteps)

    @classmethod
    def from_pretrained(cls, model: str | Path | None = None, num_stages: int = 10, **kwargs) -> "ProSpectPipeline":
        """Load a local model (diffusers folder, single file, or None for the embedded default)."""
        from .models import load_pipeline

        return cls(load_pipeline(model, **kwargs), num_stages=num_stages)

    def to(self, *args, **kwargs) -> "ProSpectPipeline":
        self.pipe.to(*args, **kwargs)
        return self

    @property
    def num_stages(self) -> int:
        return self.stage_map.num_stages

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    def load_concept(self, concept: Concept | str | Path) -> Concept:
        """Add a concept's per-stage tokens to the text encoder (replacing one with its placeholder)."""
        if not isinstance(concept, Concept):
            concept = Concept.load(concept)
        if concept.num_train_timesteps != self.stage_map.num_train_timesteps:
            raise ValueError(
                f"concept was learned over {concept.num_train_timesteps} timesteps but the scheduler has "
                f"{self.stage_map.num_train_timesteps}"
            )
        others = {p: c for p, c in self.concepts.items() if p != concept.placeholder}
        if others and concept.num_stages != self.num_stages:
            raise ValueError(
                f"concept {concept.placeholder!r} has {concept.num_stages} stages but the loaded concepts "
                f"have {self.num_stages}; all concepts of one pipeline share the stage split"
            )
        self.stage_map = StageMap(concept.num_stages, self.stage_map.num_train_timesteps)
        add_concept(self.pipe.tokenizer, self.pipe.text_encoder, concept)
        self.concepts[concept.placeholder] = concept
        return concept

    def stage_prompts(
        self,
        prompt: str,
        prospect_words: Sequence[str | int] | None = None,
        num_inference_steps: int | None = None,
    ) -> list[str]:
        """The N texts the text encoder sees for one prompt (index = stage)."""
        concepts = self.concepts
        return build_spectrum(
            prompt,
            prospect_words,
            num_stages=self.num_stages,
            placeholders=tuple(concepts),
            token_for=(lambda p, k: concepts[p].prompt_text(k)) if concepts else None,
            num_inference_steps=num_inference_steps,
        )

    @torch.no_grad()
    def encode_stages(
        self,
        texts: list[list[str]],
        num_images_per_prompt: int,
        negative_prompt: str | None,
        do_cfg: bool,
        stages: Iterable[int] | None = None,
    ) -> dict[int, torch.Tensor]:
        """The UNet's ``encoder_hidden_states`` of each stage (``stages``, default all): [B, L, D], or
        [2B, L, D] = (negative, positive) under guidance. Each distinct text is encoded once, in one batch."""
        stages = sorted(set(range(self.num_stages) if stages is None else stages))
        unique = sorted({per_prompt[k] for per_prompt in texts for k in stages})  # texts of unused stages are skipped
        if do_cfg:  # the negative prompt rides in the same text-encoder batch
            unique.append(negative_prompt or "")
        embeds, _ = self.pipe.encode_prompt(unique, self.device, 1, False)
        index = {t: i for i, t in enumerate(unique[: len(unique) - do_cfg])}
        conditioning = {}
        for k in stages:  # built once per call, so the denoising loop only looks them up
            rows = [index[per_prompt[k]] for per_prompt in texts]
            cond = embeds[rows].repeat_interleave(num_images_per_prompt, dim=0)
            conditioning[k] = torch.cat([embeds[-1:].expand_as(cond), cond]) if do_cfg else cond
        return conditioning

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = "*",
        prospect_words: Sequence[str | int] | None = None,
        image: Image.Image | torch.Tensor | None = None,
        strength: float = 0.6,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
    ) -> GenerationResult:
        """Generate with one prompt per stage; with ``image``, edit it (img2img, ``strength``)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        self.check_arguments(image, strength, height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                             self.pipe.scheduler.config.num_train_timesteps)
        texts = [self.stage_prompts(p, prospect_words, num_inference_steps) for p in prompts]
        do_cfg = guidance_scale > 1.0
        timesteps = self._timesteps(image, strength, num_inference_steps)
        stages = self.stage_map.stages(timesteps)
        conditioning = self.encode_stages(texts, num_images_per_prompt, negative_prompt, do_cfg, stages)
        dtype = conditioning[stages[0]].dtype
        latents = self._initial_latents(image, height, width, timesteps, len(prompts) * num_images_per_prompt,
                                        dtype, generator)
        extra = self.pipe.prepare_extra_step_kwargs(generator, eta)
        for i, t in enumerate(self.pipe.progress_bar(timesteps)):
            model_in = torch.cat([latents] * 2) if do_cfg else latents
            model_in = self.pipe.scheduler.scale_model_input(model_in, t)
            pred = self.pipe.unet(model_in, t, encoder_hidden_states=conditioning[stages[i]], return_dict=False)[0]
            if do_cfg:
                pred_uncond, pred_text = pred.chunk(2)
                pred = pred_uncond + guidance_scale * (pred_text - pred_uncond)
            latents = self.pipe.scheduler.step(pred, t, latents, **extra, return_dict=False)[0]
        images = self._decode(latents, generator, output_type)
        params = dict(
            prompt=prompts, prospect_words=list(prospect_words) if prospect_words is not None else None,
            img2img=image is not None, strength=strength if image is not None else None,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
            eta=eta, scheduler=type(self.pipe.scheduler).__name__, num_stages=self.num_stages,
            concepts=sorted(self.concepts),
        )
        return GenerationResult(images, texts, [int(t) for t in timesteps], stages, params)

    def _timesteps(self, image, strength: float, steps: int) -> torch.Tensor:
        """The timesteps to denoise: all (txt2img) or the last ``strength`` share (img2img), as diffusers."""
        self.pipe.scheduler.set_timesteps(steps, device=self.device)
        if image is None:
            return self.pipe.scheduler.timesteps
        timesteps, _ = self.img2img.get_timesteps(steps, strength, self.device)
        if len(timesteps) == 0:
            raise ValueError(f"strength {strength} with {steps} steps denoises nothing; raise strength or steps")
        return timesteps

    def _initial_latents(self, image, height, width, timesteps, batch, dtype, generator) -> torch.Tensor:
        """Noise (txt2img) or the image noised to the first timestep (img2img), as diffusers does."""
        if image is None:
            height = height or self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
            width = width or self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
            return self.pipe.prepare_latents(
                batch, self.pipe.unet.config.in_channels, height, width, dtype, self.device, generator, None
            )
        pixels = self.img2img.image_processor.preprocess(image, height=height, width=width)
        start = timesteps[:1].repeat(batch)
        if len(pixels) < batch and batch % len(pixels) == 0:
            # one image per output, as diffusers asks (it deprecates duplicating images for more prompts)
            if isinstance(generator, list) or self.pipe.vae.config.latent_channels != 4:  # each copy encoded
                # (diffusers takes a 4-channel tensor for latents, and encodes a copy per generator of a list)
                pixels = pixels.repeat(batch // len(pixels), 1, 1, 1)
            else:  # one encoding, then copies: the same draws as diffusers' duplication
                vae = self.pipe.vae
                encoded = retrieve_latents(vae.encode(pixels.to(self.device, dtype)), generator=generator)
                pixels = (vae.config.scaling_factor * encoded).repeat(batch // len(pixels), 1, 1, 1)
        return self.img2img.prepare_latents(pixels, start, batch, 1, dtype, self.device, generator)

    def _decode(self, latents: torch.Tensor, generator, output_type: str):
        if output_type == "latent":
            return latents
        vae = self.pipe.vae
        decoded = vae.decode(latents / vae.config.scaling_factor, return_dict=False, generator=generator)[0]
        if not torch.isfinite(decoded).all():  # would silently become black images
            where = "the denoiser" if not torch.isfinite(latents).all() else "the VAE decoder"
            raise ValueError(f"{where} produced NaN or infinite values: the model's weights are damaged, or float16 "
                             "overflowed (try --dtype float32 / torch_dtype=torch.float32)")
        return self.pipe.image_processor.postprocess(decoded, output_type=output_type)

    @staticmethod
    def check_arguments(image, strength, height, width, steps, guidance_scale, num_images,
                        num_train_timesteps: int = 1000) -> None:
        """One-line errors for bad arguments (diffusers' own checks come later and are less specific)."""
        for name, value in (("strength", strength), ("guidance_scale", guidance_scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
        if image is not None and not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        multiple = 8  # as diffusers requires
        for name, value in (("height", height), ("width", width)):
            if value is not None and (_not_int(value) or value <= 0 or value % multiple or value > MAX_SIDE):
                raise ValueError(f"{name} must be a positive multiple of {multiple} up to {MAX_SIDE}, got {value}")
        if _not_int(steps) or not 1 <= steps <= num_train_timesteps:
            raise ValueError(f"num_inference_steps must be an integer in [1, {num_train_timesteps}] (the model's "
                             f"training timesteps), got {steps}")
        if _not_int(num_images) or not 1 <= num_images <= MAX_IMAGES:
            raise ValueError(f"num_images_per_prompt must be an integer in [1, {MAX_IMAGES}], got {num_images}")
        if not 0 <= guidance_scale <= MAX_GUIDANCE:  # also catches NaN
            raise ValueError(f"guidance_scale must be in [0, {MAX_GUIDANCE}] (1 = no guidance), got {guidance_scale}")


def _not_int(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)
