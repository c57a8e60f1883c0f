"""Prompt-spectrum generation: equivalence with stock diffusers and stage routing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline
from PIL import Image

from prospect.concept import Concept
from prospect.pipeline import ProSpectPipeline
from prospect.spectrum import SpectrumError
from prospect.stages import stage_of

STEPS = 6


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _image(size=16, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8"))


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_same_prompt_everywhere_equals_stock_txt2img(tiny_pipe, guidance):
    stock = tiny_pipe("a photo of a cat", num_inference_steps=STEPS, guidance_scale=guidance,
                      generator=_gen(3), output_type="np").images
    ours = ProSpectPipeline(tiny_pipe)("a photo of a cat", num_inference_steps=STEPS, guidance_scale=guidance,
                                       generator=_gen(3), output_type="np").images
    np.testing.assert_allclose(ours, stock, atol=1e-5)


def test_same_prompt_everywhere_equals_stock_img2img(tiny_pipe):
    img = _image()
    stock_pipe = StableDiffusionImg2ImgPipeline(**tiny_pipe.components)
    stock = stock_pipe("a red cube", image=img, strength=0.55, num_inference_steps=STEPS,
                       generator=_gen(1), output_type="np").images
    ours = ProSpectPipeline(tiny_pipe)("a red cube", image=img, strength=0.55, num_inference_steps=STEPS,
                                       generator=_gen(1), output_type="np").images
    np.testing.assert_allclose(ours, stock, atol=1e-5)


@pytest.mark.parametrize("listed", [False, True])
def test_img2img_several_images_per_prompt_equals_stock_without_deprecated_duplication(tiny_pipe, listed):
    """One input image, 2 prompts x 2 images each: the images stock img2img makes by duplicating the image
    (which diffusers deprecates, with a FutureWarning, here silenced for the reference), and no such warning."""
    import warnings

    img, prompts = _image(), ["a red cube", "a blue cube"]
    gens = (lambda: [_gen(10 + k) for k in range(4)]) if listed else (lambda: _gen(1))
    kwargs = dict(strength=0.7, num_inference_steps=STEPS, num_images_per_prompt=2, output_type="np")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        stock = StableDiffusionImg2ImgPipeline(**tiny_pipe.components)(prompts, image=img, generator=gens(), **kwargs).images
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        ours = ProSpectPipeline(tiny_pipe)(prompts, image=img, generator=gens(), **kwargs).images
    assert ours.shape[0] == 4 and not np.allclose(ours[0], ours[1])
    np.testing.assert_allclose(ours, stock, atol=1e-5)


class UNetSpy:
    """Records (timestep, encoder_hidden_states) of every UNet call via a forward pre-hook, and in ``pooled``
    SDXL's pooled text embedding of each call, in ``time_ids`` its size conditioning (None for SD 1.x/2.x)."""

    def __init__(self, unet):
        self.calls, self.pooled, self.time_ids = [], [], []
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        t = float(t) if torch.as_tensor(t).numel() == 1 else torch.as_tensor(t).tolist()  # a training batch: a list
        self.calls.append((t, kwargs["encoder_hidden_states"].detach().clone()))
        added = kwargs.get("added_cond_kwargs") or {}
        for name, seen in (("text_embeds", self.pooled), ("time_ids", self.time_ids)):
            seen.append(None if added.get(name) is None else added[name].detach().clone())


def _encode(pipe, text):
    return pipe.encode_prompt([text], "cpu", 1, False)[0][0]


WORDS = [f"a photo of {w}" for w in ("cat", "dog", "car", "tree", "house", "boat", "bird", "lamp", "shoe", "cup")]


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
@pytest.mark.parametrize("guidance", [5.0, 1.0])
@pytest.mark.parametrize("img2img", [False, True])
def test_stage_conditioning_is_used_exactly_at_its_timesteps(tiny_pipe, scheduler, guidance, img2img):
    if scheduler == "euler":
        tiny_pipe.scheduler = EulerDiscreteScheduler.from_config(tiny_pipe.scheduler.config)
    pp = ProSpectPipeline(tiny_pipe)
    spy = UNetSpy(tiny_pipe.unet)
    kwargs = dict(image=_image(), strength=0.7) if img2img else {}
    result = pp("*", prospect_words=WORDS, num_inference_steps=20, guidance_scale=guidance, generator=_gen(), **kwargs)
    spy.handle.remove()
    expected = {i: _encode(tiny_pipe, w) for i, w in enumerate(WORDS)}
    negative = _encode(tiny_pipe, "")
    assert len(spy.calls) == len(result.timesteps)
    seen = set()
    for t, states in spy.calls:
        stage = stage_of(t)
        seen.add(stage)
        cond = states[-1]
        torch.testing.assert_close(cond, expected[stage])
        others = [k for k in expected if k != stage]
        assert all(not torch.allclose(cond, expected[k]) for k in others)
        if guidance > 1:
            assert states.shape[0] == 2
            torch.testing.assert_close(states[0], negative)
        else:
            assert states.shape[0] == 1
    assert seen == ({stage_of(t) for t, _ in spy.calls})
    assert len(seen) >= (6 if img2img else 9)
    if img2img:
        assert max(t for t, _ in spy.calls) < 750  # strength 0.7: the noisiest stages never run


def _random_concept(dim=32, placeholder="*", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return Concept(placeholder=placeholder, embeddings=torch.randn(10, dim, generator=gen) * 0.3)


def test_learned_token_of_each_stage_goes_to_its_stage(tiny_pipe):
    pp = ProSpectPipeline(tiny_pipe)
    concept = pp.load_concept(_random_concept())
    spy = UNetSpy(tiny_pipe.unet)
    pp("a photo of *", num_inference_steps=10, generator=_gen())
    spy.handle.remove()
    for t, states in spy.calls:
        k = stage_of(t)
        torch.testing.assert_close(states[-1], _encode(tiny_pipe, f"a photo of {concept.token(k)}"))


def test_int_entries_take_the_token_of_another_stage(tiny_pipe):
    """Flexible attribute guidance: entry k at position i means stage i uses stage k's token."""
    pp = ProSpectPipeline(tiny_pipe)
    concept = pp.load_concept(_random_concept())
    words = [9, 9, 9, "a dog", "a dog", "a dog", "a dog", "*", "*", 0]
    texts = pp.stage_prompts("*", words)
    assert texts[0] == texts[1] == texts[2] == concept.token(9)
    assert texts[3] == "a dog" and texts[7] == concept.token(7) and texts[9] == concept.token(0)


def test_prompt_to_prompt_editing_without_a_concept(tiny_pipe):
    pp = ProSpectPipeline(tiny_pipe)
    words = ["a photo of a dog"] * 5 + ["a photo of a cat"] * 5
    texts = pp.stage_prompts("*", words)
    assert texts == words
    out = pp("*", prospect_words=words, num_inference_steps=4, generator=_gen())
    assert len(out.images) == 1 and out.images[0].size == (16, 16)


def test_a1111_editing_syntax_is_a_second_way_to_write_a_spectrum(tiny_pipe):
    pp = ProSpectPipeline(tiny_pipe)
    assert pp.stage_prompts("a photo of a [cat:dog:0.3]") == ["a photo of a dog"] * 7 + ["a photo of a cat"] * 3


@pytest.mark.parametrize(
    "words, match",
    [(["a"] * 9, "10"), (["a"] * 9 + [10], "range"), (["a"] * 9 + [3], "concept")],
)
def test_bad_prospect_words_raise(tiny_pipe, words, match):
    with pytest.raises(SpectrumError, match=match):
        ProSpectPipeline(tiny_pipe)("*", prospect_words=words, num_inference_steps=2)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(image=True, strength=1.5), "strength"), (dict(height=30), "height"), (dict(width=-8), "width"),
     (dict(num_inference_steps=0), "num_inference_steps")],
)
def test_bad_generation_arguments_raise_one_line(tiny_pipe, kwargs, match):
    if kwargs.get("image") is True:
        kwargs["image"] = _image()
    with pytest.raises(ValueError, match=match) as info:
        ProSpectPipeline(tiny_pipe)("a cat", **kwargs)
    assert "\n" not in str(info.value)


def test_several_concepts_with_their_own_placeholders(tiny_pipe):
    pp = ProSpectPipeline(tiny_pipe)
    teddy = pp.load_concept(_random_concept(placeholder="<teddy>", seed=1))
    yarn = pp.load_concept(_random_concept(placeholder="<yarn>", seed=2))
    texts = pp.stage_prompts("a <teddy> made of <yarn>")
    assert texts[4] == f"a {teddy.token(4)} made of {yarn.token(4)}"


def test_concept_with_wrong_dimension_is_refused(tiny_pipe):
    with pytest.raises(ValueError, match="dim"):
        ProSpectPipeline(tiny_pipe).load_concept(_random_concept(dim=48))
