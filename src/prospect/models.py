"""Loading Stable Diffusion models from local files only: diffusers folders and single files.

Nothing here reaches for the network: folders load with ``local_files_only=True``; original
single-file checkpoints (``.ckpt`` / ``.safetensors``) load through a config folder shipped in
``prospect/configs`` (SD 1.x or 2.x layout), as diffusers' ``from_single_file`` needs to stay offline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SCHEDULERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "pndm": PNDMScheduler,
    "lms": LMSDiscreteScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}
_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class ModelError(ValueError):
    """A model path that cannot be loaded, with what is wrong and how to fix it."""


def _default_model() -> Path:
    from .toymodel import default_model_path

    path = default_model_path()
    if not (path / "model_index.json").exists():
        raise ModelError(f"the embedded model is missing at {path}; reinstall prospect or pass --model")
    return path


def _check_folder(path: Path) -> None:
    missing = [p for p in ("model_index.json", *_PARTS) if not (path / p).exists()]
    if missing:
        raise ModelError(f"{path} is not a Stable Diffusion folder: missing {', '.join(missing)}")


def load_pipeline(
    model: str | Path | None = None,
    torch_dtype: torch.dtype | None = None,
    config: str | Path | None = None,
) -> StableDiffusionPipeline:
    """Load a local SD model: None = the embedded toy model; a folder; or a single checkpoint file.

    ``config`` (single files only) is a diffusers-layout folder describing the architecture;
    by default the shipped SD 1.x config, or SD 2.x when the file name says ``v2``.
    """
    path = _default_model() if model is None else Path(model).expanduser()
    if not path.exists():
        raise ModelError(f"model not found: {path} (give a diffusers folder or a .ckpt/.safetensors file)")
    kwargs = dict(local_files_only=True, safety_checker=None, requires_safety_checker=False)
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    if path.is_dir():
        _check_folder(path)
        try:
            return StableDiffusionPipeline.from_pretrained(path, **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise ModelError(f"cannot load the model folder {path}: {str(err).splitlines()[0]}") from err
    return _load_single_file(path, config, kwargs)


def _load_single_file(path: Path, config: str | Path | None, kwargs: dict) -> StableDiffusionPipeline:
    if path.suffix not in (".ckpt", ".safetensors"):
        raise ModelError(f"{path}: a single-file model must be .ckpt or .safetensors")
    if config is None:
        config = CONFIG_DIR / ("sd-v2" if "v2" in path.name.lower() else "sd-v1")
    try:  # diffusers reads .ckpt with torch.load(weights_only=True): tensors only, no code runs
        return StableDiffusionPipeline.from_single_file(str(path), config=str(config), **kwargs)
    except Exception as err:  # diffusers raises many types here; all mean "cannot load"
        raise ModelError(f"cannot load the checkpoint {path}: {str(err).splitlines()[0]}") from err


def make_scheduler(name: str, pipe: StableDiffusionPipeline):
    """A scheduler by short name, configured from the model's own scheduler config."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(pipe.scheduler.config)
