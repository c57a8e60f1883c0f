"""Shared fixtures: a tiny Stable Diffusion pipeline built in code, with the real CLIP tokenizer."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker: the workers share the machine's cores
    torch.set_num_threads(1)

from prospect.loading import CONFIG_DIR  # noqa: E402

SHIPPED_TOKENIZER = CONFIG_DIR / "sd-v1" / "tokenizer"

TINY_DIM = 32  # text hidden size = UNet cross-attention dim
TINY_DIM_2 = 48  # the tiny SDXL's second text encoder (its own width, as clip_g's 1280 is not clip_l's 768)


def write_reference_images(folder: Path, n: int = 2) -> Path:
    """``folder/refs/r0.png ...``: n random 24x20 RGB images (odd size on purpose), fixed seed."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "refs").mkdir()
    for k in range(n):
        Image.fromarray((rng.random((20, 24, 3)) * 255).astype("uint8")).save(folder / "refs" / f"r{k}.png")
    return folder / "refs"


def write_report(variable: str, rows: list[dict]) -> None:
    """Write what a module's cases observed as JSON to the file named by the environment ``variable``, if set
    (every case must have run in this process: the docs' tables are built from the file)."""
    import json

    target = os.environ.get(variable)
    if target and os.environ.get("PYTEST_XDIST_WORKER"):
        raise RuntimeError(f"{variable} needs every case in one process: add -n 0")
    if target:
        Path(target).write_text(json.dumps(rows, indent=1) + "\n")


def build_tiny_pipeline(tokenizer_dir: Path, prediction_type: str = "epsilon", seed: int = 0):
    """A random-weight SD-1.x-shaped pipeline small enough to run in milliseconds on a CPU."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_DIM,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    text_config = CLIPTextConfig(
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_size=TINY_DIM,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=49408,
        max_position_embeddings=77,
    )
    text_encoder = CLIPTextModel(text_config)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture(scope="session")
def clip_tokenizer_dir(tmp_path_factory) -> Path:
    """The real SD 1.x CLIP tokenizer, as shipped with the package's single-file configs."""
    folder = tmp_path_factory.mktemp("clip-tokenizer") / "tokenizer"
    shutil.copytree(SHIPPED_TOKENIZER, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, clip_tokenizer_dir) -> Path:
    """A tiny SD pipeline saved as a diffusers folder (epsilon prediction)."""
    folder = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_pipeline(clip_tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_vpred_model_dir(tmp_path_factory, clip_tokenizer_dir) -> Path:
    """The same tiny pipeline with v-prediction (as Stable Diffusion 2.x)."""
    folder = tmp_path_factory.mktemp("tiny-sd-v")
    build_tiny_pipeline(clip_tokenizer_dir, prediction_type="v_prediction").save_pretrained(folder)
    return folder


@pytest.fixture()
def tiny_pipe(clip_tokenizer_dir):
    """A fresh in-memory tiny pipeline (tests may mutate it)."""
    return build_tiny_pipeline(clip_tokenizer_dir)


def build_tiny_sdxl(tokenizer_dir: Path, seed: int = 0):
    """A random-weight SDXL-shaped pipeline: two tiny CLIP text encoders (the second with a projection, whose
    pooled output conditions the UNet with the size and crop ids), small enough for a CPU test."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=4, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 4 + TINY_DIM_2, cross_attention_dim=TINY_DIM + TINY_DIM_2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4,
                        norm_num_groups=4, sample_size=16)

    def text_config(width: int):
        return CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=width,
                              intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2,
                              vocab_size=49408, max_position_embeddings=77, projection_dim=width, hidden_act="gelu")

    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=vae.eval(), text_encoder=CLIPTextModel(text_config(TINY_DIM)).eval(),
        text_encoder_2=CLIPTextModelWithProjection(text_config(TINY_DIM_2)).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir), tokenizer_2=CLIPTokenizer.from_pretrained(tokenizer_dir),
        unet=unet.eval(), scheduler=scheduler,
    )


@pytest.fixture()
def tiny_sdxl(clip_tokenizer_dir):
    """A fresh in-memory tiny SDXL pipeline."""
    return build_tiny_sdxl(clip_tokenizer_dir)


def assert_resumes_exactly(pipe, images, cfg, whole, other, checkpoint: Path) -> None:
    """An inversion with ``cfg`` (checkpoint_every 2) stopped after 2 steps and resumed gives ``whole``'s tokens, and
    its checkpoint refuses a run with the settings ``other``."""
    from dataclasses import replace

    from prospect.distributed import Solo
    from prospect.inversion import InversionError, invert

    invert(pipe, images, replace(cfg, steps=2), checkpoint=checkpoint, progress=False, accelerator=Solo("cpu"))
    resumed = invert(pipe, images, cfg, checkpoint=checkpoint, resume=True, progress=False, accelerator=Solo("cpu"))
    torch.testing.assert_close(resumed.embeddings, whole.embeddings, rtol=0, atol=1e-6)
    with pytest.raises(InversionError, match="does not match|other|settings"):  # a checkpoint of another run
        invert(pipe, images, other, checkpoint=checkpoint, resume=True, progress=False, accelerator=Solo("cpu"))
