"""A negative prompt resolves by stage as the prompt does: prompt editing ([from:to:when]) and a placeholder (each
stage's own token), on SD and SDXL, through the API and the command line."""

from __future__ import annotations

import pytest
import torch

from prospect.cli import main
from prospect.pipeline import ProSpectPipeline
from prospect.spectrum import SpectrumError, resolve_editing
from prospect.stages import stage_of
from test_pipeline import WORDS, UNetSpy, _encode, _gen, _random_concept

STEPS = 20
EDITED = "[blurry:grainy:0.5]"  # A1111: 'blurry' for the first half of the steps, 'grainy' after


def _negatives_seen(spy) -> dict[int, torch.Tensor]:
    """Per stage, the negative row (guided calls: negative first) of every UNet call, checked equal within a stage."""
    seen: dict[int, torch.Tensor] = {}
    for t, states in spy.calls:
        assert states.shape[0] == 2
        k = stage_of(t)
        if k in seen:
            torch.testing.assert_close(states[0], seen[k])
        seen[k] = states[0]
    return seen


def _spied_call(pp: ProSpectPipeline, prompt: str, **kwargs):
    """``pp``'s guided call with every UNet call recorded: (spy, result)."""
    spy = UNetSpy(pp.pipe.unet)
    try:
        result = pp(prompt, num_inference_steps=STEPS, guidance_scale=5.0, generator=_gen(), **kwargs)
    finally:
        spy.handle.remove()
    return spy, result


def test_prompt_editing_in_the_negative_switches_it_at_its_stage(tiny_pipe):
    spy, _ = _spied_call(ProSpectPipeline(tiny_pipe), "*", prospect_words=WORDS, negative_prompt=EDITED)
    wanted = resolve_editing(EDITED, 10)
    assert wanted[9] == "blurry" and wanted[0] == "grainy"
    seen = _negatives_seen(spy)
    assert len(seen) >= 9
    for k, negative in seen.items():
        torch.testing.assert_close(negative, _encode(tiny_pipe, wanted[k]))
        assert not torch.allclose(negative, _encode(tiny_pipe, wanted[9 - k]))  # the other half's text


def test_a_placeholder_in_the_negative_is_each_stages_own_token(tiny_pipe):
    pp = ProSpectPipeline(tiny_pipe)
    concept = pp.load_concept(_random_concept())
    spy, result = _spied_call(pp, "a photo", negative_prompt="a *")
    seen = _negatives_seen(spy)
    assert len(seen) >= 9
    for k, negative in seen.items():
        torch.testing.assert_close(negative, _encode(tiny_pipe, f"a {concept.prompt_text(k)}"))
    assert result.parameters["negative_prompt"] == "a *"


def test_one_negative_text_is_the_stock_negative(tiny_pipe):
    """Without editing or a placeholder every stage has the same negative: the images are stock's."""
    pp = ProSpectPipeline(tiny_pipe)
    kwargs = dict(num_inference_steps=8, guidance_scale=5.0, negative_prompt="blurry", output_type="np")
    ours = pp("a red cube", generator=_gen(), **kwargs).images
    stock = tiny_pipe("a red cube", generator=_gen(), **kwargs).images
    torch.testing.assert_close(torch.as_tensor(ours), torch.as_tensor(stock), atol=1e-5, rtol=0)
    edited = pp("a red cube", generator=_gen(), **dict(kwargs, negative_prompt="[blurry:dark:0.5]")).images
    assert not torch.allclose(torch.as_tensor(edited), torch.as_tensor(ours), atol=1e-4)


def test_sdxl_swaps_the_pooled_negative_with_its_stage(tiny_sdxl):
    spy, _ = _spied_call(ProSpectPipeline(tiny_sdxl), "*", prospect_words=WORDS, negative_prompt=EDITED)
    embeds, _, pooled, _ = tiny_sdxl.encode_prompt(["blurry", "grainy"], device="cpu", num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False)
    text_of = {"blurry": 0, "grainy": 1}
    wanted = resolve_editing(EDITED, 10)
    for (t, states), text_embeds in zip(spy.calls, spy.pooled):
        i = text_of[wanted[stage_of(t)]]
        torch.testing.assert_close(states[0], embeds[i])
        torch.testing.assert_close(text_embeds[0], pooled[i])
    assert {wanted[stage_of(t)] for t, _ in spy.calls} == {"blurry", "grainy"}


def test_a_bad_negative_is_a_one_line_error(tiny_pipe, tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SpectrumError, match="^negative_prompt: "):
        ProSpectPipeline(tiny_pipe)("a cat", num_inference_steps=4, negative_prompt="[blurry:grainy")
    out = tmp_path / "gen"
    code = main(["generate", "--model", str(tiny_model_dir), "--prompt", "a cat", "--negative-prompt",
                 "[blurry:grainy", "--steps", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("prospect: error: negative_prompt: ") and err.count("\n") == 1
    assert not out.exists()
