"""After inversion each stage keeps the learned token that denoises the reference best at its timesteps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from prospect import stage_choice
from prospect.distributed import Solo
from prospect.inversion import InversionConfig, InversionError, invert, sample_losses, setup

CFG = dict(initializer="cat", steps=20, lr=5e-2, batch_size=10, checkpoint_every=0, vectors_per_stage=2)


def _image(size=16):
    return Image.fromarray((np.random.default_rng(0).random((size, size, 3)) * 255).astype("uint8"))


def test_choose_takes_the_lowest_loss_and_keeps_its_own_token_on_a_tie():
    table = torch.tensor([[1.0, 0.5, 0.5],   # stage 0: stage 1's and 2's tokens do better (the first one wins)
                          [0.2, 0.2, 0.9],   # stage 1: a tie with stage 0's token: it keeps its own
                          [0.3, 0.1, 0.0]])  # stage 2: its own is best
    assert stage_choice.choose(table) == [1, 1, 2]
    rows = torch.arange(3.0)[:, None, None].expand(3, 2, 4)
    picked, = stage_choice.apply([rows], [1, 1, 2])
    assert picked[:, 0, 0].tolist() == [1.0, 1.0, 2.0]


def test_choose_within_groups_never_crosses_them():
    table = torch.tensor([[1.0, 0.9, 0.1, 0.1],  # stage 0 would take 2's or 3's token, but they are the other group
                          [0.5, 1.0, 0.0, 0.0],
                          [0.0, 0.0, 1.0, 0.5],  # stage 2 takes 3's, its own group's best
                          [0.0, 0.0, 0.5, 0.9]])
    assert stage_choice.choose(table) == [2, 2, 0, 0]
    assert stage_choice.choose(table, groups=[0, 0, 1, 1]) == [1, 0, 3, 2]


def test_stage_losses_compare_every_candidate_on_the_same_draws_inside_each_stage(tiny_pipe):
    run = setup(tiny_pipe, [_image()], InversionConfig(**CFG, num_stages=4), Solo("cpu"))
    seen = []

    def fake(run_, image, view, eps_latent, noise, t, keys):
        seen.append((t.clone(), noise.clone(), [k for k, _ in keys]))
        return torch.full((len(t),), float((keys[0][0] - 2) ** 2))  # candidate 2 is best everywhere

    table = stage_choice.stage_losses(run, 6, fake)
    assert table.shape == (4, 4) and stage_choice.choose(table) == [2, 2, 2, 2]
    for i, (t, noise, cands) in enumerate(seen):
        stage, cand = divmod(i, 4)
        lo, hi = run.stage_map.bounds(stage)
        assert len(t) == 6 and ((t >= lo) & (t < hi)).all() and cands == [cand] * 6
        torch.testing.assert_close(noise, seen[0][1])  # paired: one set of noise draws for every comparison


def test_inversion_with_the_choice_gives_each_stage_one_of_the_learned_tokens(tiny_pipe):
    free = invert(tiny_pipe, [_image()], InversionConfig(**CFG, stage_choice=0), progress=False)
    chosen = invert(tiny_pipe, [_image()], InversionConfig(**CFG, stage_choice=8), progress=False)
    assert chosen.embeddings.shape == free.embeddings.shape
    picks = []
    for k in range(free.num_stages):
        same = [j for j in range(free.num_stages) if torch.allclose(chosen.embeddings[k], free.embeddings[j])]
        assert same, f"stage {k}'s rows are none of the learned stage tokens"
        picks.append(same[0])
    # and the picks are what the losses say (the text encoder holding the learned rows, as at the end of training)
    run = setup(tiny_pipe, [_image()], InversionConfig(**CFG, stage_choice=8), Solo("cpu"))
    for layer, table in zip(run.layers, free.tables):
        layer.delta.data.copy_(table.reshape(layer.delta.shape))
    run.swap(True)
    try:
        want = stage_choice.choose(stage_choice.stage_losses(run, 8, sample_losses))
    finally:
        run.swap(False)
    for k, (got, j) in enumerate(zip(picks, want)):
        assert torch.allclose(free.embeddings[got], free.embeddings[j]), (k, got, j)


def test_sdxl_inversion_chooses_in_both_text_encoders(tiny_sdxl):
    cfg = InversionConfig(**dict(CFG, steps=4, vectors_per_stage=1), stage_choice=4)
    concept = invert(tiny_sdxl, [_image(32)], cfg, progress=False)
    free = invert(tiny_sdxl, [_image(32)], InversionConfig(**dict(CFG, steps=4, vectors_per_stage=1), stage_choice=0),
                  progress=False)
    for k in range(concept.num_stages):  # the same stage's token in both encoders
        j = next(j for j in range(10) if torch.allclose(concept.embeddings[k], free.embeddings[j]))
        torch.testing.assert_close(concept.embeddings_2[k], free.embeddings_2[j])


@pytest.mark.parametrize("value", [-1, 5000, 1.5, True])
def test_bad_choice_sizes_are_refused_before_any_work(tiny_pipe, value):
    with pytest.raises(InversionError, match="stage_choice"):
        invert(tiny_pipe, [_image()], InversionConfig(**CFG, stage_choice=value), progress=False)
