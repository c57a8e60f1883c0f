"""Prompt-spectrum generation: a different prompt per denoising stage, on stock diffusers pipelines.

Implements the sampling side of ProSpect (Zhang et al., 2023): stage ``stage(t)`` of the
timestep being evaluated picks that stage's conditioning. ``ProSpectPipeline`` is a convenience
over a stock ``StableDiffusionPipeline``: it builds the stage texts (``prospect_words``, concepts,
A1111 editing syntax), encodes them once per call, and runs the stock pipeline's own ``__call__``
(txt2img, img2img, inpainting, or any pipeline given as ``pipeline=``, e.g. ControlNet) with a
``StageSwitch`` callback. With one prompt in every stage the output is the stock pipeline's.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, fields, replace
from numbers import Real
from pathlib import Path
from typing import Sequence

from .verbosity import quiet_by_default

quiet_by_default()  # before diffusers' first import logs its notes

import torch
from diffusers import (StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline,
                       StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from PIL import Image

from .concept import Concept, add_to_pipeline, check_family, model_family
from .data import MAX_SIDE
from .spectrum import SpectrumError, build_spectrum
from .stage_switch import StageSwitch, denoised_timesteps
from .stages import StageMap

MAX_IMAGES = 10_000  # per call
# (txt2img, img2img, inpainting) of each model family; SDXL: both text encoders and the pooled embedding
FAMILIES = {"sd": (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline),
            "sdxl": (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline)}
MAX_GUIDANCE = 100.0


@dataclass
class GenerationConfig:
    """Settings of one generation call; the flags of ``prospect generate`` derive from these fields."""

    num_inference_steps: int = field(default=50, metadata={"flag": "--steps", "help": "denoising steps"})
    guidance_scale: float = field(default=7.5, metadata={"help": "classifier-free guidance scale (1 = off)"})
    strength: float = field(default=0.6, metadata={"help": "img2img / inpainting: share of the steps that run, "
                                                           "in [0, 1]"})
    height: int | None = field(default=None, metadata={"help": "image height (default: the model's)"})
    width: int | None = field(default=None, metadata={"help": "image width (default: the model's)"})
    negative_prompt: str | None = field(default=None, metadata={
        "help": "what guidance steers away from; as the prompt, prompt editing ([from:to:when]) and a placeholder "
                "(each stage's own token) resolve by stage"})
    eta: float = field(default=0.0, metadata={"help": "DDIM's eta (0 = deterministic)"})
    num_images_per_prompt: int = field(default=1, metadata={"flag": None})  # the CLI has --num-images, --batch-size

    def check(self, img2img: bool = False, num_train_timesteps: int = 1000) -> None:
        """One-line ValueErrors for bad settings (diffusers' own checks come later and are less specific)."""
        for name in ("strength", "guidance_scale", "eta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real):
                raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
        multiple = 8  # as diffusers requires
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (_not_int(value) or value <= 0 or value % multiple or value > MAX_SIDE):
                raise ValueError(f"{name} must be a positive multiple of {multiple} up to {MAX_SIDE}, got {value}")
        steps = self.num_inference_steps
        if _not_int(steps) or not 1 <= steps <= num_train_timesteps:
            raise ValueError(f"num_inference_steps must be an integer in [1, {num_train_timesteps}] (the model's "
                             f"training timesteps), got {steps}")
        if _not_int(self.num_images_per_prompt) or not 1 <= self.num_images_per_prompt <= MAX_IMAGES:
            raise ValueError(f"num_images_per_prompt must be an integer in [1, {MAX_IMAGES}], "
                             f"got {self.num_images_per_prompt}")
        if not 0 <= self.guidance_scale <= MAX_GUIDANCE:  # also catches NaN
            raise ValueError(f"guidance_scale must be in [0, {MAX_GUIDANCE}] (1 = no guidance), "
                             f"got {self.guidance_scale}")
        if not math.isfinite(self.eta) or self.eta < 0:
            raise ValueError(f"eta must be a finite number >= 0, got {self.eta}")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {type(self.negative_prompt).__name__}")
        if img2img:
            if not 0.0 <= self.strength <= 1.0:
                raise ValueError(f"strength must be in [0, 1], got {self.strength}")
            if int(steps * self.strength) < 1:  # diffusers runs the last int(steps * strength) steps
                raise ValueError(f"strength {self.strength} with {steps} steps denoises nothing; raise strength "
                                 "or steps")


GENERATION_FIELDS = frozenset(f.name for f in fields(GenerationConfig))


@dataclass
class GenerationResult:
    """What one call produced: the images and the per-stage texts that made them."""

    images: list[Image.Image]  # num_prompts * num_images_per_prompt images, prompt-major
    stage_prompts: list[list[str]]  # per prompt, the N stage texts (index = stage)
    timesteps: list[int]  # the timesteps that were denoised, in order
    stages: list[int]  # the stage used at each of those timesteps
    parameters: dict = field(default_factory=dict)  # the call's settings, for PNG metadata


class ProSpectPipeline:
    """A stock Stable Diffusion pipeline, with concepts and one prompt per denoising stage."""

    def __init__(self, pipe: StableDiffusionPipeline, num_stages: int = 10):
        self.pipe = pipe
        self.concepts: dict[str, Concept] = {}
        self.stage_map = StageMap(num_stages, pipe.scheduler.config.num_train_timesteps)
        self._variants: dict[type, object] = {}

    @classmethod
    def from_pretrained(cls, model: str | Path | None = None, num_stages: int = 10, **kwargs) -> "ProSpectPipeline":
        """Load a local model (diffusers folder, single file, or None for the embedded default)."""
        from .loading import load_pipeline

        return cls(load_pipeline(model, **kwargs), num_stages=num_stages)

    def to(self, *args, **kwargs) -> "ProSpectPipeline":
        self.pipe.to(*args, **kwargs)
        return self

    @property
    def family(self) -> str:
        return model_family(self.pipe)

    @property
    def num_stages(self) -> int:
        return self.stage_map.num_stages

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    def variant(self, cls: type):
        """The stock pipeline ``cls`` on this pipeline's modules (e.g. ``StableDiffusionImg2ImgPipeline``)."""
        if isinstance(self.pipe, cls):
            return self.pipe
        if cls not in self._variants:
            self._variants[cls] = cls(**self.pipe.components)
        variant = self._variants[cls]
        variant.scheduler = self.pipe.scheduler  # a scheduler swapped on .pipe is used by every variant
        variant.set_progress_bar_config(**getattr(self.pipe, "_progress_bar_config", {}))
        return variant

    def load_concept(self, concept: Concept | str | Path) -> Concept:
        """Add a concept's per-stage tokens to the text encoder(s) (both for SDXL), replacing one with its
        placeholder."""
        if not isinstance(concept, Concept):
            concept = Concept.load(concept)
        check_family(self.pipe, concept)
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
        add_to_pipeline(self.pipe, concept)
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

    def stage_switch(self, prompt: str | list[str] = "*", prospect_words: Sequence[str | int] | None = None,
                     config: GenerationConfig | None = None, pipeline=None, clip_skip: int | None = None,
                     strength: float | None = None) -> StageSwitch:
        """The callback that runs ``prompt``'s spectrum on a stock pipeline (default this one), with only the
        stages the call reaches encoded; pass ``**switch.start(...)`` and ``callback_on_step_end=switch``."""
        cfg = config or GenerationConfig()
        pipeline = pipeline or self.pipe
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        texts = [self.stage_prompts(p, prospect_words, cfg.num_inference_steps) for p in prompts]
        negative = cfg.negative_prompt
        if negative is not None:
            try:
                negative = self.stage_prompts(negative, None, cfg.num_inference_steps)
            except SpectrumError as err:
                raise SpectrumError(f"negative_prompt: {err}") from None
            negative = negative[0] if len(set(negative)) == 1 else negative  # one text: as a stock call encodes it
        reached = denoised_timesteps(pipeline, cfg.num_inference_steps, strength)
        return StageSwitch.encode(pipeline, texts, negative, self.stage_map,
                                  self.stage_map.stages(reached), cfg.num_images_per_prompt, clip_skip)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = "*",
        prospect_words: Sequence[str | int] | None = None,
        image: Image.Image | torch.Tensor | None = None,
        config: GenerationConfig | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        mask_image=None,
        pipeline=None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        **kwargs,
    ) -> GenerationResult:
        """Generate with one prompt per stage: txt2img; with ``image``, img2img; with ``image`` and
        ``mask_image``, inpainting; with ``pipeline``, that stock pipeline (``image`` is then its own
        argument, e.g. ControlNet's control image). ``config`` holds the settings, and any of its fields
        may also be given as keywords; other keywords go to the stock ``__call__`` (``guidance_rescale``,
        ``clip_skip``, ``cross_attention_kwargs``, ``latents``, ...)."""
        settings = {k: kwargs.pop(k) for k in list(kwargs) if k in GENERATION_FIELDS}
        cfg = replace(config or GenerationConfig(), **settings)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        txt2img, img2img, inpaint = FAMILIES[self.family]
        stock = pipeline or self.variant(inpaint if mask_image is not None else img2img if image is not None else txt2img)
        takes = inspect.signature(stock.__call__).parameters
        edits = "strength" in takes and image is not None  # denoises the last share of the steps
        cfg.check(img2img=edits, num_train_timesteps=self.stage_map.num_train_timesteps)
        strength = cfg.strength if edits else None
        switch = self.stage_switch(prompts, prospect_words, cfg, stock, kwargs.get("clip_skip"), strength)
        call = dict(kwargs, num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                    num_images_per_prompt=cfg.num_images_per_prompt, eta=cfg.eta, generator=generator,
                    output_type="latent" if output_type == "latent" else "pt")
        if image is not None:
            call["image"] = image
        if mask_image is not None:
            call["mask_image"] = mask_image
        if edits:
            call["strength"] = cfg.strength
        if "height" in takes:
            call.update(height=cfg.height, width=cfg.width)
        elif edits and (cfg.height or cfg.width):  # stock img2img takes the image's size: resize it first
            call["image"] = _resized(stock, image, cfg.height, cfg.width)
        if isinstance(stock, (StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline)):
            call["image"] = self._one_image_per_output(stock, call["image"], len(prompts) * cfg.num_images_per_prompt,
                                                       generator)
        call.update(switch.start(stock, cfg.num_inference_steps, strength))
        call["callback_on_step_end"] = _compose(callback_on_step_end, callback_on_step_end_tensor_inputs, switch)
        images = _checked(stock, stock(**call).images, output_type)
        params = dict(
            prompt=prompts, prospect_words=list(prospect_words) if prospect_words is not None else None,
            img2img=edits, strength=cfg.strength if edits else None, inpainting=mask_image is not None,
            pipeline=type(stock).__name__, num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance_scale, negative_prompt=cfg.negative_prompt, eta=cfg.eta,
            scheduler=type(stock.scheduler).__name__, num_stages=self.num_stages, concepts=sorted(self.concepts),
        )
        return GenerationResult(images, switch.stage_texts, [int(t) for t in switch.timesteps], switch.stages, params)

    @staticmethod
    def _one_image_per_output(stock, image, batch: int, generator):
        """One input image for several outputs, without diffusers' deprecated duplication: encoded once and the
        latents repeated (the draws of diffusers' duplication), or the image repeated where each copy is encoded."""
        if not isinstance(image, Image.Image) and not (isinstance(image, torch.Tensor) and image.ndim == 3):
            return image  # a list or a batch: diffusers' own rules
        if batch == 1:
            return image
        if (isinstance(generator, list) or stock.vae.config.latent_channels != 4  # stock takes 4-channel latents
                or isinstance(stock, StableDiffusionXLImg2ImgPipeline)):  # (and SDXL may upcast its VAE to encode)
            return [image] * batch if isinstance(image, Image.Image) else image.unsqueeze(0).repeat(batch, 1, 1, 1)
        pixels = stock.image_processor.preprocess(image)
        vae = stock.vae
        encoded = retrieve_latents(vae.encode(pixels.to(stock._execution_device, vae.dtype)), generator=generator)
        return (vae.config.scaling_factor * encoded).repeat(batch, 1, 1, 1)


def _resized(stock, image, height, width):
    if not isinstance(image, Image.Image):
        raise ValueError("height and width resize a PIL input image; resize a tensor before the call")
    return stock.image_processor.resize(image, height or image.height, width or image.width)


class _FunctionCallback(PipelineCallback):
    """A user's plain ``callback_on_step_end`` function, as a PipelineCallback that composes with others."""

    def __init__(self, fn, tensor_inputs: list[str]):
        super().__init__()
        self.fn, self._inputs = fn, list(tensor_inputs)

    @property
    def tensor_inputs(self) -> list[str]:
        return self._inputs

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        return self.fn(pipeline, step_index, timestep, callback_kwargs)


def _compose(user, tensor_inputs, switch: StageSwitch):
    """The user's callback(s) first, then the stage switch (which sees, e.g., a guidance cut-off)."""
    if user is None:
        return switch
    if isinstance(user, MultiPipelineCallbacks):
        return MultiPipelineCallbacks([*user.callbacks, switch])
    if not isinstance(user, PipelineCallback):
        user = _FunctionCallback(user, tensor_inputs or ["latents"])
    return MultiPipelineCallbacks([user, switch])


def _checked(stock, images, output_type: str):
    """The stock pipeline's output as ``output_type``, refusing NaN (which would silently become black images)."""
    if output_type == "latent":
        return images
    if not torch.isfinite(images).all():
        raise ValueError("the denoiser or the VAE decoder produced NaN or infinite values: the model's weights are "
                         "damaged, or float16 overflowed (try --dtype float32 / torch_dtype=torch.float32)")
    if output_type == "pt":
        return images
    array = stock.image_processor.pt_to_numpy(images)
    return array if output_type == "np" else stock.image_processor.numpy_to_pil(array)


def _not_int(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)
