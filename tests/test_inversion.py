"""ProSpect inversion on a tiny model: it learns, touches nothing else, and resumes exactly."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from prospect.concept import Concept, init_embeddings
from prospect.inversion import InversionConfig, InversionError, invert
from prospect.stages import stage_of


def _images(n=2, size=16):
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")) for _ in range(n)]


def _frozen_state(pipe):
    return {f"{name}.{k}": v.clone() for name in ("unet", "vae", "text_encoder")
            for k, v in getattr(pipe, name).state_dict().items()}


@torch.no_grad()
def _fixed_loss(pipe, concept, image):
    """Denoising loss of a concept on one image over fixed timesteps and noises (all stages)."""
    from prospect.concept import add_concept
    from prospect.data import to_tensor

    add_concept(pipe.tokenizer, pipe.text_encoder, concept)
    x0 = pipe.vae.encode(to_tensor([image])).latent_dist.mean * pipe.vae.config.scaling_factor
    gen = torch.Generator().manual_seed(123)
    total = 0.0
    for t in range(25, 1000, 50):
        noise = torch.randn(x0.shape, generator=gen)
        cond = pipe.encode_prompt([concept.token(stage_of(t))], "cpu", 1, False)[0]
        ts = torch.tensor([t])
        pred = pipe.unet(pipe.scheduler.add_noise(x0, noise, ts), ts, encoder_hidden_states=cond).sample
        total += torch.nn.functional.mse_loss(pred, noise).item()
    return total


CFG = dict(initializer="cat", steps=40, lr=5e-2, batch_size=10, checkpoint_every=0, vectors_per_stage=1,
           stage_choice=0)  # the training itself; tests/test_stage_choice.py tests the choice after it


def test_loss_falls_and_only_the_concept_rows_change(tiny_pipe):
    before = _frozen_state(tiny_pipe)
    vocab_before = len(tiny_pipe.tokenizer)
    logs = []
    concept = invert(tiny_pipe, _images(1), InversionConfig(**dict(CFG, steps=80)), on_step=logs.append, progress=False)
    assert isinstance(concept, Concept) and concept.embeddings.shape == (10, 32)
    assert len(logs) == 80
    after = _frozen_state(tiny_pipe)
    emb_key = next(k for k in before if k.endswith("token_embedding.weight"))
    for k, v in before.items():
        if k != emb_key:
            assert torch.equal(v, after[k]), k
    new = after[emb_key]
    assert torch.equal(new[: before[emb_key].shape[0]], before[emb_key])  # old rows bit-identical
    assert new.shape[0] == vocab_before + 10
    ids = tiny_pipe.tokenizer.convert_tokens_to_ids(concept.tokens())
    torch.testing.assert_close(new[ids], concept.embeddings)
    assert not torch.allclose(concept.embeddings[0], concept.embeddings[9])  # stages learned apart
    initial = Concept(placeholder="*", embeddings=init_embeddings(tiny_pipe.tokenizer, tiny_pipe.text_encoder, "cat", 10))
    assert _fixed_loss(tiny_pipe, concept, _images(1)[0]) < 0.99 * _fixed_loss(tiny_pipe, initial, _images(1)[0])


def test_no_weight_gradients_are_computed(tiny_pipe):
    invert(tiny_pipe, _images(1), InversionConfig(**dict(CFG, steps=3)), progress=False)
    for name in ("unet", "vae", "text_encoder"):
        assert all(p.grad is None and not p.requires_grad for p in getattr(tiny_pipe, name).parameters()), name


def test_stratified_steps_cover_every_stage(tiny_pipe):
    logs = []
    invert(tiny_pipe, _images(1), InversionConfig(**dict(CFG, steps=4, batch_size=5)), on_step=logs.append, progress=False)
    assert sorted(logs[0].stages + logs[1].stages) == list(range(10))
    assert sorted(logs[2].stages + logs[3].stages) == list(range(10))


def test_each_sample_is_captioned_with_the_token_of_its_timesteps_stage(tiny_pipe):
    seen = []

    def hook(module, args, kwargs):
        seen.append((args[1].clone(), kwargs["encoder_hidden_states"].detach().clone()))

    handle = tiny_pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    concept = invert(tiny_pipe, _images(1), InversionConfig(**dict(CFG, steps=1, lr=0.0)), progress=False)
    handle.remove()
    (t, states), = seen
    for ti, s in zip(t.tolist(), states):
        expected = tiny_pipe.encode_prompt([concept.token(stage_of(ti))], "cpu", 1, False)[0][0]
        torch.testing.assert_close(s, expected)


def test_seeded_run_is_deterministic(clip_tokenizer_dir):
    from conftest import build_tiny_pipeline

    a = invert(build_tiny_pipeline(clip_tokenizer_dir), _images(), InversionConfig(**CFG), progress=False)
    b = invert(build_tiny_pipeline(clip_tokenizer_dir), _images(), InversionConfig(**CFG), progress=False)
    assert torch.equal(a.embeddings, b.embeddings)


def test_interrupted_and_resumed_run_equals_uninterrupted(clip_tokenizer_dir, tmp_path):
    from conftest import build_tiny_pipeline

    cfg = dict(CFG, checkpoint_every=10)
    full = invert(build_tiny_pipeline(clip_tokenizer_dir), _images(), InversionConfig(**cfg), progress=False)
    ckpt = tmp_path / "c.ckpt.safetensors"

    class Stop(Exception):
        pass

    def kill_at_25(log):
        if log.step == 24:
            raise Stop

    with pytest.raises(Stop):
        invert(build_tiny_pipeline(clip_tokenizer_dir), _images(), InversionConfig(**cfg), checkpoint=ckpt,
               on_step=kill_at_25, progress=False)
    assert ckpt.exists()
    resumed_from = []
    resumed = invert(build_tiny_pipeline(clip_tokenizer_dir), _images(), InversionConfig(**cfg), checkpoint=ckpt,
                     resume=True, on_step=lambda log: resumed_from.append(log.step), progress=False)
    assert resumed_from[0] == 20  # lost no more than one checkpoint interval
    torch.testing.assert_close(resumed.embeddings, full.embeddings, rtol=0, atol=1e-6)


def test_resume_refuses_a_checkpoint_of_other_images(clip_tokenizer_dir, tmp_path):
    from conftest import build_tiny_pipeline

    ckpt = tmp_path / "c.ckpt.safetensors"
    invert(build_tiny_pipeline(clip_tokenizer_dir), _images(1), InversionConfig(**dict(CFG, steps=10, checkpoint_every=5)),
           checkpoint=ckpt, progress=False)
    with pytest.raises(InversionError, match="other images or settings"):
        invert(build_tiny_pipeline(clip_tokenizer_dir), _images(2), InversionConfig(**dict(CFG, steps=10, checkpoint_every=5)),
               checkpoint=ckpt, resume=True, progress=False)


def test_v_prediction_models_train_on_velocity(tiny_vpred_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_vpred_model_dir, local_files_only=True, safety_checker=None)
    logs = []
    invert(pipe, _images(1), InversionConfig(**dict(CFG, steps=60)), on_step=logs.append, progress=False)
    assert np.mean([l.loss for l in logs[-10:]]) < np.mean([l.loss for l in logs[:10]])


def _blow_up_after_first_step(monkeypatch):
    """The optimiser's step, then the trainable rows made infinite (what a far too high lr does)."""
    step = torch.optim.AdamW.step

    def blown(self, *a, **k):
        out = step(self, *a, **k)
        for group in self.param_groups:
            for p in group["params"]:
                p.data.fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", blown)


def test_non_finite_rows_and_loss_stop_with_a_message_and_keep_the_checkpoint(tiny_pipe, tmp_path, monkeypatch):
    ckpt = tmp_path / "c.ckpt.safetensors"
    invert(tiny_pipe, _images(1), InversionConfig(**dict(CFG, steps=5, checkpoint_every=5)), checkpoint=ckpt, progress=False)
    good = ckpt.read_bytes()
    _blow_up_after_first_step(monkeypatch)
    with pytest.raises(InversionError, match="token embeddings became non-finite at step 0; no checkpoint written"):
        invert(tiny_pipe, _images(1), InversionConfig(**dict(CFG, steps=1, checkpoint_every=5)),
               checkpoint=tmp_path / "d.ckpt.safetensors", progress=False)
    with pytest.raises(InversionError, match="loss became"):  # the step after inf rows
        invert(tiny_pipe, _images(1), InversionConfig(**dict(CFG, steps=10, checkpoint_every=5)),
               checkpoint=tmp_path / "d.ckpt.safetensors", progress=False)
    assert ckpt.read_bytes() == good and not (tmp_path / "d.ckpt.safetensors").exists()


def test_invert_is_setup_then_its_steps(clip_tokenizer_dir):
    """The algorithm's step is testable on its own: setup + step 0..S-1 by hand gives invert's concept exactly,
    and a step touches only the concept rows."""
    from conftest import build_tiny_pipeline
    from prospect.distributed import Solo
    from prospect.inversion import setup, step

    cfg = InversionConfig(steps=3, batch_size=2, checkpoint_every=0, vectors_per_stage=2, stage_choice=0)
    learned = invert(build_tiny_pipeline(clip_tokenizer_dir), _images(), cfg, progress=False, accelerator=Solo())
    pipe = build_tiny_pipeline(clip_tokenizer_dir)
    run = setup(pipe, _images(), cfg, Solo())
    frozen = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    before = run.rows().clone()
    pipe.text_encoder.set_input_embeddings(run.layer)
    logs = [step(run, i) for i in range(cfg.steps)]
    assert [log.step for log in logs] == [0, 1, 2] and all(np.isfinite(log.loss) for log in logs)
    assert all(len(log.stages) == cfg.batch_size for log in logs)
    assert not torch.equal(run.rows(), before)
    torch.testing.assert_close(run.rows(), learned.embeddings, rtol=0, atol=0)
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in frozen.items())
    assert pipe.text_encoder.get_input_embeddings() is run.layer and run.layer.base is run.base


def test_min_snr_weights_follow_the_prediction_type(tiny_pipe):
    from diffusers import DDPMScheduler

    from prospect.inversion import _min_snr_weights

    t = torch.tensor([0, 300, 600, 999])
    for kind in ("epsilon", "v_prediction"):
        sched = DDPMScheduler.from_config(tiny_pipe.scheduler.config, prediction_type=kind)
        alphas = sched.alphas_cumprod[t]
        snr = alphas / (1 - alphas)
        w = _min_snr_weights(sched, t, 5.0)
        expected = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1 if kind == "v_prediction" else snr)
        torch.testing.assert_close(w, expected.float())
        assert (w <= 1 + 1e-6).all()
        if kind == "epsilon":  # clipped where the image is nearly clean, full weight where it is noisy
            assert w[0] < 0.05 and w[-1] == 1
        else:  # v: the noisy end weighs little (zero-terminal-SNR schedules: nothing at t = T-1)
            assert w[-1] < w[1]


def test_min_snr_weighting_changes_training_and_off_keeps_it_bit_equal(clip_tokenizer_dir):
    from conftest import build_tiny_pipeline
    from prospect.distributed import Solo

    base = InversionConfig(steps=3, batch_size=10, checkpoint_every=0, stage_choice=0)  # every stage in every step
    a = invert(build_tiny_pipeline(clip_tokenizer_dir), _images(), base, progress=False, accelerator=Solo())
    b = invert(build_tiny_pipeline(clip_tokenizer_dir), _images(), base, progress=False, accelerator=Solo())
    c = invert(build_tiny_pipeline(clip_tokenizer_dir), _images(), InversionConfig(**{**base.__dict__, "snr_gamma": 5.0}),
               progress=False, accelerator=Solo())
    assert torch.equal(a.embeddings, b.embeddings) and not torch.equal(a.embeddings, c.embeddings)


def test_a_textual_inversion_warm_up_learns_one_token_then_each_stage_its_own(clip_tokenizer_dir, tmp_path):
    from conftest import build_tiny_pipeline
    from prospect.distributed import Solo

    cfg = InversionConfig(steps=4, batch_size=5, lr=0.05, vectors_per_stage=1, checkpoint_every=2, ti_warmup=2)
    run = lambda c, **kw: invert(build_tiny_pipeline(clip_tokenizer_dir), _images(), c, progress=False,  # noqa: E731
                                 accelerator=Solo(), **kw)
    start = run(replace(cfg, steps=1, lr=0.0)).embeddings
    warm = run(replace(cfg, steps=2)).embeddings
    assert torch.equal(warm, warm[:1].expand_as(warm)) and not torch.equal(warm, start)  # one token, every stage
    whole = run(cfg, checkpoint=tmp_path / "end.ckpt")
    assert (whole.embeddings - whole.embeddings[:1]).abs().amax() > 0  # then the stages part
    # the stages learn only their differences: the shared token keeps its warm-up value (free stages)
    ckpt = tmp_path / "c.ckpt"
    run(replace(cfg, steps=2), checkpoint=ckpt)
    resumed = run(cfg, checkpoint=ckpt, resume=True)
    torch.testing.assert_close(resumed.embeddings, whole.embeddings, rtol=0, atol=1e-6)
    from prospect.checkpoint import load_checkpoint

    torch.testing.assert_close(load_checkpoint(tmp_path / "end.ckpt")["shared"], warm[:1], rtol=0, atol=1e-6)
    with pytest.raises(InversionError, match="ti_warmup must be an integer >= 0"):
        run(replace(cfg, ti_warmup=-1))


def test_the_mapper_starts_at_the_initializer_learns_and_resumes(clip_tokenizer_dir, tmp_path):
    from conftest import build_tiny_pipeline
    from prospect.checkpoint import load_checkpoint
    from prospect.distributed import Solo

    cfg = InversionConfig(steps=4, batch_size=5, lr=0.05, vectors_per_stage=2, checkpoint_every=2,
                          parameterization="mapper", initializer="cat")
    run = lambda c, **kw: invert(build_tiny_pipeline(clip_tokenizer_dir), _images(), c, progress=False,  # noqa: E731
                                 accelerator=Solo(), **kw)
    pipe = build_tiny_pipeline(clip_tokenizer_dir)
    start = init_embeddings(pipe.tokenizer, pipe.text_encoder, "cat", 10, 2)
    torch.testing.assert_close(run(replace(cfg, lr=0.0, steps=1)).embeddings, start, rtol=0, atol=0)
    whole = run(cfg, checkpoint=tmp_path / "whole.ckpt")
    moved = (whole.embeddings - start).abs().amax(-1)
    assert moved.min() > 0 and not torch.allclose(whole.embeddings[0], whole.embeddings[9])  # every row, differently
    assert {k.split(".")[0] for k in load_checkpoint(tmp_path / "whole.ckpt") if k.startswith("mapper.")} == {"mapper"}
    run(replace(cfg, steps=2), checkpoint=tmp_path / "half.ckpt")
    resumed = run(cfg, checkpoint=tmp_path / "half.ckpt", resume=True)
    torch.testing.assert_close(resumed.embeddings, whole.embeddings, rtol=0, atol=1e-6)
    with pytest.raises(InversionError, match="ti_warmup needs the free or shared"):
        run(replace(cfg, ti_warmup=2))


def test_the_smoothness_prior_draws_neighbouring_stages_together(clip_tokenizer_dir):
    from conftest import build_tiny_pipeline
    from prospect.distributed import Solo
    from prospect.token_rows import roughness

    cfg = InversionConfig(steps=4, batch_size=5, lr=0.05, vectors_per_stage=1, checkpoint_every=0)
    run = lambda c: invert(build_tiny_pipeline(clip_tokenizer_dir), _images(), c, progress=False,  # noqa: E731
                           accelerator=Solo()).embeddings
    rough, smooth = run(cfg), run(replace(cfg, smoothness=100.0))
    assert roughness(smooth, 10) < 0.5 * roughness(rough, 10)
    assert torch.equal(run(replace(cfg, smoothness=0.0)), rough)
    with pytest.raises(InversionError, match="smoothness must be a finite number >= 0"):
        run(replace(cfg, smoothness=float("nan")))
