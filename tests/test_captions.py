"""Timestep templates: a caption template for the samples of some training timesteps only."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from prospect.captions import all_templates, template_pool
from conftest import assert_resumes_exactly
from prospect.distributed import Solo
from prospect.inversion import InversionConfig, InversionError, _draw, _fingerprint, check_config, invert, setup
from prospect.stages import StageMap

CFG = InversionConfig(initializer="cat", steps=4, lr=5e-2, batch_size=10, checkpoint_every=0, vectors_per_stage=1,
                      stage_choice=0)
MIDDLE = replace(CFG, timestep_templates=("300-700:a dotted {} square",))


def _image(size=16):
    return Image.fromarray((np.random.default_rng(0).random((size, size, 3)) * 255).astype("uint8"))


def test_a_sample_draws_among_the_templates_that_apply_to_its_timestep():
    assert all_templates(MIDDLE) == ["{}", "a dotted {} square"]
    assert template_pool(MIDDLE, 299) == [0] and template_pool(MIDDLE, 300) == [0, 1]
    assert template_pool(MIDDLE, 699) == [0, 1] and template_pool(MIDDLE, 700) == [0]
    stage_map = StageMap(10, 1000)
    seen = {0: set(), 1: set()}
    for step in range(40):
        d = _draw(step, MIDDLE, 1, stage_map, (4, 2, 2))
        for t, j in zip(d["t"].tolist(), d["template"].tolist()):
            assert j in template_pool(MIDDLE, t), (t, j)  # never a template of other timesteps
            seen[int(300 <= t < 700)].add(j)
    assert seen == {0: {0}, 1: {0, 1}}  # the middle timesteps see both, each in turn
    off, on = _draw(3, CFG, 1, stage_map, (4, 2, 2)), _draw(3, MIDDLE, 1, stage_map, (4, 2, 2))
    for key in ("stages", "t", "image", "view", "eps_latent", "noise"):  # drawn after all else
        assert torch.equal(off[key], on[key]), key


def test_one_token_sees_them_by_timestep_too_and_captions_name_each_stages_token(tiny_pipe):
    ti = replace(MIDDLE, num_stages=1)
    d = _draw(0, ti, 1, StageMap(1, 1000), (4, 2, 2))
    assert all(j in template_pool(ti, t) for t, j in zip(d["t"].tolist(), d["template"].tolist()))
    run = setup(tiny_pipe, [_image()], MIDDLE, Solo("cpu"))
    assert set(run.captions) == {(k, j) for k in range(10) for j in (0, 1)}
    assert run.captions[(4, 1)] == "a dotted " + run.captions[(4, 0)] + " square"


def test_they_change_what_the_middle_tokens_learn_and_resume_exactly(tiny_pipe, tmp_path):
    plain = invert(tiny_pipe, [_image()], CFG, progress=False, accelerator=Solo("cpu"))
    middle = invert(tiny_pipe, [_image()], MIDDLE, progress=False, accelerator=Solo("cpu"))
    torch.testing.assert_close(middle.embeddings[:3], plain.embeddings[:3])  # stages 0-2, 7-9: the same samples
    torch.testing.assert_close(middle.embeddings[7:], plain.embeddings[7:])
    assert not torch.allclose(middle.embeddings[3:7], plain.embeddings[3:7])
    assert_resumes_exactly(tiny_pipe, [_image()], replace(MIDDLE, checkpoint_every=2), middle, CFG, tmp_path / "c.ckpt")


def test_none_keeps_the_fingerprint_of_runs_made_before_the_option():
    assert _fingerprint([_image()], CFG) != _fingerprint([_image()], MIDDLE)
    import hashlib, json
    from dataclasses import asdict

    settings = {k: v for k, v in asdict(CFG).items() if k not in ("steps", "checkpoint_every", "stage_choice",
                                                                   "snr_gamma", "ti_warmup", "smoothness",
                                                                   "hue_jitter_from", "hue_jitter_below",
                                                                   "timestep_templates", "shuffle_at")}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=list).encode())
    h.update(_image().tobytes())
    assert _fingerprint([_image()], CFG) == h.hexdigest()[:16]  # the settings as they were before the option


@pytest.mark.parametrize("entry, says", [
    ("300:a {}", "LO-HI:TEMPLATE"), ("700-300:a {}", "LO < HI"), ("a-b:{}", "LO-HI:TEMPLATE"),
    ("3-7:a photo", "exactly once"), ("3-7:{} {}", "not a caption"), ("3-7:a {x}", "not a caption")])
def test_a_bad_timestep_template_is_refused_with_what_is_wrong(entry, says):
    with pytest.raises(InversionError, match=says):
        check_config(replace(CFG, timestep_templates=(entry,)))


def test_a_span_past_the_models_timesteps_is_refused_before_training(tiny_pipe):
    with pytest.raises(InversionError, match="at most the model's 1000"):
        setup(tiny_pipe, [_image()], replace(CFG, timestep_templates=("500-1001:a {}",)), Solo("cpu"))


def test_train_takes_template_at_and_a_bad_one_fails_in_one_line(tmp_path, capsys):
    from prospect.cli import build_parser, config_from, main

    args = build_parser().parse_args(["train", "x", "--out", "y.safetensors", "--template-at", "300-700:a {} square",
                                      "--template-at", "700-1000:a red {}"])
    assert config_from(InversionConfig, args).timestep_templates == ("300-700:a {} square", "700-1000:a red {}")
    ref = tmp_path / "ref.png"
    _image().save(ref)
    assert main(["train", str(ref), "--out", str(tmp_path / "c.safetensors"), "--template-at", "300:a {}"]) != 0
    message = capsys.readouterr().err.strip()
    assert "LO-HI:TEMPLATE" in message and len(message.splitlines()) == 1
    assert not list(tmp_path.glob("c*"))


def test_a_job_list_takes_template_at_as_a_list(tmp_path):
    import argparse
    import json

    from prospect.cli import _train_args, config_from
    from prospect.jobs import read_jobs

    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"images": "refs", "out": "a.safetensors",
                                 "template_at": ["300-700:a {} square", "700-1000:a red {}"]},
                                {"images": "refs", "out": "b.safetensors", "template-at": "0-300:a {} shape"}]))
    parser = argparse.ArgumentParser()
    parser.add_argument("images", nargs="+")
    parser.add_argument("--out")
    _train_args(parser)
    args = parser.parse_args(["x", "--out", "y"])
    (_, a), (_, b) = read_jobs(jobs, args, _train_args)
    assert config_from(InversionConfig, a).timestep_templates == ("300-700:a {} square", "700-1000:a red {}")
    assert config_from(InversionConfig, b).timestep_templates == ("0-300:a {} shape",)
