"""Patch shuffle: the samples of training timestep in ``shuffle_at`` see the reference's patches in a random order,
so the tokens of those timesteps learn its colours and textures but not its shape or layout."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_resumes_exactly, write_reference_images
from prospect.cli import main
from prospect.concept import Concept
from prospect.data import shuffle_patches
from prospect.distributed import Solo
from prospect.inversion import (GRID, SHUFFLES, InversionConfig, InversionError, _draw, _fingerprint, check_config,
                                invert, patch_orders, setup, shuffled)
from prospect.stages import StageMap

CFG = InversionConfig(initializer="cat", steps=4, lr=5e-2, batch_size=10, checkpoint_every=0, vectors_per_stage=1,
                      stage_choice=8)


def _image(size=16):
    return Image.fromarray((np.random.default_rng(0).random((size, size, 3)) * 255).astype("uint8"))


def test_shuffle_patches_moves_whole_patches_and_keeps_every_pixel():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    torch.testing.assert_close(shuffle_patches(x, torch.arange(16), 4), x)
    order = torch.tensor([15, 3, 7, 0, 1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14])
    y = shuffle_patches(x, order, 4)
    torch.testing.assert_close(y[..., 0:2, 0:2], x[..., 6:8, 6:8])  # patch 0 is the old patch 15
    torch.testing.assert_close(y[..., 0:2, 2:4], x[..., 0:2, 6:8])  # patch 1 is the old patch 3
    torch.testing.assert_close(y.flatten().sort().values, x.flatten())  # the same pixels, moved
    assert not torch.equal(y, x)


def test_only_samples_inside_the_span_draw_a_shuffled_view_and_the_other_draws_are_unchanged():
    stage_map = StageMap(10, 1000)
    cfg = replace(CFG, flip_p=0.5, shuffle_at="500-700")
    seen = set()
    for step in range(30):
        off, on = _draw(step, replace(cfg, shuffle_at=None), 1, stage_map, (4, 2, 2)), _draw(step, cfg, 1, stage_map, (4, 2, 2))
        for k in off:
            if k != "view":
                torch.testing.assert_close(on[k], off[k])
        torch.testing.assert_close(on["view"] // (1 + SHUFFLES), off["view"])  # flip (and hue) as without
        order = on["view"] % (1 + SHUFFLES)
        inside = (on["t"] >= 500) & (on["t"] < 700)
        assert (order[~inside] == 0).all() and (order[inside] > 0).all()
        seen |= set(order[inside].tolist())
    assert seen == set(range(1, 1 + SHUFFLES))
    assert shuffled(cfg, stage_map) == [k in (5, 6) for k in range(10)]


def test_the_cache_holds_every_order_and_order_0_is_the_image(tiny_pipe):
    plain = setup(tiny_pipe, [_image()], CFG, Solo("cpu"))
    run = setup(tiny_pipe, [_image()], replace(CFG, shuffle_at="0-300"), Solo("cpu"))
    assert run.mean.shape[1] == 2 * (1 + SHUFFLES)
    torch.testing.assert_close(run.mean[:, 0], plain.mean[:, 0])
    torch.testing.assert_close(run.mean[:, 1 + SHUFFLES], plain.mean[:, 1])  # the mirror, in its own order
    assert not torch.allclose(run.mean[:, 1], plain.mean[:, 0])
    orders = patch_orders(replace(CFG, shuffle_at="0-300"))
    assert orders.shape == (1 + SHUFFLES, GRID * GRID) and torch.equal(orders[0], torch.arange(GRID * GRID))
    assert all(torch.equal(o.sort().values, orders[0]) for o in orders) and len({tuple(o.tolist()) for o in orders}) > 1


def test_a_shuffled_inversion_learns_other_tokens_there_keeps_the_choice_in_its_group_and_resumes(tiny_pipe, tmp_path):
    plain = invert(tiny_pipe, [_image()], replace(CFG, stage_choice=0), progress=False, accelerator=Solo("cpu"))
    free = invert(tiny_pipe, [_image()], replace(CFG, stage_choice=0, shuffle_at="700-1000"), progress=False,
                  accelerator=Solo("cpu"))
    torch.testing.assert_close(free.embeddings[:7], plain.embeddings[:7])  # same draws; only stages 7-9 are shuffled
    assert not torch.allclose(free.embeddings[7:], plain.embeddings[7:])
    chosen = invert(tiny_pipe, [_image()], replace(CFG, shuffle_at="700-1000"), progress=False, accelerator=Solo("cpu"))
    for k in range(10):
        same = [j for j in range(10) if torch.allclose(chosen.embeddings[k], free.embeddings[j])]
        assert same and all((j >= 7) == (k >= 7) for j in same), (k, same)
    cfg = replace(CFG, shuffle_at="700-1000", checkpoint_every=2)
    whole = invert(tiny_pipe, [_image()], cfg, progress=False, accelerator=Solo("cpu"))
    assert_resumes_exactly(tiny_pipe, [_image()], cfg, whole, replace(cfg, shuffle_at="600-1000"), tmp_path / "c.ckpt")


def test_off_keeps_the_fingerprint_of_runs_made_before_the_option():
    assert _fingerprint([_image()], CFG) != _fingerprint([_image()], replace(CFG, shuffle_at="500-700"))
    assert _fingerprint([_image()], CFG) == "5126d3a5a0d2acf9"  # as computed before the option existed


@pytest.mark.parametrize("value", ["700-500", "5-", "a-b", "500", 500, "0-1001"])
def test_a_bad_span_is_refused_before_any_model_loads_or_when_it_passes_the_model(value, tiny_pipe):
    cfg = replace(CFG, shuffle_at=value)
    with pytest.raises(InversionError, match="shuffle_at"):
        check_config(cfg)
        setup(tiny_pipe, [_image()], cfg, Solo("cpu"))  # HI past the model's timesteps: caught once it is known


def test_train_with_shuffle_at_on_the_cli(tmp_path, tiny_model_dir, capsys):
    workdir = tmp_path
    write_reference_images(workdir)
    base = ["train", str(workdir / "refs"), "--model", str(tiny_model_dir), "--steps", "3", "--init-word", "cat",
            "--vectors-per-stage", "1", "--stage-choice", "0", "--checkpoint-every", "0"]
    assert main(base + ["--out", str(workdir / "plain.safetensors")]) == 0
    assert main(base + ["--out", str(workdir / "mid.safetensors"), "--shuffle-at", "300-700"]) == 0
    plain, mid = (Concept.load(workdir / f"{n}.safetensors").embeddings for n in ("plain", "mid"))
    keep = [0, 1, 2, 7, 8, 9]
    assert torch.equal(plain[keep], mid[keep]) and not torch.allclose(plain[3:7], mid[3:7])
    capsys.readouterr()
    assert main(base + ["--out", str(workdir / "bad.safetensors"), "--shuffle-at", "700-300"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shuffle_at" in err[0] and not (workdir / "bad.safetensors").exists()
