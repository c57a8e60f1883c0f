"""The embedded toy-world model: its tokenizer, its files, offline loading, and a quality check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer

from prospect.toyworld import world
from prospect.loading import EMBEDDED_MODEL
from prospect.toyworld.recipe.tokenizer import learn_merges, write_tokenizer


def test_world_words_are_single_tokens(tmp_path):
    tok = CLIPTokenizer.from_pretrained(write_tokenizer(tmp_path))
    for word in world.vocabulary():
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, tok.convert_ids_to_tokens(ids))
    assert tok("*", add_special_tokens=False).input_ids == [265]  # the official placeholder's id
    assert len(tok("a dog on the table").input_ids) > 7  # unknown words still tokenize (as pieces)


def test_bpe_learning_merges_every_word_into_one_symbol():
    merges = learn_merges(["red", "green", "greed"])
    assert ("g", "r") in merges or ("r", "e") in merges
    assert len(merges) >= len("green") - 1


def test_shipped_model_is_small_safetensors_and_loads_offline(monkeypatch):
    from diffusers import StableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = EMBEDDED_MODEL
    files = [p for p in path.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert len(weights) == 3 and not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt", ".pkl")]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.num_train_timesteps == 1000
    assert pipe.scheduler.config.rescale_betas_zero_snr and pipe.scheduler.config.timestep_spacing == "trailing"
    record = json.loads((path / "training.json").read_text())  # the base (seed 0), continued with composable captions
    assert record["recipe"]["p_swap"] == 1.0 and record["continued_from"]["recipe"]["seed"] == 0


def test_composable_captions_redraw_only_what_the_image_already_shows():
    """With ``p_swap`` the recipe redraws the words of the attributes settled at a sample's timestep
    (layout below ``layout_open_from``, colour below ``colour_open_from``) and never the texture's;
    with it off the captions are those of the recipe before the option, draw for draw."""
    from dataclasses import replace

    from prospect.toyworld.recipe.train import ToyTrainConfig, _captions, settled

    base = replace(ToyTrainConfig(), p_uncond=0.0, p_omit=0.0)
    assert settled(base, 499) == ("position", "shape", "background") and settled(base, 500) == ()
    assert settled(base, 299) == ("position", "shape", "background", "colour")
    scene = world.Scene("left", "square", "red", "striped", "dark")
    codes = torch.tensor([[world.CHOICES[a].index(getattr(scene, a)) for a in world.ATTRIBUTES]] * 400)
    truth = world.caption(scene)

    def captions(cfg, t):
        return _captions(codes, torch.full((len(codes),), t), np.random.default_rng(0), cfg)

    swap = replace(base, p_swap=1.0)
    assert set(captions(swap, 500)) == {truth}  # nothing settled yet: the true caption
    late = captions(swap, 100)
    assert all(c.startswith("a striped ") for c in late)  # texture is never redrawn
    for word, values in (("left", world.POSITIONS), ("square", world.SHAPES), ("red", world.COLOURS),
                         ("dark", world.BACKGROUNDS)):
        share = np.mean([word in c.split() or word + "," in c.split() for c in late])
        assert abs(share - 1 / len(values)) < 0.08, (word, share)  # uniform: the word says nothing
    middle = captions(swap, 400)
    assert all(" red " in c for c in middle) and np.mean(["on the left" in c for c in middle]) < 0.35

    default = ToyTrainConfig()
    rng = np.random.default_rng(3)
    old = ["" if rng.random() < default.p_uncond else world.random_caption(scene, rng, default.p_omit)
           for _ in range(50)]
    assert _captions(codes[:50], torch.zeros(50, dtype=torch.long), np.random.default_rng(3), default) == old


@pytest.fixture(scope="module")
def toy():
    from prospect.pipeline import ProSpectPipeline

    pp = ProSpectPipeline.from_pretrained()
    pp.pipe.set_progress_bar_config(disable=True)
    return pp


def test_seeded_generation_is_deterministic(toy):
    a = toy("a striped red circle on the left", num_inference_steps=10, generator=torch.Generator().manual_seed(3),
            output_type="np").images
    b = toy("a striped red circle on the left", num_inference_steps=10, generator=torch.Generator().manual_seed(3),
            output_type="np").images
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_generated_images_follow_their_captions(toy):
    """A small version of the model card's accuracy table (20 captions; loose thresholds)."""
    from prospect.toyworld.recipe.quality import generation_accuracy

    acc = generation_accuracy(toy, n=20, seed=5, steps=50)
    assert acc["position"] >= 0.8, acc  # chance is 0.2; the first model (three UNet levels) was at chance
    assert acc["colour"] >= 0.8 and acc["texture"] >= 0.8 and acc["background"] >= 0.8, acc
    assert acc["shape"] >= 0.8, acc  # chance is 0.33; the 12 px objects of the previous model gave 0.70


@pytest.mark.slow
def test_a_late_prompt_switch_keeps_the_layout_and_a_readable_object(toy):
    """The shipped model's composable captions (model card): caption A in stages >= 4, a caption B that
    differs in everything below; the image keeps A's position, shape and background and stays readable
    (the base model kept a readable object in 0.56 of such images)."""
    from prospect.toyworld.reader import read
    from prospect.toyworld.recipe.quality import READABLE_FIT, _generate, _opposite_pairs

    pairs = _opposite_pairs(8, seed=3)
    prompts = [f"[{world.caption(a)}:{world.caption(b)}:0.6]" for a, b in pairs]
    readings = [read(im) for im in _generate(toy, prompts, seed=3, steps=30, guidance=5.0)]
    assert np.mean([r.fit >= READABLE_FIT for r in readings]) >= 0.85
    for attr in ("position", "shape", "background"):
        assert np.mean([getattr(r, attr) == getattr(a, attr) for r, (a, _) in zip(readings, pairs)]) >= 0.85, attr


@pytest.mark.slow
def test_quality_script_writes_its_tables_plot_and_json(tmp_path, capsys):
    """The model card's measurement, at tiny settings: accuracy, PSNR, spectrum with readability."""
    from prospect.toyworld.recipe.quality import decided_at, main

    main(["--captions", "4", "--pairs", "2", "--steps", "4", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "quality.json").read_text())
    assert set(result["accuracy"]) == set(world.ATTRIBUTES) and result["psnr"] > 20
    curves = [*result["spectrum"].values(), result["readable"]]
    assert all(len(c) == 11 and all(0.0 <= v <= 1.0 for v in c) for c in curves)
    assert result["spectrum"]["background"][10] == 0.0  # all-B images never show A's background
    assert "| readable |" in printed and "decided at stage" in printed
    assert (tmp_path / "spectrum.png").stat().st_size > 0 and not list(tmp_path.glob("*.tmp"))
    assert decided_at([1.0, 1.0, 0.75, 0.25, 0.0]) == pytest.approx(2.5)
    assert np.isnan(decided_at([1.0, 0.9, 0.8]))


TINY_RECIPE = ["--vae-steps", "2", "--vae-batch", "2", "--bank-size", "6", "--unet-steps", "3", "--unet-batch", "2",
               "--warmup", "1", "--eval-every", "0", "--checkpoint-every", "1", "--threads", "1"]


def _weights(folder, part: str) -> dict:
    from safetensors.torch import load_file

    return load_file(next((folder / part).glob("*.safetensors")))


@pytest.mark.slow
def test_recipe_resumes_to_the_same_weights_and_continues_from_a_model(tmp_path):
    """The training recipe on tiny settings: an interrupted run resumed equals an uninterrupted one,
    and ``--init-from`` keeps the given model's autoencoder and warm-starts its UNet."""
    from prospect.checkpoint import load_checkpoint
    from prospect.toyworld.recipe.train import main

    main(["--work", str(tmp_path / "whole"), "--out", str(tmp_path / "whole-model"), *TINY_RECIPE])
    main(["--work", str(tmp_path / "cut"), "--out", str(tmp_path / "cut-model"), *TINY_RECIPE, "--max-minutes", "1e-9"])
    assert int(load_checkpoint(tmp_path / "cut" / "unet.ckpt.safetensors")["step"]) == 1  # it did stop early
    main(["--work", str(tmp_path / "cut"), "--out", str(tmp_path / "cut-model"), *TINY_RECIPE])
    whole, cut = _weights(tmp_path / "whole-model", "unet"), _weights(tmp_path / "cut-model", "unet")
    assert all(torch.equal(whole[k], cut[k]) for k in whole)

    main(["--work", str(tmp_path / "more"), "--out", str(tmp_path / "more-model"), *TINY_RECIPE, "--seed", "1",
          "--init-from", str(tmp_path / "whole-model"), "--p-swap", "1"])
    vae_a, vae_b = _weights(tmp_path / "whole-model", "vae"), _weights(tmp_path / "more-model", "vae")
    assert all(torch.equal(vae_a[k], vae_b[k]) for k in vae_a)
    more = _weights(tmp_path / "more-model", "unet")
    assert not all(torch.equal(whole[k], more[k]) for k in whole)
    scale = lambda d: json.loads((d / "vae" / "config.json").read_text())["scaling_factor"]  # noqa: E731
    assert scale(tmp_path / "more-model") == scale(tmp_path / "whole-model")
    record = json.loads((tmp_path / "more-model" / "training.json").read_text())
    assert record["recipe"]["p_swap"] == 1.0 and record["continued_from"]["recipe"]["seed"] == 0


def test_no_module_of_the_core_imports_the_toy_world():
    """The core (stages, spectrum, concept, inversion, generation, loading...) knows nothing of the toy world:
    only the CLI's ``demo`` command reaches into it, inside its own function."""
    import ast

    import prospect

    root = Path(prospect.__file__).parent
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if any("toyworld" in n or n.startswith(("world", "toymodel")) for n in names):
                assert path.name == "cli.py", f"{path.name} imports {names}"
    cli = ast.parse((root / "cli.py").read_text())
    top = [n for n in cli.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not any("toyworld" in (n.module or "") for n in top if isinstance(n, ast.ImportFrom))
