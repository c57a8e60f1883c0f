"""Hue jitter: stages >= ``hue_jitter_from`` or < ``hue_jitter_below`` learn from the reference at random hues, so they carry no colour."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from prospect.data import rotate_hue, to_tensor
from conftest import assert_resumes_exactly
from prospect.distributed import Solo
from prospect.inversion import HUES, InversionConfig, InversionError, _draw, _fingerprint, check_config, invert, setup
from prospect.stages import StageMap

CFG = InversionConfig(initializer="cat", steps=4, lr=5e-2, batch_size=10, checkpoint_every=0, vectors_per_stage=1,
                      stage_choice=8)


def _image(size=16):
    return Image.fromarray((np.random.default_rng(0).random((size, size, 3)) * 255).astype("uint8"))


def test_rotate_hue_turns_colours_about_the_grey_axis():
    red, green, grey = (torch.tensor(c, dtype=torch.float32).view(3, 1, 1) for c in ([1, -1, -1], [-1, 1, -1], [.2] * 3))
    torch.testing.assert_close(rotate_hue(red, 120), green)
    torch.testing.assert_close(rotate_hue(grey, 77), grey)
    x = to_tensor([_image()])
    torch.testing.assert_close(rotate_hue(x, 360), x, atol=1e-5, rtol=0)
    assert not torch.allclose(rotate_hue(x, 60), x)
    assert rotate_hue(x, 45).abs().max() <= 1.0  # clipped to the pixel range
    pale = 0.3 * x  # nothing to clip: the mean of the channels (brightness) is kept exactly
    torch.testing.assert_close(rotate_hue(pale, 90).mean(-3), pale.mean(-3), atol=1e-5, rtol=0)


def test_only_the_jittered_stages_draw_other_hues_and_the_other_draws_are_unchanged():
    stage_map = StageMap(10, 1000)
    off = _draw(3, replace(CFG, flip_p=0.5), 1, stage_map, (4, 2, 2))
    on = _draw(3, replace(CFG, flip_p=0.5, hue_jitter_from=6), 1, stage_map, (4, 2, 2))
    for key in ("stages", "t", "image", "template", "eps_latent", "noise"):
        assert torch.equal(off[key], on[key]), key
    flip, hue = on["view"] // HUES, on["view"] % HUES
    assert torch.equal(flip, off["view"])  # off: one hue, view = flip
    assert (hue[on["stages"] < 6] == 0).all()
    hues = set()
    for step in range(30):  # over steps every hue turns up in the jittered stages
        d = _draw(step, replace(CFG, hue_jitter_from=6), 1, stage_map, (4, 2, 2))
        hues |= set((d["view"] % HUES)[d["stages"] >= 6].tolist())
    assert hues == set(range(HUES))


def test_the_cache_holds_every_hue_of_every_view_and_view_0_is_the_image(tiny_pipe):
    plain = setup(tiny_pipe, [_image()], CFG, Solo("cpu"))
    jitter = setup(tiny_pipe, [_image()], replace(CFG, hue_jitter_from=5), Solo("cpu"))
    assert plain.mean.shape[1] == 2 and jitter.mean.shape[1] == 2 * HUES
    torch.testing.assert_close(jitter.mean[:, 0], plain.mean[:, 0])
    torch.testing.assert_close(jitter.mean[:, HUES], plain.mean[:, 1])  # the mirror at its own hue
    assert not torch.allclose(jitter.mean[:, 1], plain.mean[:, 0])


def test_a_jittered_inversion_learns_differently_keeps_the_choice_in_its_group_and_resumes(tiny_pipe, tmp_path):
    plain = invert(tiny_pipe, [_image()], replace(CFG, stage_choice=0), progress=False, accelerator=Solo("cpu"))
    free = invert(tiny_pipe, [_image()], replace(CFG, stage_choice=0, hue_jitter_from=7), progress=False,
                  accelerator=Solo("cpu"))
    torch.testing.assert_close(free.embeddings[:7], plain.embeddings[:7])  # same draws; only stages 7-9 see hues
    assert not torch.allclose(free.embeddings[7:], plain.embeddings[7:])
    chosen = invert(tiny_pipe, [_image()], replace(CFG, hue_jitter_from=7), progress=False, accelerator=Solo("cpu"))
    for k in range(10):
        same = [j for j in range(10) if torch.allclose(chosen.embeddings[k], free.embeddings[j])]
        assert same and all((j >= 7) == (k >= 7) for j in same), (k, same)
    cfg = replace(CFG, hue_jitter_from=7, steps=4, checkpoint_every=2)
    whole = invert(tiny_pipe, [_image()], cfg, progress=False, accelerator=Solo("cpu"))
    assert_resumes_exactly(tiny_pipe, [_image()], cfg, whole, replace(cfg, hue_jitter_from=None), tmp_path / "c.ckpt")


def test_off_keeps_the_fingerprint_of_runs_made_before_the_option():
    assert _fingerprint([_image()], CFG) != _fingerprint([_image()], replace(CFG, hue_jitter_from=6))
    assert _fingerprint([_image()], replace(CFG, hue_jitter_from=0)) != _fingerprint([_image()], CFG)


@pytest.mark.parametrize("value", [-1, 10, 2.5, "6", True])
def test_a_stage_outside_the_run_is_refused(value):
    with pytest.raises(InversionError, match=r"hue_jitter_from must be a stage in \[0, 9\] or None"):
        check_config(replace(CFG, hue_jitter_from=value))


def test_hue_jitter_below_jitters_the_late_stages_and_combines_with_from():
    from prospect.inversion import hues, jittered

    assert jittered(CFG) == [False] * 10 and hues(CFG) == 1
    assert jittered(replace(CFG, hue_jitter_below=4)) == [True] * 4 + [False] * 6
    assert jittered(replace(CFG, hue_jitter_below=3, hue_jitter_from=8)) == [True] * 3 + [False] * 5 + [True] * 2
    assert hues(replace(CFG, hue_jitter_below=1)) == HUES
    stage_map = StageMap(10, 1000)
    off = _draw(5, CFG, 1, stage_map, (4, 2, 2))
    seen = set()
    for step in range(30):
        d = _draw(step, replace(CFG, hue_jitter_below=4), 1, stage_map, (4, 2, 2))
        assert (d["view"][d["stages"] >= 4] % HUES == 0).all()  # the early stages see the reference's own hue
        seen |= set((d["view"] % HUES)[d["stages"] < 4].tolist())
    assert seen == set(range(HUES))
    on = _draw(5, replace(CFG, hue_jitter_below=4), 1, stage_map, (4, 2, 2))
    for key in ("stages", "t", "image", "template", "eps_latent", "noise"):
        assert torch.equal(off[key], on[key]), key


def test_a_late_jittered_inversion_keeps_the_early_tokens_and_the_choice_in_its_group(tiny_pipe):
    free = invert(tiny_pipe, [_image()], replace(CFG, stage_choice=0), progress=False, accelerator=Solo("cpu"))
    late = invert(tiny_pipe, [_image()], replace(CFG, stage_choice=0, hue_jitter_below=3), progress=False,
                  accelerator=Solo("cpu"))
    torch.testing.assert_close(late.embeddings[3:], free.embeddings[3:])  # only stages 0-2 see other hues
    assert not torch.allclose(late.embeddings[:3], free.embeddings[:3])
    chosen = invert(tiny_pipe, [_image()], replace(CFG, hue_jitter_below=3), progress=False, accelerator=Solo("cpu"))
    for k in range(10):
        same = [j for j in range(10) if torch.allclose(chosen.embeddings[k], late.embeddings[j])]
        assert same and all((j < 3) == (k < 3) for j in same), (k, same)
    assert _fingerprint([_image()], replace(CFG, hue_jitter_below=3)) != _fingerprint([_image()], CFG)


@pytest.mark.parametrize("value", [0, 11, 2.5, "4", True])
def test_a_stage_count_outside_the_run_is_refused(value):
    with pytest.raises(InversionError, match=r"hue_jitter_below must be a stage count in \[1, 10\] or None"):
        check_config(replace(CFG, hue_jitter_below=value))
