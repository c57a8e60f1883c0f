"""SDXL generation (issue #15, part 1): the stage switch carries both encoders' hidden states and the pooled
embedding; with one prompt everywhere the images are stock SDXL's."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline

from prospect.pipeline import ProSpectPipeline
from prospect.stages import stage_of
from test_pipeline import WORDS, UNetSpy, _gen, _image

STEPS = 20


@pytest.mark.parametrize("negative", [None, "blurry"])
@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_same_prompt_everywhere_equals_stock_sdxl(tiny_sdxl, negative, guidance):
    kwargs = dict(num_inference_steps=8, guidance_scale=guidance, negative_prompt=negative, output_type="np")
    stock = tiny_sdxl("a red cube", generator=_gen(3), **kwargs).images
    ours = ProSpectPipeline(tiny_sdxl)("a red cube", generator=_gen(3), **kwargs)
    np.testing.assert_allclose(ours.images, stock, atol=1e-5)
    assert ours.parameters["pipeline"] == "StableDiffusionXLPipeline"


def test_same_prompt_everywhere_equals_stock_sdxl_img2img(tiny_sdxl):
    kwargs = dict(image=_image(), strength=0.6, num_inference_steps=8, guidance_scale=5.0, output_type="np")
    stock = StableDiffusionXLImg2ImgPipeline(**tiny_sdxl.components)("a red cube", generator=_gen(1), **kwargs).images
    ours = ProSpectPipeline(tiny_sdxl)("a red cube", generator=_gen(1), **kwargs).images
    np.testing.assert_allclose(ours, stock, atol=1e-5)


@pytest.mark.parametrize("img2img", [False, True])
def test_hidden_states_and_pooled_embedding_switch_at_the_stage_boundaries(tiny_sdxl, img2img):
    pp = ProSpectPipeline(tiny_sdxl)
    spy = UNetSpy(tiny_sdxl.unet)
    kwargs = dict(image=_image(), strength=0.7) if img2img else {}
    result = pp("*", prospect_words=WORDS, num_inference_steps=STEPS, guidance_scale=5.0, generator=_gen(), **kwargs)
    spy.handle.remove()
    embeds, _, pooled, _ = tiny_sdxl.encode_prompt(WORDS, device="cpu", num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False)
    assert len(spy.calls) == len(result.timesteps)
    seen = set()
    for (t, states), text_embeds in zip(spy.calls, spy.pooled):
        k = stage_of(t)
        seen.add(k)
        assert states.shape[0] == 2 and text_embeds.shape[0] == 2  # the negative (zeros, as stock) first
        torch.testing.assert_close(states[1], embeds[k])
        torch.testing.assert_close(text_embeds[1], pooled[k])
        assert all(not torch.allclose(text_embeds[1], pooled[j]) for j in range(10) if j != k)
        assert not states[0].any() and not text_embeds[0].any()
    assert len(seen) >= (6 if img2img else 9)


def _xl_concept(**kwargs):
    from conftest import TINY_DIM, TINY_DIM_2
    from prospect.concept import Concept

    gen = torch.Generator().manual_seed(0)
    return Concept(embeddings=torch.randn(10, 2, TINY_DIM, generator=gen),
                   embeddings_2=torch.randn(10, 2, TINY_DIM_2, generator=gen), **kwargs)


def test_a_concept_goes_into_both_encoders_and_one_of_the_other_family_is_refused(tiny_sdxl, tiny_pipe):
    from prospect.concept import Concept, ConceptError

    concept = _xl_concept()
    pp = ProSpectPipeline(tiny_sdxl)
    pp.load_concept(concept)
    for i, (tok, enc) in enumerate([(tiny_sdxl.tokenizer, tiny_sdxl.text_encoder),
                                    (tiny_sdxl.tokenizer_2, tiny_sdxl.text_encoder_2)]):
        ids = tok.convert_tokens_to_ids(concept.tokens())
        torch.testing.assert_close(enc.get_input_embeddings().weight[ids], concept.rows(i), rtol=0, atol=0)
    # the stage token of each stage reaches the UNet through both encoders and the pooled embedding
    spy = UNetSpy(tiny_sdxl.unet)
    result = pp("a photo of *", num_inference_steps=STEPS, guidance_scale=1.0, generator=_gen())
    spy.handle.remove()
    embeds, _, pooled, _ = tiny_sdxl.encode_prompt([f"a photo of {concept.prompt_text(k)}" for k in range(10)],
                                                   device="cpu", do_classifier_free_guidance=False)
    for (t, states), text_embeds in zip(spy.calls, spy.pooled):
        torch.testing.assert_close(states[0], embeds[stage_of(t)])
        torch.testing.assert_close(text_embeds[0], pooled[stage_of(t)])
    assert len(result.images) == 1

    with pytest.raises(ConceptError) as info:
        ProSpectPipeline(tiny_sdxl).load_concept(Concept(embeddings=torch.randn(10, 32)))
    assert "\n" not in str(info.value) and "SD 1.x/2.x" in str(info.value) and "but the model is SDXL" in str(info.value)
    with pytest.raises(ConceptError) as info:
        ProSpectPipeline(tiny_pipe).load_concept(concept)
    assert "is an SDXL (two text encoders) concept (32 + 48 wide) but the model is SD 1.x/2.x" in str(info.value)


def test_an_sdxl_concept_file_round_trips_as_format_version_3(tmp_path):
    from prospect.concept import Concept

    concept = _xl_concept(placeholder="<teddy>", initializer="bear")
    path = concept.save(tmp_path / "c.safetensors")
    back = Concept.load(path)
    assert back.family == "sdxl" and back.format_version == 3 and back.vectors_per_stage == 2
    assert torch.equal(back.embeddings, concept.embeddings) and torch.equal(back.embeddings_2, concept.embeddings_2)
    meta = back.metadata()
    assert (meta["family"], meta["dim"], meta["dim_2"], meta["format_version"]) == ("sdxl", "32", "48", "3")
    one = Concept(embeddings=concept.embeddings[:, 0], embeddings_2=concept.embeddings_2[:, 0])
    assert Concept.load(one.save(tmp_path / "one.safetensors")).embeddings_2.shape == (10, 48)
    with pytest.raises(ValueError, match="must have the stages and vectors"):
        Concept(embeddings=concept.embeddings, embeddings_2=concept.embeddings_2[:4])


def _sizes(n=2):
    from PIL import Image

    rng = np.random.default_rng(0)  # two sizes, so the size conditioning differs per image
    return [Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


def test_inversion_learns_the_rows_of_both_encoders_and_nothing_else(clip_tokenizer_dir):
    from conftest import build_tiny_sdxl
    from prospect.distributed import Solo
    from prospect.inversion import InversionConfig, invert, setup

    pipe = build_tiny_sdxl(clip_tokenizer_dir)
    frozen = {name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()}
              for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    cfg = InversionConfig(steps=2, batch_size=10, lr=0.05, vectors_per_stage=2, checkpoint_every=0, initializer="cat")
    start = setup(build_tiny_sdxl(clip_tokenizer_dir), _sizes(), cfg, Solo()).concept
    spy = UNetSpy(pipe.unet)
    concept = invert(pipe, _sizes(), cfg, progress=False, accelerator=Solo())
    spy.handle.remove()
    assert concept.family == "sdxl" and concept.embeddings_2.shape == (10, 2, 48)
    assert (concept.embeddings - start.embeddings).abs().amax(-1).min() > 0  # every row of both encoders moved
    assert (concept.embeddings_2 - start.embeddings_2).abs().amax(-1).min() > 0
    for name, before in frozen.items():
        after = getattr(pipe, name).state_dict()
        for key, value in before.items():
            if key.endswith("token_embedding.weight"):  # the old vocabulary is bit-identical, the new rows are the concept's
                i = 1 if name == "text_encoder_2" else 0
                tok = pipe.tokenizer_2 if i else pipe.tokenizer
                assert torch.equal(after[key][: len(value)], value)
                ids = tok.convert_tokens_to_ids(concept.tokens())
                assert torch.equal(after[key][ids], concept.rows(i))
            else:
                assert torch.equal(after[key], value), f"{name}.{key} changed"
    # the UNet saw each image's size and crop: (h, w, top, left, target h, target w)
    res = pipe.unet.config.sample_size * pipe.vae_scale_factor
    time_ids = {tuple(int(v) for v in row) for row in torch.cat(spy.time_ids)}
    left = round((48 * res / 40 - res) / 2)  # the 40x48 image, resized to res on its short side, loses 2 px a side
    assert time_ids == {(40, 48, 0, left, res, res), (48, 48, 0, 0, res, res)} and left == 2


def test_an_interrupted_sdxl_run_resumes_to_the_uninterrupted_result(clip_tokenizer_dir, tmp_path):
    from conftest import build_tiny_sdxl
    from prospect.distributed import Solo
    from prospect.inversion import InversionConfig, invert

    cfg = InversionConfig(steps=4, batch_size=2, lr=0.05, vectors_per_stage=1, checkpoint_every=2,
                          parameterization="shared")
    whole = invert(build_tiny_sdxl(clip_tokenizer_dir), _sizes(), cfg, progress=False, accelerator=Solo())
    ckpt = tmp_path / "c.ckpt"
    invert(build_tiny_sdxl(clip_tokenizer_dir), _sizes(), replace(cfg, steps=2), checkpoint=ckpt, progress=False,
           accelerator=Solo())
    resumed = invert(build_tiny_sdxl(clip_tokenizer_dir), _sizes(), cfg, checkpoint=ckpt, resume=True, progress=False,
                     accelerator=Solo())
    torch.testing.assert_close(resumed.embeddings, whole.embeddings, rtol=0, atol=1e-6)
    torch.testing.assert_close(resumed.embeddings_2, whole.embeddings_2, rtol=0, atol=1e-6)


def test_the_cli_trains_and_generates_on_an_sdxl_folder(tiny_sdxl, tmp_path, capsys):
    from conftest import write_reference_images
    from prospect.cli import main
    from prospect.concept import Concept

    folder = tmp_path / "sdxl"
    tiny_sdxl.save_pretrained(folder)
    refs = write_reference_images(tmp_path)
    out = tmp_path / "c.safetensors"
    assert main(["train", str(refs), "--model", str(folder), "--out", str(out), "--steps", "2",
                 "--vectors-per-stage", "1"]) == 0
    assert "(10 stages x 32 + 48, placeholder '*')" in capsys.readouterr().out
    assert Concept.load(out).family == "sdxl"
    words = [f"a * {w}" for w in WORDS[:5]] + WORDS[5:]  # the concept in the last stages, text in the first
    assert main(["generate", "--model", str(folder), "--concept", str(out), *[a for w in words for a in ("--word", w)],
                 "--steps", "4", "--scheduler", "euler", "--out", str(tmp_path / "gen")]) == 0
    assert (tmp_path / "gen" / "0-000.png").exists()


def test_sdxl_inpainting_equals_stock_and_several_images_need_no_deprecated_duplication(tiny_sdxl):
    import warnings

    from diffusers import StableDiffusionXLInpaintPipeline
    from test_stage_switch import _mask

    kwargs = dict(image=_image(), mask_image=_mask(), strength=0.8, num_inference_steps=8, guidance_scale=5.0,
                  output_type="np")
    stock = StableDiffusionXLInpaintPipeline(**tiny_sdxl.components)("a red cube", generator=_gen(2), **kwargs).images
    pp = ProSpectPipeline(tiny_sdxl)
    np.testing.assert_allclose(pp("a red cube", generator=_gen(2), **kwargs).images, stock, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = pp("a red cube", image=_image(), strength=0.6, num_inference_steps=8, num_images_per_prompt=2,
                 generator=_gen(1), output_type="np").images
    assert out.shape[0] == 2 and not np.allclose(out[0], out[1])


def test_diffusers_export_loads_with_stock_load_textual_inversion_into_both_encoders(clip_tokenizer_dir, tmp_path):
    import safetensors.torch

    from conftest import build_tiny_sdxl
    from prospect.exports import export_diffusers

    concept = _xl_concept()  # two vectors per stage: diffusers expands <teddy:s3> into both
    paths = export_diffusers(concept, tmp_path, name="teddy")
    note = json.loads((tmp_path / "teddy-prospect_diffusers.json").read_text())
    assert note["family"] == "sdxl" and "text_encoder_2" in note["usage"]
    stock = build_tiny_sdxl(clip_tokenizer_dir)
    for entry in note["stages"]:  # as diffusers documents for SDXL embeddings, and as the note says
        state = safetensors.torch.load_file(tmp_path / entry["file"])
        assert sorted(state) == ["clip_g", "clip_l"]
        stock.load_textual_inversion(state["clip_l"], token=entry["name"], text_encoder=stock.text_encoder,
                                     tokenizer=stock.tokenizer)
        stock.load_textual_inversion(state["clip_g"], token=entry["name"], text_encoder=stock.text_encoder_2,
                                     tokenizer=stock.tokenizer_2)
    ours = ProSpectPipeline(build_tiny_sdxl(clip_tokenizer_dir))
    ours.load_concept(concept)
    for k in (0, 3, 9):
        theirs = stock.encode_prompt(f"a photo of <teddy:s{k}>", device="cpu", do_classifier_free_guidance=False)
        mine = ours.pipe.encode_prompt(f"a photo of {concept.prompt_text(k)}", device="cpu",
                                       do_classifier_free_guidance=False)
        torch.testing.assert_close(theirs[0], mine[0])  # both encoders' hidden states
        torch.testing.assert_close(theirs[2], mine[2])  # the pooled embedding
    assert len(paths) == 10


def test_a1111_and_comfyui_exports_hold_clip_l_and_clip_g(tmp_path, capsys):
    import safetensors.torch

    from prospect.cli import main

    concept = _xl_concept()
    concept.save(tmp_path / "teddy.safetensors")
    for fmt in ("a1111", "comfyui", "diffusers"):
        assert main(["export", str(tmp_path / "teddy.safetensors"), "--format", fmt, "--out", str(tmp_path / fmt),
                     "--steps", "30"]) == 0
    files = {fmt: sorted((tmp_path / fmt).rglob("teddy-s3.safetensors")) for fmt in ("a1111", "comfyui", "diffusers")}
    for fmt, (path,) in files.items():
        state = safetensors.torch.load_file(path)
        assert torch.equal(state["clip_l"], concept.stage_vectors(3)) and sorted(state) == ["clip_g", "clip_l"]
        assert torch.equal(state["clip_g"], concept.stage_vectors(3, 1))
    workflow = json.loads((tmp_path / "comfyui" / "teddy-workflow_api.json").read_text())
    assert workflow["3"]["inputs"]["width"] == 1024  # SDXL's native size
    assert main(["info", str(tmp_path / "teddy.safetensors")]) == 0
    assert "dim 32 + 48 (SDXL: clip_l + clip_g)" in capsys.readouterr().out
