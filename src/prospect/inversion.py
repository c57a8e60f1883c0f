"""ProSpect inversion: one token embedding per stage, learned with the diffusion model frozen.

Implements the training side of ProSpect (Zhang et al., 2023): textual inversion where a
sample at timestep t is captioned with the token of stage(t). Only the N concept rows get
gradients; the UNet, VAE and text encoder are frozen and no weight gradient is computed. On SDXL
each stage's token has a row in both text encoders, both learned, and the UNet's size and crop
conditioning comes from the training images.
Randomness of step s is drawn from (seed, s) for the global batch and sliced per process, so
a resumed run, or one spread over several processes, equals a single uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from numbers import Integral, Real
from pathlib import Path
from typing import Callable, Sequence

from .verbosity import quiet_by_default

quiet_by_default()  # before diffusers' first import logs its notes

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image
from tqdm.auto import tqdm

from .captions import all_templates, check_template, template_pool, timestep_template
from .checkpoint import load_checkpoint, save_checkpoint
from .concept import Concept, add_to_pipeline, check_placeholder, init_embeddings, model_family, text_encoders
from .data import MAX_SIDE, prepare, rotate_hue, shuffle_patches, size_conditioning, to_tensor
from .loading import fingerprint as model_fingerprint, model_name
from . import stage_choice
from .stages import StageMap, timestep_span
from .token_rows import ConceptRows, StageMapper, roughness


class InversionError(RuntimeError):
    """Training cannot go on (non-finite loss, incompatible checkpoint), with what to do."""


@dataclass
class InversionConfig:
    """Settings of one inversion (the CLI flags of ``prospect train`` map onto these)."""

    placeholder: str = field(default="*", metadata={"help": "the word prompts use for the concept"})
    initializer: str = field(default="object", metadata={
        "flag": "--init-word", "help": "initializer word(s): each stage's token starts from their embedding (as many "
                                      "words as --vectors-per-stage start one vector each)"})
    num_stages: int = field(default=10, metadata={"flag": "--stages", "help": "number of stages N"})
    vectors_per_stage: int = field(default=6, metadata={"help": "prompt tokens each stage's token stands for"})
    # 6, not 1: on the embedded model one vector per stage reconstructs 0.09, six 0.47 (docs/inversion-fidelity.md)
    parameterization: str = field(default="free", metadata={
        "choices": ("free", "shared", "mapper"),
        "help": "free: N independent stage tokens; shared: a token shared by all stages plus a per-stage difference; "
                "mapper: a small transformer block maps the initializer's embedding to the N tokens (official code)"})
    smoothness: float = field(default=0.0, metadata={
        "help": "weight of a penalty on the squared distance between neighbouring stages' tokens (0 = off)"})
    ti_warmup: int = field(default=0, metadata={
        "help": "steps at the start that learn one token for every stage (textual inversion) before each stage "
                "learns its own difference from it (0 = none)"})
    stage_choice: int = field(default=16, metadata={
        "help": "after training, each stage keeps whichever stage's token denoises the reference best at its "
                "timesteps, judged on this many fixed draws per stage (0 = each stage keeps its own)"})
    # 16, not 0: the last stages' own tokens drift on noise and undo the shape; pilot all 0.50 -> 1.00
    # (docs/inversion-fidelity.md)
    steps: int = field(default=500, metadata={"help": "optimisation steps"})
    lr: float = field(default=5e-3, metadata={"help": "AdamW learning rate of the token rows"})
    batch_size: int = field(default=10, metadata={"help": "samples per step (train: over all processes)"})
    resolution: int | None = field(default=None, metadata={"help": "training size in pixels (default: the model's)"})
    crop: str = field(default="center", metadata={"choices": ("center", "none"),
                                                  "help": "center: square crop, then resize; none: stretch (official)"})
    flip_p: float = field(default=0.0, metadata={
        "help": "probability of a horizontal flip (a flip mirrors the layout, which is an attribute; 0.5 as the "
                "official code for symmetric subjects)"})
    # 0, not the official 0.5: a flip mirrors the layout, which ProSpect transfers (left becomes right)
    hue_jitter_from: int | None = field(default=None, metadata={
        "help": "stages >= this (the first denoising steps) see each reference at a random hue, turned about the "
                "grey axis, so their tokens learn layout and shape but not colour, which the text then decides; "
                "the stage choice keeps them apart from the other stages' tokens (default: off)"})
    hue_jitter_below: int | None = field(default=None, metadata={
        "help": "stages < this (the last denoising steps) see each reference at a random hue, so their tokens learn "
                "texture and material but not colour; combines with --hue-jitter-from (default: off)"})
    shuffle_at: str | None = field(default=None, metadata={
        "help": "LO-HI: the samples of training timestep in [LO, HI) see each reference cut into a 4x4 grid of "
                "patches put back in a random order, so the tokens of those timesteps learn its colours and "
                "textures but not its shape or layout, which the text then decides (default: off)"})
    snr_gamma: float = field(default=0.0, metadata={
        "help": "min-SNR loss weighting with this gamma (Hang et al. 2023; 5 is usual; 0 = off, every timestep "
                "weighs the same)"})
    templates: Sequence[str] = field(default=("{}",), metadata={
        "flag": "--template", "action": "append", "help": "caption template with {} (repeatable; default '{}')"})
    timestep_templates: Sequence[str] = field(default=(), metadata={
        "flag": "--template-at", "action": "append",
        "help": "LO-HI:TEMPLATE, a caption template for the samples whose training timestep is in [LO, HI) only, "
                "drawn with the --template ones (repeatable; SD's stage k of N is [k*1000/N, (k+1)*1000/N)); e.g. "
                "'300-700:a dotted {} square' lets the middle stages' tokens leave texture and shape to the words"})
    stratified: bool = field(default=True, metadata={
        "flag": "--no-stratified", "invert": True, "help": "draw stages at random instead of covering all"})
    seed: int = field(default=0, metadata={"help": "everything random derives from it"})
    checkpoint_every: int = field(default=100, metadata={
        "help": "steps between checkpoints (0 = none): the most an interruption can lose"})
    validation_every: int = field(default=0, metadata={"help": "write a validation image every K steps (0 = never)"})
    mixed_precision: str = field(default="no", metadata={"choices": ("no", "fp16", "bf16"),
                                                         "help": "GPU autocast (CPU always runs fp32)"})
    extra: dict = field(default_factory=dict, metadata={"flag": None})  # free-form notes stored in the checkpoint


# upper bounds that keep a typo from allocating without end; the stages also must fit the model's timesteps
MAX_LR = 10.0  # textual inversion uses about 5e-3; far above this the embeddings only blow up
LIMITS = {"steps": 10_000_000, "batch_size": 4096, "num_stages": 1000, "vectors_per_stage": 75}
MAX_CHOICE_SAMPLES = 4096  # stage_choice: one model call holds this many samples
HUES = 6  # hue_jitter_from: the reference is seen turned by 0, 60, ..., 300 degrees, each as likely
SHUFFLES, GRID = 8, 4  # shuffle_at: the reference is seen in one of 8 fixed orders of its 4x4 patches, each as likely
_WHY = {"vectors_per_stage": " (a stage's tokens must fit CLIP's 77-token prompt)"}


def check_config(cfg: InversionConfig) -> None:
    """Refuse settings that would crash mid-run or silently learn nothing (before any model loads)."""
    for name, top in LIMITS.items():
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, Integral) or not 1 <= value <= top:
            raise InversionError(f"{name} must be an integer in [1, {top}], got {value!r}{_WHY.get(name, '')}")
    for name, never in (("validation_every", "never"), ("checkpoint_every", "no checkpoints"), ("ti_warmup", "none"),
                        ("stage_choice", "each stage keeps its own token")):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
            raise InversionError(f"{name} must be an integer >= 0 (0 = {never}), got {value!r}")
    if cfg.stage_choice > MAX_CHOICE_SAMPLES:
        raise InversionError(f"stage_choice must be at most {MAX_CHOICE_SAMPLES} draws per stage, got {cfg.stage_choice}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, Integral) or not 0 <= cfg.seed < 2 ** 63:
        raise InversionError(f"seed must be an integer in [0, 2**63), got {cfg.seed!r}")
    for name in ("lr", "flip_p", "snr_gamma", "smoothness"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, Real):
            raise InversionError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    for name, choices in (("crop", ("center", "none")), ("mixed_precision", ("no", "fp16", "bf16"))):
        if getattr(cfg, name) not in choices:
            raise InversionError(f"{name} must be one of {', '.join(map(repr, choices))}, got {getattr(cfg, name)!r}")
    if not isinstance(cfg.initializer, str):
        raise InversionError(f"initializer must be a string, got {type(cfg.initializer).__name__}")
    try:
        check_placeholder(cfg.placeholder)
    except ValueError as err:
        raise InversionError(str(err)) from None
    if isinstance(cfg.templates, str) or not all(isinstance(t, str) for t in cfg.templates):
        raise InversionError(f"templates must be a list of strings with '{{}}', got {cfg.templates!r}")
    if cfg.resolution is not None and (isinstance(cfg.resolution, bool) or not isinstance(cfg.resolution, Integral)):
        raise InversionError(f"resolution must be an integer or None, got {cfg.resolution!r}")
    if cfg.resolution is not None and (cfg.resolution < 8 or cfg.resolution % 8 or cfg.resolution > MAX_SIDE):
        raise InversionError(f"resolution must be a positive multiple of 8 up to {MAX_SIDE}, got {cfg.resolution}")
    if cfg.parameterization not in ("free", "shared", "mapper"):
        raise InversionError(f"parameterization must be 'free', 'shared' or 'mapper', got {cfg.parameterization!r}")
    if cfg.parameterization == "mapper" and cfg.ti_warmup:
        raise InversionError("ti_warmup needs the free or shared parameterization, not the mapper")
    if cfg.hue_jitter_from is not None and (isinstance(cfg.hue_jitter_from, bool) or not isinstance(
            cfg.hue_jitter_from, Integral) or not 0 <= cfg.hue_jitter_from < cfg.num_stages):
        raise InversionError(f"hue_jitter_from must be a stage in [0, {cfg.num_stages - 1}] or None (off), "
                             f"got {cfg.hue_jitter_from!r}")
    if cfg.hue_jitter_below is not None and (isinstance(cfg.hue_jitter_below, bool) or not isinstance(
            cfg.hue_jitter_below, Integral) or not 1 <= cfg.hue_jitter_below <= cfg.num_stages):
        raise InversionError(f"hue_jitter_below must be a stage count in [1, {cfg.num_stages}] or None (off), "
                             f"got {cfg.hue_jitter_below!r}")
    if not 0.0 <= cfg.flip_p <= 1.0:  # also catches NaN
        raise InversionError(f"flip_p must be a probability in [0, 1], got {cfg.flip_p}")
    for name in ("snr_gamma", "smoothness"):
        if not 0 <= getattr(cfg, name) < float("inf"):  # also catches NaN
            raise InversionError(f"{name} must be a finite number >= 0 (0 = off), got {getattr(cfg, name)}")
    if not 0 <= cfg.lr <= MAX_LR:  # also catches NaN; torch's optimisers overflow on lr > 3.4e38
        raise InversionError(f"lr must be a finite number in [0, {MAX_LR:g}], got {cfg.lr}")
    if cfg.shuffle_at is not None:
        try:
            if not isinstance(cfg.shuffle_at, str):
                raise ValueError(f"must be a string LO-HI or None (off), got {cfg.shuffle_at!r}")
            timestep_span(cfg.shuffle_at)
        except ValueError as err:
            raise InversionError(f"shuffle_at: {err}") from None
    if not cfg.templates:
        raise InversionError("give at least one caption template")
    if isinstance(cfg.timestep_templates, str) or not all(isinstance(t, str) for t in cfg.timestep_templates):
        raise InversionError(f"timestep_templates must be a list of 'LO-HI:TEMPLATE' strings, got {cfg.timestep_templates!r}")
    try:
        for tpl in cfg.templates:
            check_template(tpl, f"template {tpl!r}")
        for entry in cfg.timestep_templates:
            timestep_template(entry)
    except ValueError as err:
        raise InversionError(str(err)) from None


@dataclass
class StepLog:
    """What one optimisation step reports to ``on_step``."""

    step: int
    loss: float
    stages: list[int]


def _fingerprint(images: list[Image.Image], cfg: InversionConfig) -> str:
    """Identifies the data and settings a checkpoint belongs to (resume refuses a mismatch)."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("steps", "checkpoint_every", "stage_choice")}
    for name in ("snr_gamma", "ti_warmup", "smoothness"):  # off: the fingerprint of checkpoints made before the option
        if not settings[name]:
            del settings[name]
    for name in ("hue_jitter_from", "hue_jitter_below"):  # off: as before the options
        if settings[name] is None:
            del settings[name]
    if not settings["timestep_templates"]:  # none: as before the option
        del settings["timestep_templates"]
    if settings["shuffle_at"] is None:  # off: as before the option
        del settings["shuffle_at"]
    h = hashlib.sha256(json.dumps(settings,
                                  sort_keys=True, default=list).encode())
    for im in images:
        h.update(im.tobytes())
    return h.hexdigest()[:16]


def jittered(cfg: InversionConfig) -> list[bool]:
    """Per stage, whether it sees the references at random hues (``hue_jitter_from`` / ``hue_jitter_below``)."""
    top = cfg.num_stages if cfg.hue_jitter_from is None else cfg.hue_jitter_from
    below = 0 if cfg.hue_jitter_below is None else cfg.hue_jitter_below
    return [k >= top or k < below for k in range(cfg.num_stages)]


def hues(cfg: InversionConfig) -> int:
    """How many hues each reference is seen at: ``HUES`` where any stage is hue-jittered, else 1 (its own)."""
    return HUES if any(jittered(cfg)) else 1


def shuffled(cfg: InversionConfig, stage_map: StageMap) -> list[bool]:
    """Per stage, whether it sees the references in shuffled patches (its middle timestep in ``shuffle_at``)."""
    if cfg.shuffle_at is None:
        return [False] * cfg.num_stages
    lo, hi = timestep_span(cfg.shuffle_at)
    return [lo <= sum(stage_map.bounds(k)) / 2 < hi for k in range(cfg.num_stages)]


def shuffles(cfg: InversionConfig) -> int:
    """How many patch orders each reference is seen in: 1 (its own) + ``SHUFFLES`` with ``shuffle_at``, else 1."""
    return 1 if cfg.shuffle_at is None else 1 + SHUFFLES


def patch_orders(cfg: InversionConfig) -> torch.Tensor:
    """[shuffles, GRID * GRID]: the identity, then ``SHUFFLES`` random orders of the patches, from the seed alone."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 424_243)
    return torch.stack([torch.arange(GRID * GRID)] + [torch.randperm(GRID * GRID, generator=gen)
                                                       for _ in range(shuffles(cfg) - 1)])


@torch.no_grad()
def _cache_latents(pipe, images: list[Image.Image], cfg: InversionConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every view of every image, computed once: [I, V, C, h, w] each. View
    ``(flip * H + h) * S + s`` is the image (mirrored where ``flip``) turned by hue ``h * 360 / H`` degrees, H =
    ``hues``, its patches in order ``s`` of ``patch_orders`` (S = ``shuffles``; order 0 is the image's own)."""
    res = cfg.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    pixels = to_tensor([prepare(im, res, cfg.crop) for im in images])
    if cfg.shuffle_at is not None and res % GRID:
        raise InversionError(f"shuffle_at cuts the image into a {GRID}x{GRID} grid: the training size {res} must be "
                             f"a multiple of {GRID}")
    pixels = torch.stack([pixels, pixels.flip(-1)], dim=1)  # [I, 2, 3, H, W]
    n = hues(cfg)
    pixels = torch.stack([rotate_hue(pixels, h * 360 / n) if h else pixels for h in range(n)], dim=2)
    orders = patch_orders(cfg)
    pixels = torch.stack([shuffle_patches(pixels, o, GRID) if s else pixels for s, o in enumerate(orders)], dim=3)
    n *= len(orders)
    pixels = pixels.flatten(0, 3)
    vae = pipe.vae
    means, stds = [], []
    for chunk in pixels.split(8):  # the VAE's activations of a few images at a time
        dist = vae.encode(chunk.to(device, vae.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    shape = (len(images), 2 * n, *means[0].shape[1:])
    return torch.cat(means).reshape(shape), torch.cat(stds).reshape(shape)


def _draw(step: int, cfg: InversionConfig, num_images: int, stage_map: StageMap, latent_shape) -> dict:
    """The global batch's random choices for one step, from (seed, step) alone."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    b, n = cfg.batch_size, cfg.num_stages
    if cfg.stratified:  # consecutive steps walk through a fixed permutation of all stages
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
        stages = order[(torch.arange(b) + step * b) % n]
    else:
        stages = torch.randint(0, n, (b,), generator=gen)
    lo_hi = torch.tensor([stage_map.bounds(int(s)) for s in stages])
    t = lo_hi[:, 0] + (torch.rand(b, generator=gen) * (lo_hi[:, 1] - lo_hi[:, 0])).long()
    d = dict(
        stages=stages,
        t=t,
        image=torch.randint(0, num_images, (b,), generator=gen),
        flip=(torch.rand(b, generator=gen) < cfg.flip_p).long(),
        template=torch.randint(0, len(cfg.templates), (b,), generator=gen),
        eps_latent=torch.randn((b, *latent_shape), generator=gen),
        noise=torch.randn((b, *latent_shape), generator=gen),
    )
    n = hues(cfg)
    hue = torch.zeros(b, dtype=torch.long)
    if n > 1:  # drawn last, so the draws above are those of a run without hue jitter
        hue = torch.randint(0, n, (b,), generator=gen) * torch.tensor(jittered(cfg))[stages].long()
    d["view"] = d.pop("flip") * n + hue
    if cfg.timestep_templates:  # drawn after all else, so a run without them draws as before
        u = torch.rand(b, generator=gen)
        pools = [template_pool(cfg, int(ti)) for ti in t]
        d["template"] = torch.tensor([pool[min(int(ui * len(pool)), len(pool) - 1)] for ui, pool in zip(u, pools)])
    if cfg.shuffle_at is not None:  # drawn after all else, so a run without it draws as before
        lo, hi = timestep_span(cfg.shuffle_at)
        inside = ((t >= lo) & (t < hi)).long()
        d["view"] = d["view"] * shuffles(cfg) + torch.randint(1, shuffles(cfg), (b,), generator=gen) * inside
    return d


def _target(sched: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    kind = sched.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return sched.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise InversionError(f"unsupported prediction_type {kind!r}")


@dataclass
class Inversion:
    """Everything one inversion run holds: built by :func:`setup`, advanced by :func:`step`."""

    pipe: object
    cfg: InversionConfig
    accelerator: object
    sched: DDPMScheduler
    stage_map: StageMap
    concept: Concept  # the concept being learned (its embeddings are the initial ones until the end)
    bases: list[torch.nn.Embedding]  # each text encoder's own input embeddings (SDXL: two)
    layers: list[ConceptRows]  # the trainable rows, in place of ``bases`` during the run
    opt: torch.optim.Optimizer
    mean: torch.Tensor  # cached latent posterior of every view of every image (mirror, hues)
    std: torch.Tensor
    captions: dict  # (stage, template) -> caption text
    fingerprint: str  # of the images and settings, for resume
    num_images: int
    time_ids: torch.Tensor | None = None  # SDXL: each image's size and crop conditioning, [I, 6]

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def base(self) -> torch.nn.Embedding:
        return self.bases[0]

    @property
    def layer(self) -> ConceptRows:
        return self.layers[0]

    def rows(self, encoder: int = 0) -> torch.Tensor:
        """The current concept embeddings of text encoder ``encoder``, [N, V, D] on the CPU in float32."""
        table = self.concept.tables[encoder]
        return self.layers[encoder].rows.detach().float().cpu().reshape(table.shape)

    def learned(self) -> Concept:
        """The concept with the current rows of every text encoder."""
        tables = [self.rows(i) for i in range(len(self.layers))]
        return replace(self.concept, embeddings=tables[0], embeddings_2=tables[1] if len(tables) > 1 else None)

    def parts(self) -> dict[str, torch.nn.Parameter]:
        """Every trainable tensor by checkpoint name: the first encoder's as before SDXL, the second's with "_2"."""
        return {name + ("_2" if i else ""): p for i, layer in enumerate(self.layers) for name, p in layer.parts().items()}

    def swap(self, trainable: bool) -> None:
        """Put the trainable rows (or the encoders' own embeddings) in the text encoders."""
        for (_, encoder), base, layer in zip(text_encoders(self.pipe), self.bases, self.layers):
            encoder.set_input_embeddings(layer if trainable else base)


def setup(pipe, images: list[Image.Image], cfg: InversionConfig, accelerator=None) -> Inversion:
    """Check the settings, freeze the model, add the concept's tokens and build the trainable rows, the optimiser
    and the latent cache (the text encoder keeps its own embeddings until :func:`invert` swaps them)."""
    check_config(cfg)
    if not images:
        raise InversionError("no reference images")
    pipe = getattr(pipe, "pipe", pipe)  # a ProSpectPipeline: its stock pipeline
    if accelerator is None:
        from accelerate import Accelerator

        gpu = torch.cuda.is_available()
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision if gpu else "no", cpu=not gpu)
    if cfg.batch_size % accelerator.num_processes:
        raise InversionError(f"batch size {cfg.batch_size} must be a multiple of the {accelerator.num_processes} processes")
    device = accelerator.device
    encoders = text_encoders(pipe)
    for part in (pipe.unet, pipe.vae, *(enc for _, enc in encoders)):
        part.requires_grad_(False).eval().to(device)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    stage_map = StageMap(cfg.num_stages, sched.config.num_train_timesteps)
    init = [init_embeddings(tok, enc, cfg.initializer, cfg.num_stages, cfg.vectors_per_stage) for tok, enc in encoders]
    concept = Concept(placeholder=cfg.placeholder, embeddings=init[0], num_train_timesteps=sched.config.num_train_timesteps,
                      initializer=cfg.initializer, base_model=model_name(pipe), base_model_fingerprint=model_fingerprint(pipe),
                      embeddings_2=init[1] if len(init) > 1 else None)
    token_ids = add_to_pipeline(pipe, concept)
    bases = [enc.get_input_embeddings() for _, enc in encoders]
    # a shared token plus per-stage deltas: the "shared" parameterization, or a textual-inversion warm-up
    coupled = cfg.num_stages if (cfg.parameterization == "shared" or cfg.ti_warmup) and cfg.num_stages > 1 else 0
    with torch.random.fork_rng(devices=[]):  # the mapper's initial weights come from the seed too
        torch.manual_seed(cfg.seed)
        mappers = [StageMapper(concept.rows(i)) if cfg.parameterization == "mapper" else None for i in range(len(bases))]
    layers = [ConceptRows(base, ids, concept.rows(i).to(device), coupled, mappers[i]).to(device)
              for i, (base, ids) in enumerate(zip(bases, token_ids))]
    opt = torch.optim.AdamW([p for layer in layers for p in layer.parts().values()], lr=cfg.lr, weight_decay=0.0)
    try:
        for entry in cfg.timestep_templates:
            timestep_template(entry, sched.config.num_train_timesteps)
    except ValueError as err:
        raise InversionError(str(err)) from None
    try:
        if cfg.shuffle_at is not None:
            timestep_span(cfg.shuffle_at, sched.config.num_train_timesteps)
    except ValueError as err:
        raise InversionError(f"shuffle_at: {err}") from None
    mean, std = _cache_latents(pipe, images, cfg, device)
    captions = {(k, j): tpl.format(concept.prompt_text(k)) for k in range(cfg.num_stages)
                for j, tpl in enumerate(all_templates(cfg))}
    time_ids = None
    if model_family(pipe) == "sdxl":
        res = cfg.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        time_ids = torch.tensor([size_conditioning(im, res, cfg.crop) for im in images], dtype=torch.float32)
    return Inversion(pipe, cfg, accelerator, sched, stage_map, concept, bases, layers, opt, mean, std, captions,
                     _fingerprint(images, cfg), len(images), time_ids)


def step(run: Inversion, index: int) -> StepLog:
    """Optimisation step ``index``: this process's slice of the global batch drawn from (seed, index), the
    denoising loss, the rows' gradients averaged over the processes, one AdamW update. A non-finite loss leaves
    the rows untouched (the returned loss says so). The text encoders must hold ``run.layers`` (``run.swap(True)``)."""
    cfg, device, acc = run.cfg, run.device, run.accelerator
    rank, world = acc.process_index, acc.num_processes
    d = _draw(index, cfg, run.num_images, run.stage_map, run.mean.shape[2:])
    mine = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)
    d = {k: v[mine].to(device) for k, v in d.items()}
    keys = [(int(k), int(j)) for k, j in zip(d["stages"], d["template"])]
    losses = sample_losses(run, d["image"], d["view"], d["eps_latent"], d["noise"], d["t"], keys)
    if cfg.snr_gamma:  # min-SNR: each sample weighted by min(SNR, gamma) / (SNR + 1 for v, SNR for eps, 1 for x0)
        loss = (_min_snr_weights(run.sched, d["t"], cfg.snr_gamma) * losses).mean()
    else:
        loss = losses.mean()
    loss_all = acc.reduce(loss.detach(), "mean") if world > 1 else loss.detach()
    if cfg.smoothness:  # the same on every process; the reported loss stays the denoising loss
        loss = loss + cfg.smoothness * sum(roughness(layer.rows, cfg.num_stages) for layer in run.layers)
    if torch.isfinite(loss_all):
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        _hold(run, index)
        if world > 1:
            for param in run.parts().values():
                if param.grad is not None:
                    param.grad = acc.reduce(param.grad, "mean")
        run.opt.step()
    return StepLog(index, loss_all.item(), [k for k, _ in keys])


def sample_losses(run: Inversion, image, view, eps_latent, noise, t, keys: list[tuple[int, int]]) -> torch.Tensor:
    """Each sample's denoising loss (mean squared error of the model's prediction), [B]: image ``image`` seen as
    ``view`` (0: itself; see ``_cache_latents``), its latent drawn with ``eps_latent``, noised with ``noise`` to
    timestep ``t`` and captioned with ``run.captions[key]`` (key = (stage of the token, template)). Gradients reach
    the rows the text encoders hold."""
    pipe, device = run.pipe, run.device
    x0 = (run.mean[image, view] + run.std[image, view] * eps_latent) * pipe.vae.config.scaling_factor
    unique = sorted(set(keys))  # encode only the stage prompts this batch needs
    unet_dtype = pipe.unet.conv_in.weight.dtype  # (pipe.unet.dtype walks every module)
    with run.accelerator.autocast():
        states, pooled = _encode(pipe, [run.captions[k] for k in unique], device)
        pick = torch.tensor([unique.index(k) for k in keys], device=device)
        extra = {}
        if pooled is not None:  # SDXL: the pooled embedding of the same caption, and the image's size conditioning
            extra["added_cond_kwargs"] = {"text_embeds": pooled[pick].to(unet_dtype),
                                          "time_ids": run.time_ids.to(device)[image].to(unet_dtype)}
        noisy = run.sched.add_noise(x0, noise, t)
        pred = pipe.unet(noisy.to(unet_dtype), t, encoder_hidden_states=states[pick].to(unet_dtype), **extra).sample
    target = _target(run.sched, x0, noise, t).float()
    return F.mse_loss(pred.float(), target, reduction="none").mean(dim=tuple(range(1, target.dim())))


def _hold(run: Inversion, index: int) -> None:
    """Drop the gradients of the parts that do not learn at step ``index`` (AdamW leaves a part without one as it is):
    during the textual-inversion warm-up the per-stage deltas, after it, with free stages, the shared token."""
    for layer in run.layers:
        if layer.shared is None:
            continue
        if index < run.cfg.ti_warmup:
            layer.delta.grad = None
        elif run.cfg.parameterization == "free":
            layer.shared.grad = None


def _encode(pipe, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The captions' text conditioning, with gradients to the concept rows: the hidden states, and for SDXL
    the pooled embedding (through the pipeline's own ``encode_prompt``, so training sees what generation sees)."""
    if model_family(pipe) == "sdxl":
        states, _, pooled, _ = pipe.encode_prompt(captions, device=device, do_classifier_free_guidance=False)
        return states, pooled
    ids = pipe.tokenizer(captions, padding="max_length", truncation=True, max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids.to(device)
    return pipe.text_encoder(ids)[0], None


def _min_snr_weights(sched: DDPMScheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights of timesteps ``t`` for the scheduler's prediction type (as diffusers' scripts)."""
    alphas = sched.alphas_cumprod.to(t.device)[t].float()
    snr = alphas / (1 - alphas).clamp(min=1e-12)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    kind = sched.config.prediction_type
    if kind == "v_prediction":
        return clipped / (snr + 1)
    if kind == "epsilon":
        return clipped / snr.clamp(min=1e-12)
    return clipped


def invert(
    pipe,
    images: list[Image.Image],
    config: InversionConfig | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    on_step: Callable[[StepLog], None] | None = None,
    validate: Callable[[int, Concept], None] | None = None,
    progress: bool = True,
    accelerator=None,
) -> Concept:
    """Learn a Concept (N per-stage token embeddings) from one or a few reference images, on a stock
    ``StableDiffusionPipeline`` (or a ``ProSpectPipeline``'s).

    On SDXL (``StableDiffusionXLPipeline``) each stage's token is learned in both text encoders.
    The run's policy around :func:`setup` and :func:`step`: resume, checkpoints every
    ``checkpoint_every`` steps, validation images, and a stop on non-finite values that keeps the last
    good checkpoint. ``accelerator`` (default: a new ``accelerate.Accelerator``) spreads each step's
    global batch over the launch's processes; ``prospect.distributed.Solo(device)`` keeps this run to
    one process.
    """
    cfg = config or InversionConfig()
    run = setup(pipe, images, cfg, accelerator)
    ckpt, start = Path(checkpoint) if checkpoint else None, 0
    if resume and ckpt is not None and ckpt.exists():
        start = _resume(ckpt, run.fingerprint, run.parts(), run.opt)
    main_process = run.accelerator.is_main_process
    kept = lambda: f"last good checkpoint {ckpt} kept" if ckpt and ckpt.exists() else "no checkpoint written"  # noqa: E731
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="inversion",
               disable=not (progress and main_process))
    run.swap(trainable=True)
    try:
        for index in bar:
            log = step(run, index)
            if not math.isfinite(log.loss):
                raise InversionError(f"loss became {log.loss} at step {index}; {kept()}; lower --lr")
            if on_step is not None:
                on_step(log)
            bar.set_postfix(loss=f"{log.loss:.4f}", refresh=False)
            done = index + 1
            due = ckpt is not None and cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.steps)
            if (due or done == cfg.steps) and not all(torch.isfinite(layer.rows).all() for layer in run.layers):
                raise InversionError(f"token embeddings became non-finite at step {index}; {kept()}; lower --lr")
            if due:
                if main_process:
                    _save(ckpt, run.parts(), run.opt, done, run.fingerprint, cfg)
                run.accelerator.wait_for_everyone()
            if validate is not None and cfg.validation_every and done % cfg.validation_every == 0 and main_process:
                _validate(validate, done, run)
        learned = run.learned()
        if cfg.stage_choice and cfg.num_stages > 1:  # each stage keeps the token that denoises best there
            groups = [int(j) + 2 * int(s) for j, s in zip(jittered(cfg), shuffled(cfg, run.stage_map))]
            groups = groups if len(set(groups)) > 1 else None
            choice = stage_choice.choose(stage_choice.stage_losses(run, cfg.stage_choice, sample_losses), groups)
            tables = stage_choice.apply(learned.tables, choice)
            learned = replace(learned, embeddings=tables[0], embeddings_2=tables[1] if len(tables) > 1 else None)
    finally:
        bar.close()  # ends the bar's line, so an error message starts on a line of its own
        run.swap(trainable=False)
    run.concept = learned
    add_to_pipeline(run.pipe, run.concept)
    return run.concept


def _validate(validate, done: int, run: Inversion) -> None:
    """Hand the current concept to ``validate`` with the plain embedding tables in place (rows written)."""
    snapshot = run.learned()
    run.swap(trainable=False)
    try:
        add_to_pipeline(run.pipe, snapshot)
        validate(done, snapshot)
    finally:
        run.swap(trainable=True)


def _save(path: Path, parts: dict, opt, step: int, fingerprint: str, cfg: InversionConfig) -> None:
    state = {**{name: p.detach() for name, p in parts.items()}, "opt": opt.state_dict(), "step": step, "fingerprint": fingerprint,
             "config": json.loads(json.dumps(asdict(cfg), default=list))}
    try:
        save_checkpoint(state, path)
    except OSError as err:
        raise InversionError(f"cannot write checkpoint {path}: {err.strerror or err}; the previous one is kept") from err


def _resume(path: Path, fingerprint: str, parts: dict, opt) -> int:
    """Load rows and optimiser state; refuse a damaged checkpoint, or one of other images or settings."""
    fix = "delete it to start over"
    try:
        state = load_checkpoint(path)
    except ValueError as err:
        raise InversionError(f"cannot resume: {err}; {fix}") from err
    if state.get("fingerprint") != fingerprint:
        raise InversionError(f"cannot resume from {path}: it was made with other images or settings ({fix})")
    for name, param in parts.items():
        saved = state.get(name)
        if not isinstance(saved, torch.Tensor) or saved.shape != param.shape or not saved.is_floating_point():
            got = f"{str(saved.dtype).replace('torch.', '')} {tuple(saved.shape)}" if isinstance(saved, torch.Tensor) else "nothing"
            raise InversionError(f"cannot resume from {path}: {name} holds {got}, expected float "
                                 f"{tuple(param.shape)} (damaged file; {fix})")
        if not torch.isfinite(saved).all():
            raise InversionError(f"cannot resume from {path}: {name} holds NaN or infinite values ({fix})")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InversionError(f"cannot resume from {path}: its step {step!r} is not a count ({fix})")
    try:
        opt.load_state_dict(state["opt"])
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise InversionError(f"cannot resume from {path}: its optimiser state does not fit ({type(err).__name__}; {fix})") from None
    for group in opt.param_groups:
        for param in group["params"]:
            for value in opt.state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.ndim and (
                        value.shape != param.shape or not torch.isfinite(value).all()):
                    raise InversionError(f"cannot resume from {path}: its optimiser state is damaged ({fix})")
    with torch.no_grad():
        for name, param in parts.items():
            param.copy_(state[name].to(param.device))
    return step
