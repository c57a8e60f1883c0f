"""The command line end to end on a tiny model: train -> generate -> visualize -> export -> info."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from prospect.cli import main
from prospect.concept import Concept
from prospect.outputs import read_parameters

from conftest import write_reference_images


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    write_reference_images(d)
    return d


@pytest.fixture(scope="module")
def trained(workdir, tiny_model_dir):
    out = workdir / "concept.safetensors"
    code = main(["train", str(workdir / "refs"), "--out", str(out), "--model", str(tiny_model_dir),
                 "--steps", "6", "--init-word", "cat", "--checkpoint-every", "3", "--validation-every", "3"])
    assert code == 0
    return out


def test_train_writes_a_concept_and_a_checkpoint(trained):
    concept = Concept.load(trained)
    assert concept.num_stages == 10 and concept.dim == 32 and concept.initializer == "cat"
    assert trained.with_name("concept.ckpt.safetensors").exists()
    validation = sorted(p.name for p in trained.with_name("concept-validation").iterdir())
    assert validation == ["step-000003.png", "step-000006.png"]


def test_generate_writes_pngs_with_parameters_and_a_grid(trained, tiny_model_dir, workdir, capsys):
    out = workdir / "gen"
    words = workdir / "words.json"
    words.write_text(json.dumps(["a * dog"] * 5 + ["a dog"] * 4 + [9]))
    code = main(["generate", "--model", str(tiny_model_dir), "--concept", str(trained), "--prompt", "*",
                 "--prospect-words", str(words), "--steps", "4", "--num-images", "2", "--seed", "7", "--out", str(out)])
    assert code == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["7-000.png", "7-001.png", "7-grid.png"]
    params = read_parameters(out / "7-000.png")
    assert params["seed"] == 7 and params["prospect_words"][9] == 9 and params["num_inference_steps"] == 4
    concept = Concept.load(trained)  # the default: several vectors per stage, all in the prompt
    assert params["stage_prompts"][0] == f"a {concept.prompt_text(0)} dog" and params["stage_prompts"][9] == concept.prompt_text(9)
    assert params["stage_prompts"][0].startswith("a <*:s0> <*:s0:1> ")
    assert "7-grid.png" in capsys.readouterr().out


def test_generate_img2img_with_repeated_word_flags(trained, tiny_model_dir, workdir):
    out = workdir / "img2img"
    words = ["a photo of *"] * 5 + ["a photo"] * 5
    args = ["generate", "--model", str(tiny_model_dir), "--concept", str(trained), "--image",
            str(workdir / "refs" / "r0.png"), "--strength", "0.5", "--steps", "4", "--out", str(out)]
    for w in words:
        args += ["--word", w]
    assert main(args) == 0
    assert read_parameters(out / "0-000.png")["img2img"] is True


def test_visualize_writes_a_labelled_grid(trained, tiny_model_dir, workdir):
    out = workdir / "vis"
    assert main(["visualize", "--model", str(tiny_model_dir), "--concept", str(trained), "--steps", "3",
                 "--out", str(out)]) == 0
    grid = Image.open(out / "stages-0.png")
    assert grid.width == 10 * 16 and read_parameters(out / "stages-0.png")["labels"][0] == "s9 only"


def test_visualize_honours_height_and_width(trained, tiny_model_dir, workdir):
    out = workdir / "vis-size"
    assert main(["visualize", "--model", str(tiny_model_dir), "--concept", str(trained), "--steps", "2",
                 "--height", "24", "--width", "32", "--out", str(out)]) == 0
    grid = Image.open(out / "stages-0.png")
    assert grid.width == 10 * 32 and grid.height > 2 * 24  # two rows of 32x24 images, plus labels


def test_export_both_formats_and_info(trained, workdir, capsys):
    assert main(["export", str(trained), "--format", "diffusers", "--out", str(workdir / "ti")]) == 0
    assert len(list((workdir / "ti").glob("*.safetensors"))) == 10
    out = capsys.readouterr().out  # named after the concept file: "concept"
    assert "tokens: <concept:s0> ... <concept:s9>" in out and (workdir / "ti" / "concept-s9.safetensors").exists()
    assert main(["export", str(trained), "--format", "a1111", "--out", str(workdir / "a1111"), "--name", "my_cat"]) == 0
    out = capsys.readouterr().out  # exact for A1111's default 20 steps: two calls per stage
    assert "A1111 prompt for 20 steps: [[[[[[[[[my_cat-s9:my_cat-s8:1]:my_cat-s7:3]" in out
    assert main(["info", str(trained)]) == 0
    assert "10 stages" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--word", "a"], "exactly num_stages=10"),
        (["generate", "--strength", "2", "--image", "{img}"], "strength"),
        (["generate", "--height", "30"], "height"),
        (["generate", "--concept", "{missing}"], "missing.safetensors"),
        (["train", "{empty}", "--out", "{out}"], "no images"),
        (["info", "{notimage}"], "notimage"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tiny_model_dir, workdir, capsys):
    (workdir / "empty").mkdir(exist_ok=True)
    (workdir / "notimage.txt").write_text("hello")
    fill = dict(img=workdir / "refs" / "r0.png", missing=workdir / "missing.safetensors", empty=workdir / "empty",
                out=workdir / "x.safetensors", notimage=workdir / "notimage.txt")
    argv = [a.format(**fill) for a in args] + ["--model", str(tiny_model_dir)] * (args[0] != "info")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prospect: error:") and "\n" not in err and message in err, err
    assert not (workdir / "x.safetensors").exists()


def test_console_script_is_the_cli_and_its_help_lists_the_commands(capsys):
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "prospect"]
    assert script.load() is main
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("train", "train-many", "generate", "visualize", "export", "info", "demo"):
        assert cmd in out


@pytest.mark.slow
def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "prospect.cli", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("train", "generate", "visualize", "export", "demo"):
        assert cmd in out.stdout


def test_train_with_several_vectors_shared_stages_and_no_flip_then_info_and_export(workdir, tiny_model_dir, capsys):
    out = workdir / "multi.safetensors"
    code = main(["train", str(workdir / "refs"), "--out", str(out), "--model", str(tiny_model_dir), "--steps", "3",
                 "--init-word", "cat", "--vectors-per-stage", "3", "--parameterization", "shared", "--flip-p", "0",
                 "--checkpoint-every", "0"])
    assert code == 0
    concept = Concept.load(out)
    assert concept.embeddings.shape == (10, 3, 32) and concept.vectors_per_stage == 3
    assert "10 stages x 3 vectors x 32" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    assert "3 vector(s) per stage" in capsys.readouterr().out
    assert main(["export", str(out), "--format", "diffusers", "--out", str(workdir / "multi-ti")]) == 0
    assert len(list((workdir / "multi-ti").glob("multi-s*.safetensors"))) == 10


def test_train_with_hue_jitter_learns_other_late_tokens_and_the_same_early_ones(workdir, tiny_model_dir):
    base = ["train", str(workdir / "refs"), "--model", str(tiny_model_dir), "--steps", "3", "--init-word", "cat",
            "--vectors-per-stage", "1", "--stage-choice", "0", "--checkpoint-every", "0"]
    assert main(base + ["--out", str(workdir / "plain.safetensors")]) == 0
    assert main(base + ["--out", str(workdir / "hue.safetensors"), "--hue-jitter-from", "8"]) == 0
    plain, hue = (Concept.load(workdir / f"{n}.safetensors").embeddings for n in ("plain", "hue"))
    assert torch.equal(plain[:8], hue[:8]) and not torch.allclose(plain[8:], hue[8:])
    assert main(base + ["--out", str(workdir / "late.safetensors"), "--hue-jitter-below", "2"]) == 0
    late = Concept.load(workdir / "late.safetensors").embeddings
    assert torch.equal(plain[2:], late[2:]) and not torch.allclose(plain[:2], late[:2])


@pytest.mark.parametrize("flag, value, match", [("--vectors-per-stage", "0", "vectors_per_stage"),
                                                ("--flip-p", "1.5", "flip_p"), ("--flip-p", "nan", "flip_p")])
def test_bad_inversion_flags_are_one_line_errors(workdir, tiny_model_dir, capsys, flag, value, match):
    code = main(["train", str(workdir / "refs"), "--out", str(workdir / "bad.safetensors"), "--model", str(tiny_model_dir),
                 flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("prospect: error:") and match in err[0]
    assert not (workdir / "bad.safetensors").exists()


def test_version(capsys):
    import prospect

    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"prospect {prospect.__version__}"
    assert main(["generate", "--steps", "abc"]) == 2  # argparse's errors: our one line, with where to look
    assert capsys.readouterr().err == ("prospect: error: argument --steps: invalid int value: 'abc' "
                                       "(see 'prospect generate --help')\n")


def test_concept_records_a_model_name_and_fingerprint_not_a_path(trained, tiny_model_dir, capsys):
    from prospect.loading import fingerprint, load_pipeline

    concept = Concept.load(trained)
    assert concept.base_model == tiny_model_dir.name and "/" not in concept.base_model
    assert concept.base_model_fingerprint == fingerprint(load_pipeline(tiny_model_dir))
    assert concept.base_model_fingerprint.startswith("sha256:") and len(concept.base_model_fingerprint) == 23
    assert main(["info", str(trained)]) == 0
    assert f"base model {tiny_model_dir.name!r} ({concept.base_model_fingerprint})" in capsys.readouterr().out


def test_flags_and_defaults_derive_from_the_config_dataclasses():
    """No default is restated by the CLI: parsing no options gives the dataclasses' own defaults, and each
    field's flag sets that field."""
    from prospect.cli import build_parser, config_from
    from prospect.inversion import InversionConfig
    from prospect.pipeline import GenerationConfig

    parser = build_parser()
    assert config_from(InversionConfig, parser.parse_args(["train", "x", "--out", "y.safetensors"])) == InversionConfig()
    assert config_from(GenerationConfig, parser.parse_args(["generate"])) == GenerationConfig()
    args = parser.parse_args(["train", "x", "--out", "y.safetensors", "--init-word", "cat", "--stages", "4",
                              "--template", "a {}", "--template", "the {}", "--no-stratified", "--lr", "0.01"])
    assert config_from(InversionConfig, args) == InversionConfig(initializer="cat", num_stages=4,
                                                                 templates=("a {}", "the {}"), stratified=False, lr=0.01)
    args = parser.parse_args(["generate", "--steps", "7", "--eta", "0.5", "--negative-prompt", "blurry"])
    assert config_from(GenerationConfig, args) == GenerationConfig(num_inference_steps=7, eta=0.5,
                                                                   negative_prompt="blurry")
