"""Loading Stable Diffusion models from local files only: diffusers folders and single files.

Nothing here reaches for the network: folders load with ``local_files_only=True``; original
single-file checkpoints (``.ckpt`` / ``.safetensors``) load through a config folder shipped in
``prospect/configs`` (SD 1.x, 2.x or SDXL layout), as diffusers' ``from_single_file`` needs to stay offline.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path

from .verbosity import quiet_by_default

quiet_by_default()  # before diffusers' first import logs its notes

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


# the embedded model's weights, found by path: the core does not import the toy world's code
EMBEDDED_MODEL = Path(__file__).resolve().parent / "toyworld" / "model"


def _default_model() -> Path:
    path = EMBEDDED_MODEL
    if not (path / "model_index.json").exists():
        raise ModelError(f"the embedded model is missing at {path}; reinstall prospect or pass --model")
    return path


_INT_FIELDS = ("sample_size", "in_channels", "out_channels", "latent_channels", "cross_attention_dim",
               "num_train_timesteps", "hidden_size", "vocab_size")


def _check_folder(path: Path) -> None:
    """Refuse, in one line, a folder that is not a diffusers SD layout or whose configs are not well-formed."""
    missing = [p for p in ("model_index.json", *_PARTS) if not (path / p).exists()]
    if missing:
        raise ModelError(f"{path} is not a Stable Diffusion folder: missing {', '.join(missing)}")
    configs = [path / "model_index.json", *(path / part / "config.json" for part in _MODULES),
               path / "scheduler" / "scheduler_config.json"]
    for config in configs:
        if not config.exists():
            continue  # diffusers names what is missing
        if not config.is_file():
            raise ModelError(f"{config} is a folder, not a JSON file; restore the model's {config.name}")
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ModelError(f"{config} is not valid JSON ({str(err).splitlines()[0]}); restore it") from None
        if not isinstance(data, dict):
            raise ModelError(f"{config} must hold a JSON object, got {type(data).__name__}; restore it")
        for key in _INT_FIELDS:
            value = data.get(key)
            ints = value if isinstance(value, list) else [value]
            if value is not None and not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
                raise ModelError(f"{config}: {key} must be an integer, got {json.dumps(value)}; restore it")


def _is_sdxl_folder(path: Path) -> bool:
    """An SDXL diffusers folder (model_index.json names an XL pipeline); its second encoder must be there."""
    name = json.loads((path / "model_index.json").read_text(encoding="utf-8")).get("_class_name", "")
    if "XL" not in str(name):
        return False
    missing = [p for p in ("text_encoder_2", "tokenizer_2") if not (path / p).exists()]
    if missing:
        raise ModelError(f"{path} is an SDXL folder without {', '.join(missing)}; restore them")
    return True


def load_pipeline(
    model: str | Path | None = None,
    torch_dtype: torch.dtype | None = None,
    config: str | Path | None = None,
) -> StableDiffusionPipeline:
    """Load a local SD model: None = the embedded toy model; a folder; or a single checkpoint file.

    ``config`` (single files only) is a diffusers-layout folder describing the architecture; by
    default the shipped ``configs/sd-v1`` (SD 1.5), ``configs/sd-v2`` (SD 2.1 768-v, v-prediction) or
    ``configs/sdxl`` (SDXL base 1.0), chosen from the checkpoint's weight names (an OpenCLIP text encoder
    means SD 2.x, two embedders SDXL). For an SD 2.x *base* (512 px, epsilon) checkpoint pass a config
    folder whose scheduler says ``epsilon``.
    """
    from .verbosity import progress_bars

    path = _default_model() if model is None else Path(model).expanduser()
    if not path.exists():
        raise ModelError(f"model not found: {path} (give a diffusers folder or a .ckpt/.safetensors file)")
    kwargs = dict(local_files_only=True, safety_checker=None, requires_safety_checker=False)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if path.is_dir():
        _check_folder(path)
        xl = _is_sdxl_folder(path)
        try:
            if xl:  # SDXL: two text encoders, no safety checker
                from diffusers import StableDiffusionXLPipeline

                pipe = StableDiffusionXLPipeline.from_pretrained(
                    path, **{k: v for k, v in kwargs.items() if "safety" not in k})
            else:
                pipe = StableDiffusionPipeline.from_pretrained(path, **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
            raise ModelError(f"cannot load the model folder {path}: {str(err).splitlines()[0]}") from err
    else:
        pipe = _load_single_file(path, config, kwargs)
    pipe.set_progress_bar_config(disable=not progress_bars())
    return pipe


_UNET_PREFIX, _VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
_CLIP_V1_PREFIX, _CLIP_V2_PREFIX = "cond_stage_model.transformer.", "cond_stage_model.model."  # CLIP / OpenCLIP
_XL_CLIP_L, _XL_CLIP_G = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."  # SDXL base
_CONFIG_PARTS = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "tokenizer/tokenizer_config.json",
    "scheduler/scheduler_config.json",
)
_MODULES = ("unet", "vae", "text_encoder")
_XL_PARTS = ("text_encoder_2/config.json", "tokenizer_2/tokenizer_config.json")  # what an SDXL config folder adds
_SHARED_VOCAB = CONFIG_DIR / "sd-v1" / "tokenizer"  # sd-v2 uses the same CLIP BPE, padded with "!"


def _checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Weight names and shapes of a single file, read without loading it (no code runs)."""
    if path.suffix == ".safetensors":
        from .concept import _sniff

        with open(path, "rb") as f:
            kind = _sniff(f.read(9), path.stat().st_size)
        if kind:
            raise ModelError(f"{path} is a {kind}, not safetensors; refusing to unpickle it")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"it holds a {type(state).__name__}, not a state dict")
        return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    except pickle.UnpicklingError as err:  # torch.load(weights_only=True) refused the pickle
        raise ModelError(f"cannot read the checkpoint {path}: {_unpickling_reason(err)}") from err
    except Exception as err:
        raise ModelError(f"cannot read the checkpoint {path}: {_first_line(err)}") from err


def _unpickling_reason(err: BaseException) -> str:
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+) (?:was not an allowed global|whose module)", text)
    if found:
        return (f"it pickles {found.group(1)}, not only tensors, and unpickling that could run code; "
                "convert it to .safetensors with a tool you trust")
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    return f"not a PyTorch checkpoint ({found.group(1).strip() if found else _first_line(err)})"


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _checkpoint_family(path: Path, shapes: dict[str, tuple[int, ...]]) -> str:
    """'sd-v1', 'sd-v2' or 'sdxl' from the weight names; a ModelError for anything else."""
    keys = list(shapes)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("conditioner.embedders."):
        if not (has(_XL_CLIP_L) and has(_XL_CLIP_G)):  # the refiner has one OpenCLIP embedder only
            raise ModelError(f"{path} is an SDXL checkpoint without both text encoders ({_XL_CLIP_L}* and "
                             f"{_XL_CLIP_G}*), e.g. the refiner; give an SDXL base checkpoint")
        if not (has(_UNET_PREFIX) and has(_VAE_PREFIX)):
            raise ModelError(f"{path} lacks the UNet or VAE weights of a full SDXL checkpoint")
        return "sdxl"
    if not has(_UNET_PREFIX):
        hint = ""
        if any(k.split(".")[0] in ("down_blocks", "unet", "encoder", "text_model") for k in keys):
            hint = "; it looks like one diffusers component: give the whole diffusers folder instead"
        raise ModelError(
            f"{path} is not an original Stable Diffusion checkpoint (no model.diffusion_model.* weights){hint}"
        )
    missing = [name for prefix, name in ((_VAE_PREFIX, "VAE (first_stage_model.*)"),
                                         ("cond_stage_model.", "text encoder (cond_stage_model.*)")) if not has(prefix)]
    if missing:
        raise ModelError(f"{path} lacks the {' and the '.join(missing)} weights; give a full SD checkpoint")
    if has(_CLIP_V2_PREFIX):
        return "sd-v2"
    if has(_CLIP_V1_PREFIX):
        return "sd-v1"
    raise ModelError(f"{path}: unknown text encoder layout (neither cond_stage_model.transformer.* nor .model.*)")


def _check_config(config: Path, family: str) -> None:
    if not config.is_dir():  # diffusers would take anything else for a Hub repo id and try to download it
        raise ModelError(f"config {config} is not a folder (give a diffusers-layout model or config folder)")
    parts = _CONFIG_PARTS + (_XL_PARTS if family == "sdxl" else ())
    missing = [p for p in parts if not (config / p).exists()]
    if missing:
        raise ModelError(f"config folder {config} is missing {', '.join(missing)}")


def _check_against_config(path: Path, shapes: dict[str, tuple[int, ...]], config: Path) -> None:
    """Catch a checkpoint/architecture mismatch before diffusers does (its errors are cryptic)."""
    try:
        unet = json.loads((config / "unet" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"config {config}: unreadable unet/config.json ({_first_line(err)})") from err
    conv_in = shapes.get(_UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != unet.get("in_channels", 4):
        raise ModelError(
            f"{path}: its UNet takes {conv_in[1]} input channels but {config} expects "
            f"{unet.get('in_channels', 4)} (inpainting and other variants need their own config)"
        )
    to_k = [s for k, s in shapes.items() if k.startswith(_UNET_PREFIX) and k.endswith("attn2.to_k.weight")]
    context = to_k[0][-1] if to_k else None
    expected = unet.get("cross_attention_dim")
    if context is not None and isinstance(expected, int) and context != expected:
        raise ModelError(
            f"{path}: its UNet cross-attention width is {context} but {config} expects {expected} "
            "(SD 1.x is 768, SD 2.x is 1024); pass the matching config"
        )


def _tokenizer(config: Path, subfolder: str = "tokenizer"):
    """The config folder's tokenizer; one without vocab files borrows the shipped CLIP BPE files."""
    from transformers import CLIPTokenizer

    folder = config / subfolder
    if (folder / "vocab.json").exists() or (folder / "tokenizer.json").exists():
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    overrides = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).exists():
            overrides.update(json.loads((folder / name).read_text(encoding="utf-8")))
    overrides = {k: v for k, v in overrides.items() if isinstance(v, (str, int, bool)) and k != "tokenizer_class"}
    return CLIPTokenizer.from_pretrained(_SHARED_VOCAB, local_files_only=True, **overrides)


def _load_single_file(path: Path, config: str | Path | None, kwargs: dict) -> StableDiffusionPipeline:
    if path.suffix not in (".ckpt", ".safetensors"):
        raise ModelError(f"{path}: a single-file model must be .ckpt or .safetensors")
    if not path.is_file():
        raise ModelError(f"{path} is not a file")
    shapes = _checkpoint_shapes(path)
    family = _checkpoint_family(path, shapes)
    config = CONFIG_DIR / family if config is None else Path(config).expanduser()
    _check_config(config, family)
    _check_against_config(path, shapes, config)
    modules = _MODULES + (("text_encoder_2",) if family == "sdxl" else ())
    try:  # diffusers reads .ckpt with torch.load(weights_only=True): tensors only, no code runs
        if family == "sdxl":  # two tokenizers, no safety checker
            from diffusers import StableDiffusionXLPipeline

            pipe = StableDiffusionXLPipeline.from_single_file(
                str(path), config=str(config), tokenizer=_tokenizer(config), tokenizer_2=_tokenizer(config, "tokenizer_2"),
                **{k: v for k, v in kwargs.items() if "safety" not in k})
        else:
            pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config), tokenizer=_tokenizer(config),
                                                            **kwargs)
    except Exception as err:  # diffusers raises many types here; all mean "cannot load"
        if "meta tensor" in str(err):  # a weight the file lacks stayed on the meta device
            raise ModelError(f"{path} lacks weights that {config} needs; the file and config do not match") from err
        raise ModelError(f"cannot load the checkpoint {path} with config {config}: {_first_line(err)}") from err
    unloaded = [name for name in modules if any(p.is_meta for p in getattr(pipe, name).parameters())]
    if unloaded:  # diffusers leaves weights the file lacks on the meta device, silently for some parts
        raise ModelError(
            f"{path} lacks weights for the {', '.join(unloaded)} of {config}; the file and config do not match"
        )
    return pipe


def make_scheduler(name: str, pipe: StableDiffusionPipeline):
    """A scheduler by short name, configured from the model's own scheduler config."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(pipe.scheduler.config)


EMBEDDED_NAME = "prospect/toy-world"


def model_name(pipe) -> str:
    """The name a concept records of the model it was learned on: the embedded model's, a local
    folder's or file's own name (never its path: a shared concept must not carry the trainer's
    folders), or the model's id as it was given."""
    given = str(pipe.config.get("_name_or_path", "") or "")
    if not given:
        return ""
    path = Path(given).expanduser()
    if path.exists():
        return EMBEDDED_NAME if path.resolve() == _default_model().resolve() else path.resolve().name
    return given


def fingerprint(pipe) -> str:
    """A short content fingerprint of the model's vocabulary embeddings (the space a concept lives in):
    the same for two copies of a model, different for a model with another text encoder."""
    import hashlib

    from .concept import text_encoders

    digest = hashlib.sha256()
    for tokenizer, encoder in text_encoders(pipe):  # SDXL: both encoders' vocabularies, one after the other
        rows = encoder.get_input_embeddings().weight[: tokenizer.vocab_size]
        digest.update(rows.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:16]
