"""The prompt spectrum as a diffusers callback: each stage's conditioning, swapped in by the timestep.

``StageSwitch`` is a ``PipelineCallback`` (diffusers' supported extension point, as
``SDCFGCutoffCallback``). After every denoising step it sets ``prompt_embeds`` to the stage of the
timestep the pipeline evaluates next, so a stock pipeline's own ``__call__`` runs ProSpect: txt2img,
img2img, inpainting, ControlNet, with guidance rescale, IP-Adapter, offload hooks and a user's own
callbacks (compose with ``diffusers.callbacks.MultiPipelineCallbacks``)::

    switch = StageSwitch.encode(pipe, stage_texts, negative_prompt="")
    image = pipe(**switch.start(pipe, num_inference_steps=50), num_inference_steps=50,
                 callback_on_step_end=switch).images[0]

``start`` gives the conditioning of the first timestep (the callback only runs after a step).
"""

from __future__ import annotations

from typing import Sequence

from .verbosity import quiet_by_default

quiet_by_default()  # before diffusers' first import logs its notes

import torch
from diffusers.callbacks import PipelineCallback

from .concept import model_family
from .stages import StageMap


def denoised_timesteps(pipe, num_inference_steps: int, strength: float | None = None) -> torch.Tensor:
    """The timesteps ``pipe``'s ``__call__`` will denoise, as it computes them: all (txt2img), or with a
    ``strength`` the last share (img2img, inpainting)."""
    pipe.scheduler.set_timesteps(num_inference_steps, device="cpu")
    if strength is None or not hasattr(pipe, "get_timesteps"):
        return pipe.scheduler.timesteps
    timesteps, _ = pipe.get_timesteps(num_inference_steps, strength, "cpu")
    if len(timesteps) == 0:
        raise ValueError(f"strength {strength} with {num_inference_steps} steps denoises nothing; raise strength "
                         "or steps")
    return timesteps


class StageSwitch(PipelineCallback):
    """Holds per-stage prompt embeddings and puts the right one in place before each step."""

    def __init__(self, stage_embeds: dict[int, torch.Tensor], negative_embeds: torch.Tensor | None,
                 stage_map: StageMap, num_images_per_prompt: int = 1,
                 stage_pooled: dict[int, torch.Tensor] | None = None, negative_pooled: torch.Tensor | None = None):
        """``stage_embeds[k]``: [prompts, L, D] for stage k (the stages the call reaches);
        ``negative_embeds``: [prompts, L, D], used under classifier-free guidance, or a dict of them by stage (a
        negative prompt of its own in each stage). SDXL also conditions on a pooled embedding: ``stage_pooled[k]`` /
        ``negative_pooled`` (a tensor, or a dict by stage as ``negative_embeds``), [prompts, D2], swapped with the
        rest."""
        super().__init__()
        self.stage_embeds = stage_embeds
        self.negative_embeds = negative_embeds
        self.stage_pooled, self.negative_pooled = stage_pooled, negative_pooled
        self.stage_map = stage_map
        self.num_images_per_prompt = num_images_per_prompt
        self.stage_texts: list[list[str]] | None = None  # what was encoded, when built by ``encode``
        self.trace: list[tuple[float, int]] = []  # (timestep, stage) of every step evaluated
        self._current: int | None = None
        self._cache: dict[tuple[str, int, bool], torch.Tensor] = {}

    @property
    def tensor_inputs(self) -> list[str]:
        return ["prompt_embeds"] + (["add_text_embeds"] if self.stage_pooled is not None else [])

    @classmethod
    @torch.no_grad()
    def encode(cls, pipe, stage_texts: Sequence[Sequence[str]], negative_prompt: str | Sequence[str] | None = None,
               stage_map: StageMap | None = None, stages: Sequence[int] | None = None,
               num_images_per_prompt: int = 1, clip_skip: int | None = None) -> "StageSwitch":
        """Encode each prompt's N stage texts (``stage_texts[p][k]``) with ``pipe``'s text encoder: each
        distinct text once, in one batch with the negative prompt: one text, or N (index = stage) for a
        negative prompt of each stage. ``stages`` limits it to the stages a call reaches."""
        num_stages = len(stage_texts[0])
        stage_map = stage_map or StageMap(num_stages, pipe.scheduler.config.num_train_timesteps)
        stages = sorted(set(range(num_stages) if stages is None else stages))
        per_stage = negative_prompt is not None and not isinstance(negative_prompt, str)
        if per_stage and len(negative_prompt) != num_stages:
            raise ValueError(f"{len(negative_prompt)} negative stage texts for {num_stages} stages")
        negatives = [negative_prompt[k] for k in stages] if per_stage else [negative_prompt or ""]
        # as stock SDXL: no negative prompt means zeros where the model was trained so
        sdxl = model_family(pipe) == "sdxl"  # both encoders' hidden states, and the pooled embedding
        zeros = sdxl and negative_prompt is None and pipe.config.get("force_zeros_for_empty_prompt", False)
        unique = sorted({texts[k] for texts in stage_texts for k in stages} | (set() if zeros else set(negatives)))
        row = {text: i for i, text in enumerate(unique)}
        pick = lambda rows: {k: rows[[row[texts[k]] for texts in stage_texts]] for k in stages}  # noqa: E731
        batch = len(stage_texts)

        def negative_of(rows: torch.Tensor):
            if zeros:
                return torch.zeros_like(rows[:1]).expand(batch, *rows.shape[1:])
            if per_stage:
                return {k: rows[[row[negative_prompt[k]]] * batch] for k in stages}
            return rows[[row[negatives[0]]] * batch]

        if sdxl:
            embeds, _, pooled, _ = pipe.encode_prompt(unique, device=pipe._execution_device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False, clip_skip=clip_skip)
            switch = cls(pick(embeds), negative_of(embeds), stage_map, num_images_per_prompt, pick(pooled),
                         negative_of(pooled))
        else:
            embeds, _ = pipe.encode_prompt(unique, pipe._execution_device, 1, False, clip_skip=clip_skip)
            switch = cls(pick(embeds), negative_of(embeds), stage_map, num_images_per_prompt)
        switch.stage_texts = [list(texts) for texts in stage_texts]
        return switch

    def start(self, pipe, num_inference_steps: int, strength: float | None = None) -> dict[str, torch.Tensor]:
        """``prompt_embeds`` and ``negative_prompt_embeds`` for the stock ``__call__``: the first timestep's stage."""
        self.trace = []
        self._current = self.stage_map.stage(denoised_timesteps(pipe, num_inference_steps, strength)[0])
        embeds = {"prompt_embeds": self.stage_embeds[self._check(self._current)]}
        if self.negative_embeds is not None:
            embeds["negative_prompt_embeds"] = _of_stage(self.negative_embeds, self._current)
        if self.stage_pooled is not None:
            embeds["pooled_prompt_embeds"] = self.stage_pooled[self._current]
            embeds["negative_pooled_prompt_embeds"] = _of_stage(self.negative_pooled, self._current)
        return embeds

    def _check(self, stage: int) -> int:
        if stage not in self.stage_embeds:
            raise ValueError(f"stage {stage} was not encoded (encoded: {sorted(self.stage_embeds)})")
        return stage

    def _batched(self, name: str, per_stage: dict, negative, stage: int, guided: bool) -> torch.Tensor:
        """The loop's batch of one stage (images, with the negative rows first when ``guided``), built once per
        stage and call, so each step only looks it up."""
        key = (name, self._check(stage), guided)
        if key not in self._cache:
            cond = per_stage[stage].repeat_interleave(self.num_images_per_prompt, dim=0)
            if guided:
                negative = _of_stage(negative, stage)
                cond = torch.cat([negative.repeat_interleave(self.num_images_per_prompt, dim=0), cond])
            self._cache[key] = cond
        return self._cache[key]

    def callback_fn(self, pipeline, step_index: int, timestep, callback_kwargs: dict) -> dict:
        self.trace.append((float(timestep), self._current))
        timesteps = pipeline.scheduler.timesteps  # the pipeline denoises its last num_timesteps entries
        following = len(timesteps) - pipeline.num_timesteps + step_index + 1
        if following < len(timesteps):
            stage = self.stage_map.stage(timesteps[following])
            if stage != self._current:  # a user's callback may change the embeddings within a stage
                guided = pipeline.do_classifier_free_guidance
                callback_kwargs["prompt_embeds"] = self._batched("hidden", self.stage_embeds, self.negative_embeds,
                                                                 stage, guided)
                if self.stage_pooled is not None:
                    callback_kwargs["add_text_embeds"] = self._batched("pooled", self.stage_pooled,
                                                                       self.negative_pooled, stage, guided)
                self._current = stage
        return callback_kwargs

    @property
    def timesteps(self) -> list[float]:
        return [t for t, _ in self.trace]

    @property
    def stages(self) -> list[int]:
        return [k for _, k in self.trace]


def _of_stage(negative, stage: int) -> torch.Tensor:
    """A negative conditioning shared by every stage, or the given stage's own."""
    return negative[stage] if isinstance(negative, dict) else negative
