"""SDXL generation (issue #15, part 1): the stage switch carries both encoders' hidden states and the pooled
embedding; with one prompt everywhere the images are stock SDXL's."""

from __future__ import annotations

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


def test_an_sdxl_concept_is_refused_in_one_line(tiny_sdxl):
    from prospect.concept import Concept

    with pytest.raises(ValueError, match="SDXL") as info:
        ProSpectPipeline(tiny_sdxl).load_concept(Concept(embeddings=torch.randn(10, 32)))
    assert "\n" not in str(info.value)


def test_the_cli_generates_from_an_sdxl_folder_and_refuses_to_train_on_it(tiny_sdxl, tmp_path, capsys):
    from conftest import write_reference_images
    from prospect.cli import main

    folder = tmp_path / "sdxl"
    tiny_sdxl.save_pretrained(folder)
    words = [w for w in WORDS for w in ("--word", w)]
    assert main(["generate", "--model", str(folder), *words, "--steps", "4", "--scheduler", "euler",
                 "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "0-000.png").exists()
    capsys.readouterr()
    refs = write_reference_images(tmp_path)
    assert main(["train", str(refs), "--model", str(folder), "--out", str(tmp_path / "c.safetensors"),
                 "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SDXL" in err and not (tmp_path / "c.safetensors").exists()


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
