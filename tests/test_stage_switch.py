"""The stage switch on stock diffusers pipelines: inpainting, ControlNet, a stock call without the
convenience object, and a user's own callbacks composed with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionInpaintPipeline,
                       StableDiffusionPipeline)
from diffusers.callbacks import MultiPipelineCallbacks, SDCFGCutoffCallback
from PIL import Image

from prospect.pipeline import GenerationConfig, ProSpectPipeline
from prospect.stage_switch import StageSwitch
from prospect.stages import stage_of
from test_pipeline import WORDS, UNetSpy, _encode, _gen, _image

STEPS = 20


def _mask(size=16):
    mask = np.zeros((size, size), dtype="uint8")
    mask[:, size // 2:] = 255  # repaint the right half
    return Image.fromarray(mask)


@pytest.fixture()
def controlnet_pipe(tiny_pipe):
    torch.manual_seed(1)
    controlnet = ControlNetModel.from_unet(tiny_pipe.unet, conditioning_embedding_out_channels=(4, 8)).eval()
    return StableDiffusionControlNetPipeline(**tiny_pipe.components, controlnet=controlnet)


def _routing_is_exact(spy, pipe, guided: bool, min_stages: int) -> None:
    """Every UNet call saw the stage prompt of its own timestep (and the empty negative first, when guided)."""
    expected = {k: _encode(pipe, w) for k, w in enumerate(WORDS)}
    negative = _encode(pipe, "")
    seen = set()
    for t, states in spy.calls:
        k = stage_of(t)
        seen.add(k)
        torch.testing.assert_close(states[-1], expected[k])
        assert all(not torch.allclose(states[-1], expected[j]) for j in expected if j != k)
        assert states.shape[0] == (2 if guided else 1)
        if guided:
            torch.testing.assert_close(states[0], negative)
    assert len(seen) >= min_stages


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_inpainting_equals_stock_with_one_prompt_and_routes_the_stages(tiny_pipe, guidance):
    stock = StableDiffusionInpaintPipeline(**tiny_pipe.components)
    kwargs = dict(image=_image(), mask_image=_mask(), strength=0.8, num_inference_steps=STEPS,
                  guidance_scale=guidance, output_type="np")
    reference = stock("a red cube", generator=_gen(2), **kwargs).images
    pp = ProSpectPipeline(tiny_pipe)
    ours = pp("a red cube", generator=_gen(2), **kwargs)
    np.testing.assert_allclose(ours.images, reference, atol=1e-5)
    assert ours.parameters["pipeline"] == "StableDiffusionInpaintPipeline" and ours.parameters["inpainting"]

    spy = UNetSpy(tiny_pipe.unet)
    result = pp("*", prospect_words=WORDS, generator=_gen(2), **kwargs)
    spy.handle.remove()
    assert len(spy.calls) == len(result.timesteps) == int(STEPS * 0.8)
    _routing_is_exact(spy, tiny_pipe, guidance > 1, 7)
    assert max(t for t, _ in spy.calls) < 850  # strength 0.8: the noisiest stages never run


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_controlnet_equals_stock_with_one_prompt_and_routes_the_stages(tiny_pipe, controlnet_pipe, guidance):
    control = _image(seed=5)
    kwargs = dict(image=control, num_inference_steps=STEPS, guidance_scale=guidance, output_type="np")
    reference = controlnet_pipe("a red cube", generator=_gen(4), **kwargs).images
    pp = ProSpectPipeline(tiny_pipe)
    ours = pp("a red cube", pipeline=controlnet_pipe, generator=_gen(4), **kwargs)
    np.testing.assert_allclose(ours.images, reference, atol=1e-5)

    spy = UNetSpy(tiny_pipe.unet)  # the ControlNet shares the UNet's text conditioning
    cn_spy = UNetSpy(controlnet_pipe.controlnet)
    pp("*", prospect_words=WORDS, pipeline=controlnet_pipe, generator=_gen(4), **kwargs)
    spy.handle.remove()
    cn_spy.handle.remove()
    _routing_is_exact(spy, tiny_pipe, guidance > 1, 9)
    _routing_is_exact(cn_spy, tiny_pipe, guidance > 1, 9)


def test_the_callback_alone_on_a_stock_call(tiny_pipe):
    """Without the convenience object: encode the stage texts, start, and pass the switch as the callback."""
    texts = [WORDS]
    switch = StageSwitch.encode(tiny_pipe, texts, negative_prompt="")
    spy = UNetSpy(tiny_pipe.unet)
    out = tiny_pipe(**switch.start(tiny_pipe, STEPS), num_inference_steps=STEPS, guidance_scale=5.0,
                    callback_on_step_end=switch, generator=_gen(), output_type="np").images
    spy.handle.remove()
    assert out.shape == (1, 16, 16, 3)
    _routing_is_exact(spy, tiny_pipe, True, 9)
    assert switch.stages == [stage_of(t) for t in switch.timesteps] and len(switch.trace) == STEPS


def test_a_users_function_callback_runs_at_every_step_beside_the_switch(tiny_pipe):
    seen = []

    def record(pipe, i, t, kwargs):
        seen.append((i, int(t), kwargs["latents"].shape))
        return kwargs

    spy = UNetSpy(tiny_pipe.unet)
    result = ProSpectPipeline(tiny_pipe)("*", prospect_words=WORDS, num_inference_steps=STEPS, generator=_gen(),
                                         callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents"])
    spy.handle.remove()
    assert [i for i, _, _ in seen] == list(range(STEPS))
    assert [t for _, t, _ in seen] == result.timesteps
    _routing_is_exact(spy, tiny_pipe, True, 9)


def test_guidance_cutoff_composes_with_the_switch(tiny_pipe):
    """diffusers' SDCFGCutoffCallback turns guidance off half way; the stages after it are switched without the
    negative rows, and with one prompt everywhere the images equal stock with the same cut-off."""
    cutoff = STEPS // 2
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=5.0, output_type="np")
    stock = tiny_pipe("a red cube", generator=_gen(7), callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=cutoff),
                      **kwargs).images
    pp = ProSpectPipeline(tiny_pipe)
    ours = pp("a red cube", generator=_gen(7), callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=cutoff),
              **kwargs).images
    np.testing.assert_allclose(ours, stock, atol=1e-5)

    spy = UNetSpy(tiny_pipe.unet)
    multi = MultiPipelineCallbacks([SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=cutoff)])
    pp("*", prospect_words=WORDS, generator=_gen(7), callback_on_step_end=multi, **kwargs)
    spy.handle.remove()
    expected = {k: _encode(tiny_pipe, w) for k, w in enumerate(WORDS)}
    assert [states.shape[0] for _, states in spy.calls] == [2] * (cutoff + 1) + [1] * (STEPS - cutoff - 1)
    for t, states in spy.calls:
        torch.testing.assert_close(states[-1], expected[stage_of(t)])


def test_stock_options_pass_through(tiny_pipe):
    """guidance_rescale and latents= reach the stock call: equal to stock given the same options."""
    latents = torch.randn((1, 4, 8, 8), generator=_gen(9))
    kwargs = dict(num_inference_steps=8, guidance_scale=5.0, guidance_rescale=0.7, output_type="np")
    stock = tiny_pipe("a red cube", latents=latents.clone(), **kwargs).images
    ours = ProSpectPipeline(tiny_pipe)("a red cube", latents=latents.clone(), **kwargs).images
    np.testing.assert_allclose(ours, stock, atol=1e-5)
    plain = tiny_pipe("a red cube", latents=latents.clone(), **dict(kwargs, guidance_rescale=0.0)).images
    assert not np.allclose(plain, stock, atol=1e-4)  # the option did something


def test_a_config_object_and_keywords_give_the_same_call(tiny_pipe):
    pp = ProSpectPipeline(tiny_pipe)
    cfg = GenerationConfig(num_inference_steps=6, guidance_scale=3.0, negative_prompt="blurry")
    a = pp("a red cube", config=cfg, generator=_gen(), output_type="np").images
    b = pp("a red cube", num_inference_steps=6, guidance_scale=3.0, negative_prompt="blurry", generator=_gen(),
           output_type="np").images
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="guidance_scale"):
        pp("a red cube", config=GenerationConfig(guidance_scale=-1.0))


def test_a_scheduler_swapped_on_the_pipeline_serves_img2img_too(tiny_pipe):
    from diffusers import EulerDiscreteScheduler

    pp = ProSpectPipeline(tiny_pipe)
    pp("a cat", image=_image(), num_inference_steps=4)
    tiny_pipe.scheduler = EulerDiscreteScheduler.from_config(tiny_pipe.scheduler.config)
    out = pp("a cat", image=_image(), num_inference_steps=4)
    assert out.parameters["scheduler"] == "EulerDiscreteScheduler"
    assert isinstance(tiny_pipe, StableDiffusionPipeline)


def test_the_readme_stock_call_equals_the_convenience_call(tiny_pipe):
    pp = ProSpectPipeline(tiny_pipe)
    switch = pp.stage_switch("*", WORDS, GenerationConfig(num_inference_steps=STEPS))
    stock = tiny_pipe(**switch.start(tiny_pipe, STEPS), num_inference_steps=STEPS, callback_on_step_end=switch,
                      generator=_gen(3), output_type="np").images
    ours = pp("*", prospect_words=WORDS, num_inference_steps=STEPS, generator=_gen(3), output_type="np").images
    np.testing.assert_array_equal(stock, ours)
    assert switch.stages == [stage_of(t) for t in switch.timesteps]
