"""Model loading: the shipped SD 1.x / 2.x config folders and original single-file checkpoints.

Full-size SD models cannot be built in a test's time, so the single-file path is exercised with
the tiny pipeline: saved as a diffusers folder (the ``config=`` folder), its weights rewritten in
the original LDM key layout by ``ldm_convert`` and loaded back through ``load_pipeline``.
"""

from __future__ import annotations

import importlib.util

import argparse
import json

import pytest
import torch
from conftest import build_tiny_pipeline
from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel
from ldm_convert import pipeline_to_ldm
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTokenizer

from prospect.clip_bpe import vocab_and_merges
from prospect.loading import CONFIG_DIR, ModelError, _tokenizer, load_pipeline

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" with the real CLIP BPE
COMPONENTS = ("unet", "vae", "text_encoder")


# --- the shipped config folders ---------------------------------------------------------------


@pytest.mark.parametrize(
    "family, context, heads, linear, layers, act, scheduler, prediction",
    [
        ("sd-v1", 768, 8, False, 12, "quick_gelu", PNDMScheduler, "epsilon"),
        ("sd-v2", 1024, [5, 10, 20, 20], True, 23, "gelu", DDIMScheduler, "v_prediction"),
    ],
)
def test_shipped_configs_parse(family, context, heads, linear, layers, act, scheduler, prediction):
    folder = CONFIG_DIR / family
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["safety_checker"] == [None, None]
    unet = UNet2DConditionModel.load_config(folder / "unet")
    assert unet["cross_attention_dim"] == context
    assert (unet["attention_head_dim"], unet["use_linear_projection"]) == (heads, linear)
    assert unet["block_out_channels"] == [320, 640, 1280, 1280] and unet["in_channels"] == 4
    vae = AutoencoderKL.load_config(folder / "vae")
    assert vae["block_out_channels"] == [128, 256, 512, 512] and vae["scaling_factor"] == 0.18215
    text = CLIPTextConfig.from_pretrained(folder / "text_encoder", local_files_only=True)
    assert (text.hidden_size, text.num_hidden_layers, text.hidden_act, text.vocab_size) == (context, layers, act, 49408)
    sched = scheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    assert type(sched).__name__ == index["scheduler"][1]
    assert sched.config.prediction_type == prediction and sched.config.beta_schedule == "scaled_linear"


def test_shipped_sdxl_config_builds_sdxl_base_sized_modules():
    """The SDXL config folder, built on the meta device: the parameter counts of SDXL base 1.0."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = CONFIG_DIR / "sdxl"
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        clip_l = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder", local_files_only=True))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2",
                                                                            local_files_only=True))
    assert (count(unet), count(vae), count(clip_l), count(clip_g)) == (2_567_463_684, 83_653_863, 123_060_480,
                                                                      694_659_840)
    assert vae.config.scaling_factor == 0.13025 and unet.config.cross_attention_dim == 768 + 1280
    sched = EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    assert (sched.config.prediction_type, sched.config.timestep_spacing) == ("epsilon", "leading")
    tok2 = _tokenizer(folder, "tokenizer_2")
    assert tok2("a photo of a cat").input_ids == CAT_IDS and tok2.pad_token == "!"
    assert _tokenizer(folder)("a photo of a cat").input_ids == CAT_IDS


def test_sdxl_single_file_round_trip(clip_tokenizer_dir, tmp_path):
    from conftest import build_tiny_sdxl

    ref = build_tiny_sdxl(clip_tokenizer_dir)
    ref.save_pretrained(tmp_path / "config")
    state = pipeline_to_ldm(ref)
    assert {k.split(".")[2] for k in state if k.startswith("conditioner.")} == {"0", "1"}
    save_file(state, tmp_path / "xl.safetensors")
    pipe = load_pipeline(tmp_path / "xl.safetensors", config=tmp_path / "config")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    for name in (*COMPONENTS, "text_encoder_2"):
        want, got = getattr(ref, name).state_dict(), getattr(pipe, name).state_dict()
        assert set(got) == set(want), name
        for key, value in want.items():
            assert torch.equal(got[key], value), f"{name}.{key}"
    kwargs = dict(num_inference_steps=2, output_type="np")
    ours = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    theirs = ref("a photo of a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(ours - theirs).max() < 1e-5
    # without a config the shipped SDXL one is chosen from the keys, and the tiny weights do not fit it
    with pytest.raises(ModelError, match="cross-attention width is 80 but .*sdxl expects 2048"):
        load_pipeline(tmp_path / "xl.safetensors")


def test_shipped_tokenizers():
    v1 = CLIPTokenizer.from_pretrained(CONFIG_DIR / "sd-v1" / "tokenizer", local_files_only=True)
    assert v1("a photo of a cat").input_ids == CAT_IDS
    assert v1.pad_token == "<|endoftext|>" and v1.model_max_length == 77
    v2 = _tokenizer(CONFIG_DIR / "sd-v2")  # shares sd-v1's vocabulary, pads with "!" as OpenCLIP
    assert v2("a photo of a cat").input_ids == CAT_IDS
    assert (v2.pad_token, v2.pad_token_id) == ("!", 0)
    assert v2("a cat", padding="max_length", max_length=6).input_ids == [49406, 320, 2368, 49407, 0, 0]


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="needs open-clip-torch's BPE data file")
def test_shipped_vocab_is_the_clip_bpe():
    vocab, merges = vocab_and_merges()
    folder = CONFIG_DIR / "sd-v1" / "tokenizer"
    assert json.loads((folder / "vocab.json").read_text(encoding="utf-8")) == vocab
    assert (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:] == merges


# --- original single-file checkpoints, round trip through the tiny pipeline ---------------------


def _tiny_v2(tokenizer_dir):
    """The tiny pipeline reshaped like SD 2.x: linear projections, GELU text encoder, v-prediction."""
    from transformers import CLIPTextModel

    pipe = build_tiny_pipeline(tokenizer_dir, prediction_type="v_prediction", seed=1)
    unet_config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
    unet = UNet2DConditionModel.from_config({**unet_config, "use_linear_projection": True,
                                             "attention_head_dim": [2, 4]})
    text_config = pipe.text_encoder.config
    text_config.hidden_act, text_config.pad_token_id = "gelu", 0
    pipe.register_modules(unet=unet.eval(), text_encoder=CLIPTextModel(text_config).eval())
    return pipe


@pytest.fixture(scope="module", params=["v1", "v2"])
def ldm_files(request, tmp_path_factory, clip_tokenizer_dir):
    """(reference pipeline, its diffusers folder, {suffix: single file in the LDM layout})."""
    v2 = request.param == "v2"
    pipe = _tiny_v2(clip_tokenizer_dir) if v2 else build_tiny_pipeline(clip_tokenizer_dir)
    root = tmp_path_factory.mktemp(f"ldm-{request.param}")
    pipe.save_pretrained(root / "config")
    state = pipeline_to_ldm(pipe, open_clip=v2)
    assert any(k.startswith("cond_stage_model.model." if v2 else "cond_stage_model.transformer.") for k in state)
    save_file(state, root / "model.safetensors")
    torch.save({"state_dict": state, "global_step": 1}, root / "model.ckpt")  # tensors only
    return pipe, root / "config", {s: root / f"model{s}" for s in (".safetensors", ".ckpt")}


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_round_trip(ldm_files, suffix):
    ref, config, files = ldm_files
    pipe = load_pipeline(files[suffix], config=config)
    for name in COMPONENTS:
        want, got = getattr(ref, name).state_dict(), getattr(pipe, name).state_dict()
        assert set(got) == set(want), name
        for key, value in want.items():
            assert torch.equal(got[key], value), f"{name}.{key}"
    assert pipe.safety_checker is None
    assert pipe.scheduler.config.prediction_type == ref.scheduler.config.prediction_type
    assert pipe.tokenizer.pad_token == ref.tokenizer.pad_token
    kwargs = dict(num_inference_steps=2, output_type="np")
    ours = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    theirs = ref("a photo of a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert ours.shape == (1, 16, 16, 3)
    assert abs(ours - theirs).max() < 1e-5


def test_single_file_default_config_is_chosen_from_the_weights(ldm_files):
    ref, _, files = ldm_files
    family = "sd-v2" if ref.text_encoder.config.hidden_act == "gelu" else "sd-v1"
    # no config: the shipped full-size one is picked from the keys, and the tiny weights do not fit it
    with pytest.raises(ModelError, match=f"cross-attention width is 32 but .*{family} expects"):
        load_pipeline(files[".safetensors"])


def test_single_file_with_a_mismatched_config_is_refused(ldm_files, tiny_model_dir):
    ref, _, files = ldm_files
    if not ref.unet.config.use_linear_projection:
        pytest.skip("the v1 tiny weights fit the tiny folder")
    # v2 weights (linear attention projections) into the v1-shaped tiny folder (1x1 convolutions)
    with pytest.raises(ModelError, match="cannot load the checkpoint") as info:
        load_pipeline(files[".safetensors"], config=tiny_model_dir)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "dropped",  # a text encoder layer (CLIP / OpenCLIP names), a VAE resnet, a UNet attention block
    [(".encoder.layers.1.", ".resblocks.1."), ("decoder.up.1.block.0.",), ("output_blocks.3.1.",)],
)
def test_single_file_missing_weights_is_refused(ldm_files, tmp_path, dropped):
    _, config, files = ldm_files
    state = {k: v for k, v in load_file(files[".safetensors"]).items() if not any(d in k for d in dropped)}
    save_file(state, tmp_path / "partial.safetensors")
    with pytest.raises(ModelError, match="lacks weights"):  # never a half-random model
        load_pipeline(tmp_path / "partial.safetensors", config=config)


# --- errors --------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="model not found"):
        load_pipeline(tmp_path / "nope.safetensors")


def test_folder_missing_parts(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ModelError, match="missing vae, text_encoder, tokenizer, scheduler"):
        load_pipeline(tmp_path)


def test_wrong_suffix(tmp_path):
    path = tmp_path / "model.txt"
    path.write_text("hello")
    with pytest.raises(ModelError, match=r"must be \.ckpt or \.safetensors"):
        load_pipeline(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_garbage_bytes(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x00\x07garbage" * 64)
    with pytest.raises(ModelError, match="cannot read the checkpoint") as info:
        load_pipeline(path)
    assert "\n" not in str(info.value)


def test_ckpt_with_pickled_objects_is_not_unpickled(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.ones(1)}, "args": argparse.Namespace(a=1)}, path)
    with pytest.raises(ModelError, match="pickles argparse.Namespace.*safetensors"):
        load_pipeline(path)


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"down_blocks.0.resnets.0.conv1.weight"}, "not an original Stable Diffusion checkpoint.*diffusers folder"),
        ({"conditioner.embedders.0.model.x", "model.diffusion_model.x"}, "SDXL checkpoint without both text .*refiner"),
        ({"conditioner.embedders.0.transformer.x", "conditioner.embedders.1.model.x"}, "lacks the UNet or VAE .*SDXL"),
        ({"model.diffusion_model.x", "cond_stage_model.transformer.x"}, r"lacks the VAE \(first_stage_model"),
    ],
)
def test_not_a_supported_checkpoint(tmp_path, keys, message):
    path = tmp_path / "model.safetensors"
    save_file({k: torch.zeros(1) for k in keys}, path)
    with pytest.raises(ModelError, match=message):
        load_pipeline(path)


def test_config_that_is_not_a_folder(ldm_files, tmp_path):
    _, config, files = ldm_files
    with pytest.raises(ModelError, match="is not a folder"):  # never taken for a Hub repo id
        load_pipeline(files[".safetensors"], config="someone/some-model")
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelError, match="missing model_index.json, unet/config.json"):
        load_pipeline(files[".safetensors"], config=tmp_path)
