"""Every input, systematically: each flag by its type and range, each file the tool reads by its malformed forms.

The cases are generated from two tables, ``FLAGS`` (command, flag, kind) and ``FILES`` (the kinds of file
the tool reads, who reads them, and how each can be malformed). Every generated case must end the same way:
exit status 2, exactly one stderr line ``prospect: error: ...`` that names the flag or the file and says
what is expected, no traceback, and nothing written (an output folder that did not exist is not created;
one that existed is left as it was). ``PROSPECT_INPUTS_REPORT=FILE`` writes what each case printed, for
``docs/RELIABILITY.md``. Property tests (hypothesis) feed random bytes and values to the readers.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from conftest import write_reference_images, write_report
from prospect.cli import main
from prospect.concept import Concept

OBSERVED: list[dict] = []
# what a refusal says it expects: a range, a choice, a form, or what to do instead
EXPECTS = re.compile(r">=|<=|in \[|multiple of|choose|one of|expected|must|give|refusing|not a|invalid|no such|"
                     r"cannot|does not|is a folder|not valid|too large|too small|lower|unknown|re-export|convert|split|restore|try", re.I)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    write_report("PROSPECT_INPUTS_REPORT", OBSERVED)


def _contents(folder: Path) -> dict | None:
    """Every path under ``folder`` with its bytes (None for a folder), or None if ``folder`` does not exist."""
    if not folder.exists():
        return None
    return {str(p): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


def _refused(argv: list[str], capsys, out: Path, names: list[str], case: str) -> str:
    """Run the CLI; check exit 2, one error line naming one of ``names``, no traceback, nothing written."""
    before = _contents(out)
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if line.strip()]
    bar = [line for line in lines[:-1] if re.fullmatch(r"(\r?inversion:[^\r]*)+\r?", line)]  # train's own bar
    assert code == 2, (case, code, err)
    assert "Traceback" not in err and len(lines) == 1 + len(bar), (case, err)
    line = lines[-1]
    assert line.startswith("prospect: error: "), (case, line)
    assert any(n in line for n in names), (case, names, line)
    assert EXPECTS.search(line), (case, line)
    assert _contents(out) == before, (case, "something was written")
    OBSERVED.append({"case": case.split(":")[0] if ":" in case else "flag " + case.split()[0], "input": case,
                     "exit": code, "message": line})
    return line


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    """Inputs that work: reference images, a concept, a words file; a model folder."""
    root = tmp_path_factory.mktemp("inputs")
    refs = write_reference_images(root)
    concept = root / "c.safetensors"
    Concept(embeddings=torch.randn(10, 32, generator=torch.Generator().manual_seed(0)), initializer="cat").save(concept)
    made = root / "made"
    made.mkdir()  # a real checkpoint of the TRAIN command line below, after its first step
    argv = _fill(TRAIN, refs=refs, out=made, model=tiny_model_dir)
    assert main(argv[:argv.index("--steps") + 1] + ["1"] + argv[argv.index("--steps") + 2:-1] + ["1"]) == 0
    return {"refs": refs, "concept": concept, "model": tiny_model_dir, "root": root,
            "checkpoint": made / "c.ckpt.safetensors"}


# ---------------------------------------------------------------------------------------------------
# Flags: every numeric, choice and device flag of every command, by kind.

HUGE = "9" * 30
BAD_VALUES = {
    "count": ["0", "-1", "1.5", "nan", "abc", HUGE],  # an integer >= 1 with a sane upper bound
    "count0": ["-1", "1.5", "abc"],  # an integer >= 0 (0 = never)
    "rate": ["-1", "nan", "inf", "abc"],  # a finite float >= 0
    "prob": ["-0.1", "1.5", "nan", "abc"],  # a probability
    "guidance": ["-1", "nan", "inf", "abc", "1e9"],
    "size": ["0", "-8", "13", "abc", "999992"],  # pixels: a positive multiple of 8, bounded
    "seed": ["-1", "abc", str(2 ** 64)],
    "choice": ["bogus"],
    "device": ["banana", "cuda:7"],
    "port": ["0", "-1", "65536", "abc"],
    "stage": ["-1", "10", "1.5", "abc"],  # a stage of the run's 10
    "stage_count": ["0", "11", "1.5", "abc"],  # a number of the run's 10 stages, at least 1
}

TRAIN = ["train", "{refs}", "--out", "{out}/c.safetensors", "--model", "{model}", "--steps", "2", "--batch-size", "2",
         "--checkpoint-every", "0"]
GENERATE = ["generate", "--model", "{model}", "--steps", "2", "--out", "{out}"]
IMG2IMG = GENERATE + ["--image", "{refs}/r0.png"]
VISUALIZE = ["visualize", "--model", "{model}", "--concept", "{concept}", "--steps", "2", "--out", "{out}"]
EXPORT = ["export", "{concept}", "--format", "a1111", "--out", "{out}"]
DEMO = ["demo", "--model", "{model}", "--steps", "2", "--out", "{out}"]
UI = ["ui", "--model", "{model}", "--out", "{out}"]

FLAGS = [  # (base command line, flag, kind)
    (TRAIN, "--stages", "count"), (TRAIN, "--vectors-per-stage", "count"), (TRAIN, "--steps", "count"),
    (TRAIN, "--lr", "rate"), (TRAIN, "--batch-size", "count"), (TRAIN, "--resolution", "size"),
    (TRAIN, "--flip-p", "prob"), (TRAIN, "--snr-gamma", "rate"), (TRAIN, "--ti-warmup", "count0"),
    (TRAIN, "--stage-choice", "count0"), (TRAIN, "--hue-jitter-from", "stage"),
    (TRAIN, "--hue-jitter-below", "stage_count"),
    (TRAIN, "--smoothness", "rate"), (TRAIN, "--seed", "seed"), (TRAIN, "--checkpoint-every", "count0"),
    (TRAIN, "--validation-every", "count0"), (TRAIN, "--parameterization", "choice"), (TRAIN, "--crop", "choice"),
    (TRAIN, "--mixed-precision", "choice"), (TRAIN, "--dtype", "choice"), (TRAIN, "--device", "device"),
    (GENERATE, "--steps", "count"), (GENERATE, "--guidance-scale", "guidance"), (GENERATE, "--seed", "seed"),
    (GENERATE, "--height", "size"), (GENERATE, "--width", "size"), (GENERATE, "--num-images", "count"),
    (GENERATE, "--batch-size", "count"), (IMG2IMG, "--strength", "prob"), (GENERATE, "--scheduler", "choice"),
    (GENERATE, "--dtype", "choice"), (GENERATE, "--device", "device"), (GENERATE, "--eta", "rate"),
    (VISUALIZE, "--scale", "count"), (VISUALIZE, "--steps", "count"), (VISUALIZE, "--guidance-scale", "guidance"),
    (VISUALIZE, "--seed", "seed"), (VISUALIZE, "--height", "size"), (VISUALIZE, "--width", "size"),
    (VISUALIZE, "--scheduler", "choice"), (VISUALIZE, "--dtype", "choice"), (VISUALIZE, "--device", "device"),
    (EXPORT, "--steps", "count"), (EXPORT, "--format", "choice"),
    (DEMO, "--steps", "count"), (DEMO, "--seed", "seed"), (DEMO, "--dtype", "choice"), (DEMO, "--device", "device"),
    (UI, "--port", "port"), (UI, "--dtype", "choice"), (UI, "--device", "device"),
]
FLAG_CASES = [(base, flag, value) for base, flag, kind in FLAGS for value in BAD_VALUES[kind]
              if not (value.startswith("cuda") and torch.cuda.is_available())]


def _fill(argv: list[str], **paths) -> list[str]:
    return [a.format(**{k: str(v) for k, v in paths.items()}) for a in argv]


def _with(base: list[str], flag: str, value: str) -> list[str]:
    """``base`` with ``flag`` set to ``value`` (replacing the base's own value of that flag)."""
    argv = list(base)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
        return argv
    return argv + [f"{flag}={value}"]  # '=' so that '-1' is a value, not a flag


@pytest.mark.parametrize("base, flag, value", FLAG_CASES, ids=[f"{b[0]} {f}={v[:12]}" for b, f, v in FLAG_CASES])
def test_every_flag_refuses_values_out_of_its_type_and_range(base, flag, value, world, tmp_path, capsys):
    out = tmp_path / "out"
    if base[0] == "train":
        out.mkdir()  # train writes into an existing folder: it must stay empty
    argv = _fill(_with(base, flag, value), out=out, **world)
    names = [flag, flag.lstrip("-"), flag.lstrip("-").replace("-", "_")]
    _refused(argv, capsys, out, names, f"{base[0]} {flag} {value}")


def test_flag_table_covers_every_numeric_and_choice_flag():
    """The table is the list of the parser's flags with a type or choices: a new flag must join it."""
    from prospect.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    listed = {(base[0], flag) for base, flag, _ in FLAGS}
    missing = []
    for command, p in sub.choices.items():
        for action in p._actions:
            typed = action.type in (int, float) or action.choices is not None or action.dest == "device"
            for flag in action.option_strings[:1]:
                if typed and command != "train-many" and (command, flag) not in listed:  # train-many's are train's
                    missing.append(f"{command} {flag}")
    assert missing == []


# ---------------------------------------------------------------------------------------------------
# Files: every kind of file the tool reads, by its malformed forms.

def _concept_bytes() -> bytes:
    from safetensors.torch import save

    c = Concept(embeddings=torch.randn(10, 32, generator=torch.Generator().manual_seed(1)), initializer="cat")
    return save({"embeddings": c.embeddings}, metadata=c.metadata())


def _safetensors_header(tensors: dict, meta: dict | None = None) -> bytes:
    """A safetensors file whose header declares ``tensors`` (name: (dtype, shape)) with no data behind."""
    header = {k: {"dtype": d, "shape": s, "data_offsets": [0, 0]} for k, (d, s) in tensors.items()}
    if meta:
        header["__metadata__"] = meta
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw


def _concept_variant(how: str) -> bytes:
    from safetensors.torch import save

    good = Concept(embeddings=torch.randn(10, 32), initializer="cat")
    meta = good.metadata()
    if how == "wrong dtype":
        return save({"embeddings": torch.zeros(10, 32, dtype=torch.int32)}, metadata=meta)
    if how == "non-finite":
        return save({"embeddings": torch.full((10, 32), float("nan"))}, metadata=meta)
    if how == "wrong shape":
        return save({"embeddings": torch.zeros(320)}, metadata=meta)
    if how == "absurd size":
        return _safetensors_header({"embeddings": ("F32", [10, 2 ** 40])}, meta)
    raise KeyError(how)


def _checkpoint_variant(how: str, good: bytes) -> bytes:
    from safetensors.torch import load, save

    if how == "absurd size":
        return _safetensors_header({"rows": ("F32", [2 ** 40, 32])}, _meta_of(good))
    change = {"non-finite": lambda v: torch.full_like(v, float("nan")) if v.is_floating_point() else v,
              "wrong shape": lambda v: v.flatten()[:1].clone() if v.ndim else v,
              "wrong dtype": lambda v: v.to(torch.int32)}[how]
    return save({k: change(v) for k, v in load(good).items()}, metadata=_meta_of(good))  # the metadata kept


def _meta_of(data: bytes) -> dict:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]).get("__metadata__", {})


MALFORMED = ["empty", "truncated", "wrong top-level type", "wrong dtype", "non-finite", "wrong shape",
             "absurd size", "a folder"]


def _malformed(how: str, good: bytes, other: bytes, variant) -> bytes | None:
    """The bytes of a malformed form of a file whose good form is ``good`` (None = make a folder)."""
    if how == "empty":
        return b""
    if how == "truncated":
        return good[: len(good) // 2]
    if how == "wrong top-level type":
        return other
    if how == "a folder":
        return None
    return variant(how)


def _words_variant(how: str, suffix: str) -> bytes:
    values = {"wrong dtype": [1.5] * 10, "non-finite": [float("nan")] * 10, "wrong shape": [["a"]] * 10,
              "absurd size": ["a photo of a cat " * 400] * 200}  # about 1.4 MB: a mistake, not N prompts
    data = values[how]
    if suffix == ".json":
        return json.dumps(data).encode()
    import yaml

    return yaml.safe_dump({"prospect_words": data}).encode()


def _jobs_variant(how: str) -> bytes:
    values = {"wrong dtype": [{"images": "{refs}", "out": "{out}/j.safetensors", "steps": 1.5}],
              "non-finite": [{"images": "{refs}", "out": "{out}/j.safetensors", "lr": float("nan")}],
              "wrong shape": [["{refs}", "{out}/j.safetensors"]],
              "absurd size": [{"images": "{refs}", "out": f"{{out}}/j{k}.safetensors"} for k in range(30000)]}
    return json.dumps(values[how]).encode()


def _file_kinds(world_paths: dict) -> dict:
    """kind: (good bytes, another kind's bytes, variant(how) -> bytes, suffix, readers)."""
    refs, model = world_paths["refs"], world_paths["model"]
    concept = _concept_bytes()
    png = (refs / "r0.png").read_bytes()
    words = json.dumps(["a photo of *"] * 10).encode()
    return {
        "concept": (concept, png, _concept_variant, ".safetensors", {
            "generate --concept": GENERATE + ["--concept", "{file}"],
            "visualize --concept": ["visualize", "--model", "{model}", "--concept", "{file}", "--steps", "2", "--out", "{out}"],
            "export": ["export", "{file}", "--format", "diffusers", "--out", "{out}"],
            "info": ["info", "{file}"],
        }),
        "image": (png, concept, lambda how: _image_variant(how, png), ".png", {
            "train": TRAIN[:1] + ["{file}"] + TRAIN[2:],
            "generate --image": GENERATE + ["--image", "{file}"],
            "demo --image": DEMO + ["--image", "{file}"],
        }),
        "words (JSON)": (words, b"42", lambda how: _words_variant(how, ".json"), ".json", {
            "generate --prospect-words": GENERATE + ["--prospect-words", "{file}"],
        }),
        "words (YAML)": (b"prospect_words: ['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j']\n", b"just a sentence\n",
                         lambda how: _words_variant(how, ".yaml"), ".yaml", {
            "generate --prospect-words": GENERATE + ["--prospect-words", "{file}"],
        }),
        "job list": (json.dumps([{"images": "{refs}", "out": "{out}/j.safetensors"}]).encode(), b'{"images": []}',
                     _jobs_variant, ".json", {
            "train-many": ["train-many", "{file}", "--model", "{model}", "--steps", "1", "--batch-size", "1"],
        }),
        "checkpoint": (world_paths["checkpoint"].read_bytes(), concept,
                       lambda how: _checkpoint_variant(how, world_paths["checkpoint"].read_bytes()), ".safetensors", {
            "train --resume": TRAIN + ["--resume"],
        }),
        "single-file model": (None, concept, lambda how: _model_variant(how), ".safetensors", {
            "generate --model": ["generate", "--model", "{file}", "--steps", "2", "--out", "{out}"],
        }),
    }


def _image_variant(how: str, png: bytes) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    if how == "wrong dtype":  # 32-bit float TIFF content in a .png name
        buf = io.BytesIO()
        Image.fromarray(np.zeros((16, 16), dtype=np.float32)).save(buf, format="TIFF")
        return buf.getvalue()
    if how == "non-finite":  # a float image of NaNs
        buf = io.BytesIO()
        Image.fromarray(np.full((16, 16), np.nan, dtype=np.float32)).save(buf, format="TIFF")
        return buf.getvalue()
    if how == "wrong shape":  # 1 x 4000: too thin to learn from
        buf = io.BytesIO()
        Image.new("RGB", (4000, 1)).save(buf, format="PNG")
        return buf.getvalue()
    if how == "absurd size":  # a header declaring 30000 x 30000 pixels
        import zlib

        ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
        chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    raise KeyError(how)


def _model_variant(how: str) -> bytes:
    from safetensors.torch import save

    if how == "wrong dtype":
        return save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, dtype=torch.int8)})
    if how == "non-finite":
        return save({"model.diffusion_model.input_blocks.0.0.weight": torch.full((4,), float("nan"))})
    if how == "wrong shape":
        return save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(3)})
    if how == "absurd size":
        return _safetensors_header({"model.diffusion_model.input_blocks.0.0.weight": ("F32", [2 ** 40])})
    raise KeyError(how)


def _model_folder(how: str, good: Path, dest: Path) -> None:
    """A malformed form of the diffusers model folder ``good``, at ``dest``."""
    import shutil

    from safetensors.torch import load_file

    if how == "empty":
        dest.mkdir()
        return
    shutil.copytree(good, dest)
    weights = dest / "unet" / "diffusion_pytorch_model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "wrong top-level type":
        (dest / "model_index.json").write_text("[1, 2, 3]")
    elif how == "wrong dtype":
        config = json.loads((dest / "unet" / "config.json").read_text())
        (dest / "unet" / "config.json").write_text(json.dumps(dict(config, sample_size="big")))
    elif how == "non-finite":
        save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(weights).items()}, weights)
    elif how == "wrong shape":
        save_file({k: v[..., :1].clone() if v.ndim else v for k, v in load_file(weights).items()}, weights)
    elif how == "absurd size":
        weights.write_bytes(_safetensors_header({k: ("F32", [2 ** 40]) for k in list(load_file(weights))[:1]}))
    elif how == "a folder":
        (dest / "unet" / "config.json").unlink()
        (dest / "unet" / "config.json").mkdir()


@pytest.mark.parametrize("how", MALFORMED)
def test_a_malformed_model_folder_is_refused_in_one_line(how, world, tmp_path, capsys):
    model, out = tmp_path / "model", tmp_path / "out"
    _model_folder(how, world["model"], model)
    argv = ["generate", "--model", str(model), "--steps", "2", "--out", str(out)]
    _refused(argv, capsys, out, [str(model)] if how != "non-finite" else ["NaN"], f"model folder (generate --model): {how}")


FILE_KINDS = ["concept", "image", "words (JSON)", "words (YAML)", "job list", "checkpoint", "single-file model"]
READERS = {"concept": ["generate --concept", "visualize --concept", "export", "info"],
           "image": ["train", "generate --image", "demo --image"], "words (JSON)": ["generate --prospect-words"],
           "words (YAML)": ["generate --prospect-words"], "job list": ["train-many"], "checkpoint": ["train --resume"],
           "single-file model": ["generate --model"]}
FILE_CASES = [(kind, reader, how) for kind in FILE_KINDS for reader in READERS[kind] for how in MALFORMED
              if not (kind == "single-file model" and how == "truncated")]  # no good bytes to cut: see 'empty'


@pytest.mark.parametrize("kind, reader, how", FILE_CASES, ids=[f"{k}-{r}-{h}" for k, r, h in FILE_CASES])
def test_every_file_the_tool_reads_refuses_its_malformed_forms(kind, reader, how, world, tmp_path, capsys):
    good, other, variant, suffix, readers = _file_kinds(world)[kind]
    out = tmp_path / "out"
    if reader.startswith("train"):
        out.mkdir()
    if kind == "job list":  # the job list names real images and an output folder
        good = good.replace(b"{refs}", str(world["refs"]).encode()).replace(b"{out}", str(out).encode())
    data = _malformed(how, good or b"", other, variant)
    if kind == "job list" and data:
        data = data.replace(b"{refs}", str(world["refs"]).encode()).replace(b"{out}", str(out).encode())
    target = tmp_path / f"bad{suffix}" if kind != "checkpoint" else out / "c.ckpt.safetensors"  # what --resume reads
    if data is None:
        target.mkdir()
    else:
        target.write_bytes(data)
    argv = _fill(readers[reader], file=target, out=out, **world)
    _refused(argv, capsys, out, [target.name, str(target)], f"{kind} ({reader}): {how}")


def test_the_good_forms_of_the_table_work(world, tmp_path, capsys):
    """The malformed forms are made from these, so they reach the checks they are meant for."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "c.ckpt.safetensors").write_bytes(world["checkpoint"].read_bytes())
    assert main(_fill(TRAIN + ["--resume"], out=out, **world)) == 0  # resumes at step 1 of 2
    assert "c.safetensors" in capsys.readouterr().out
    words = tmp_path / "w.json"
    words.write_text(json.dumps(["a photo of *"] * 10))
    assert main(_fill(GENERATE + ["--prospect-words", str(words), "--concept", "{concept}"], out=tmp_path / "g", **world)) == 0


def test_file_table_covers_every_malformed_form():
    assert len(FILE_CASES) == sum(len(READERS[k]) * len(MALFORMED) for k in FILE_KINDS) - 1


# ---------------------------------------------------------------------------------------------------
# Readers under random input (hypothesis): refused with their own error type, never anything else.

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(st.integers(0, 2000), st.binary(max_size=16))
def test_concept_reader_refuses_cut_or_damaged_concepts(tmp_path_factory, cut, noise):
    from prospect.concept import ConceptError

    good = _concept_bytes()
    data = good[:cut] + noise + good[cut + len(noise):] if noise else good[:cut]
    path = tmp_path_factory.mktemp("fuzz") / "c.safetensors"
    path.write_bytes(data)
    if data == good:
        assert Concept.load(path).num_stages == 10
        return
    try:
        c = Concept.load(path)
    except ConceptError:
        return
    assert torch.isfinite(c.embeddings).all() and c.num_stages == 10  # noise in the data part: still a concept


SCALARS = st.none() | st.booleans() | st.integers(-20, 20) | st.floats(allow_nan=True) | st.text(max_size=8)
ENTRIES = SCALARS | st.lists(SCALARS, max_size=3) | st.dictionaries(st.text(max_size=6), SCALARS, max_size=2)
JSONISH = (st.lists(ENTRIES, max_size=12) | st.dictionaries(st.sampled_from(["prospect_words", "x"]), st.lists(ENTRIES, max_size=12))
           | ENTRIES)  # a list of (mostly) entries, {"prospect_words": [...]}, or anything else


@FAST
@given(JSONISH)
def test_words_reader_and_spectrum_refuse_any_json_with_a_spectrum_error(tmp_path_factory, value):
    from prospect.spectrum import SpectrumError, build_spectrum, load_prospect_words

    path = tmp_path_factory.mktemp("fuzz") / "w.json"
    path.write_text(json.dumps(value))
    try:
        words = load_prospect_words(path)
        build_spectrum("*", words, num_stages=10)
    except SpectrumError:
        return
    assert len(words) == 10


def _reader(kind: str):
    """(read function, the error it must raise, file name) of the readers fed random bytes."""
    from prospect.checkpoint import load_checkpoint
    from prospect.concept import ConceptError
    from prospect.data import ImageError, open_image

    return {"concept": (Concept.load, ConceptError, "c.safetensors"), "image": (open_image, ImageError, "i.png"),
            "checkpoint": (load_checkpoint, ValueError, "c.ckpt.safetensors")}[kind]


@pytest.mark.parametrize("kind, size", [("concept", 400), ("image", 300), ("checkpoint", 300)])
def test_readers_refuse_random_bytes_with_their_own_error(kind, size, tmp_path_factory):
    read, error, name = _reader(kind)

    @FAST
    @given(st.binary(max_size=size))
    def refused(data):
        path = tmp_path_factory.mktemp("fuzz") / name
        path.write_bytes(data)
        with pytest.raises(error):
            read(path)

    refused()


# ---------------------------------------------------------------------------------------------------
# The API's arguments: the same checks, raised as the API's own errors (never a TypeError from inside).

API_CONFIG = {  # InversionConfig field: values that must be refused
    "steps": [0, -1, 1.5, "10", None, True, 10 ** 12], "batch_size": [0, -3, 2.0, "2", 10 ** 9],
    "num_stages": [0, 1001, "10", 2.5], "vectors_per_stage": [0, 76, "6"], "lr": [-1.0, math.nan, math.inf, "0.1", None, 1e39],
    "flip_p": [-0.1, 1.5, math.nan, "0.5"], "resolution": [0, 12, -8, 10 ** 6, "512", 64.0], "seed": [-1, 2 ** 64, "0", 1.0],
    "checkpoint_every": [-1, 1.5, "5"], "validation_every": [-2, "1"], "parameterization": ["tree", 3],
    "snr_gamma": [-1.0, math.nan, "5"], "smoothness": [-0.5, math.inf, "1"], "ti_warmup": [-1, 2.5, "3"],
    "stage_choice": [-1, 2.5, "16", 5000], "hue_jitter_from": [-1, 10, 2.5, "6", True],
    "hue_jitter_below": [0, 11, 2.5, "4", True],
    "crop": ["left", None], "mixed_precision": ["fp8", True], "placeholder": ["", 7], "initializer": [None],
    "templates": ["{}", (), ("a photo",), ("{} {}",), (3,)],
}
API_CONFIG_CASES = [(k, v) for k, vs in API_CONFIG.items() for v in vs]


@pytest.mark.parametrize("field_, value", API_CONFIG_CASES, ids=[f"{k}={v!r}"[:40] for k, v in API_CONFIG_CASES])
def test_inversion_config_refuses_every_bad_field_with_an_inversion_error(field_, value):
    from prospect.inversion import InversionConfig, InversionError, check_config

    with pytest.raises(InversionError, match=field_.split("_")[0] if field_ != "templates" else "template"):
        check_config(InversionConfig(**{field_: value}))


API_CALL = {"strength": [-0.1, 1.5, math.nan, "0.5"], "height": [0, 13, -8, 10 ** 6, "64", 64.0],
            "num_inference_steps": [0, -1, 1001, 2.5, "4"], "guidance_scale": [-1.0, math.nan, math.inf, 1e9, "5"],
            "num_images_per_prompt": [0, 10 ** 6, 1.5]}
API_CALL_CASES = [(k, v) for k, vs in API_CALL.items() for v in vs]


@pytest.mark.parametrize("arg, value", API_CALL_CASES, ids=[f"{k}={v!r}"[:40] for k, v in API_CALL_CASES])
def test_pipeline_call_refuses_every_bad_argument_with_a_value_error(arg, value, tiny_pipe):
    from PIL import Image

    from prospect.pipeline import ProSpectPipeline

    pp = ProSpectPipeline(tiny_pipe)
    image = Image.new("RGB", (64, 64)) if arg == "strength" else None
    spy = []
    pp.pipe.unet.register_forward_pre_hook(lambda *a: spy.append(1))
    with pytest.raises(ValueError, match=arg.split("_per_")[0]):
        pp("a cat", image=image, **{"num_inference_steps": 2, arg: value})
    assert spy == []  # refused before any denoising
