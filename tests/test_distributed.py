"""Several processes (torchrun, gloo on CPU) give what one process gives: inversion, generation, train-many.

One 2-process launch runs the three commands (starting processes is the slow part); each test
repeats its command in this process and compares the files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from prospect.cli import main
from prospect.concept import Concept
from prospect.distributed import Solo, generate_share, shard

from conftest import write_reference_images

LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
DRIVER = """import json, sys
from prospect.cli import main
for argv in json.loads(sys.argv[1]):
    if main(argv):
        sys.exit(f"failed: {argv}")
"""
TRAIN = ["--steps", "6", "--batch-size", "4", "--lr", "0.05", "--init-word", "cat", "--checkpoint-every", "3"]
GENERATE = ["--prompt", "a * cat", "--steps", "3", "--num-images", "5", "--batch-size", "2", "--seed", "3",
            "--scheduler", "euler_a"]  # 3 calls over 2 processes; euler_a draws noise at every step
JOBS = [  # 3 jobs over 2 processes, with per-job settings
    {"images": ["refs/r0.png"], "out": "{dir}/j1.safetensors", "init_word": "cat", "seed": 1},
    {"images": "refs", "out": "{dir}/j2.safetensors", "placeholder": "sks", "steps": 3},
    {"images": ["refs/r1.png"], "out": "{dir}/j3.safetensors", "template": ["a {}", "a photo of {}"],
     "no-stratified": True, "stages": 4},
]
MANY = ["--steps", "4", "--batch-size", "2", "--checkpoint-every", "0"]  # defaults of every job


def _cpu(model) -> list[str]:
    """The one-process reference runs on the CPU, as the launched processes (also on a GPU machine)."""
    return ["--model", str(model), "--device", "cpu"]


def _job_argv(job: dict, folder: str) -> list[str]:
    """The ``prospect train`` command line that runs one job alone."""
    images = [job["images"]] if isinstance(job["images"], str) else job["images"]
    argv = ["train", *images, "--out", job["out"].format(dir=folder), *MANY]
    for key, value in job.items():
        flag = "--" + key.replace("_", "-")
        if key not in ("images", "out"):
            argv += [flag] if value is True else [a for v in (value if isinstance(value, list) else [value])
                                                  for a in (flag, str(v))]
    return argv


@pytest.fixture(scope="module")
def work(tmp_path_factory, clip_tokenizer_dir):
    from conftest import build_tiny_sdxl

    d = tmp_path_factory.mktemp("distributed")
    write_reference_images(d)
    build_tiny_sdxl(clip_tokenizer_dir).save_pretrained(d / "sdxl")
    (d / "jobs.json").write_text(json.dumps([dict(j, out=j["out"].format(dir="two")) for j in JOBS]))
    for sub in ("two", "one"):
        (d / sub).mkdir()
    return d


@pytest.fixture(scope="module")
def launched(work, tiny_model_dir):
    """Train, generate and train-many with 2 processes (stdout of both processes)."""
    model = ["--model", str(tiny_model_dir)]
    commands = [
        ["train", "refs", "--out", "two/c.safetensors", *model, *TRAIN],
        ["generate", "--concept", "two/c.safetensors", "--out", "two/gen", *model, *GENERATE],
        ["train-many", "jobs.json", *model, *MANY],
        ["train", "refs", "--out", "two/xl.safetensors", "--model", "sdxl", *TRAIN],  # both encoders' rows
    ]
    (work / "driver.py").write_text(DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # gloo on CPU, also on a GPU machine
    proc = subprocess.Popen([*LAUNCH, "driver.py", json.dumps(commands)], cwd=work, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = proc.communicate(timeout=1800)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun then stops its workers (a kill would leave them running)
        proc.communicate(timeout=120)
        raise
    assert proc.returncode == 0, stderr[-4000:]
    return stdout


@pytest.fixture()
def in_work(work, monkeypatch):
    """Run the one-process reference in the work folder, single-threaded as the launched processes."""
    monkeypatch.chdir(work)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield work
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_process_inversion_equals_one_process(launched, in_work, tiny_model_dir):
    assert main(["train", "refs", "--out", "one/c.safetensors", *_cpu(tiny_model_dir), *TRAIN]) == 0
    one, two = Concept.load("one/c.safetensors"), Concept.load("two/c.safetensors")
    torch.testing.assert_close(two.embeddings, one.embeddings, atol=1e-5, rtol=0)
    assert one.metadata() == two.metadata()
    assert launched.count("wrote two/c.safetensors") == 1  # the main process alone writes and prints
    assert (in_work / "two" / "c.ckpt.safetensors").exists()
    # the runs moved far from their start, so the equality above is not between two starts
    assert main(["train", "refs", "--out", "one/start.safetensors", *_cpu(tiny_model_dir), "--steps", "1",
                 "--lr", "0", "--init-word", "cat", "--checkpoint-every", "0"]) == 0
    assert (Concept.load("one/start.safetensors").embeddings - two.embeddings).abs().max() > 1e-2


@pytest.mark.slow
def test_two_process_sdxl_inversion_equals_one_process(launched, in_work):
    assert main(["train", "refs", "--out", "one/xl.safetensors", *_cpu("sdxl"), *TRAIN]) == 0
    one, two = Concept.load("one/xl.safetensors"), Concept.load("two/xl.safetensors")
    assert two.family == "sdxl"
    # SDXL's tiny inversion is float-sensitive: one process with 1 or 2 torch threads already ends up to 5.7e-4
    # apart in a few of its values (AdamW divides by the root of tiny squared gradients); a wrong split of the batch
    # (images, size conditioning, pooled embeddings) would move most values, so the mean is held tight too
    for a, b in zip(one.tables, two.tables):
        assert (b - a).abs().max() < 1e-3 and (b - a).abs().mean() < 1e-6
    assert launched.count("wrote two/xl.safetensors") == 1


@pytest.mark.slow
def test_two_process_generation_writes_the_same_images(launched, in_work, tiny_model_dir):
    argv = ["generate", "--concept", "two/c.safetensors", "--out", "one/gen", *_cpu(tiny_model_dir), *GENERATE]
    assert main(argv) == 0
    names = sorted(p.name for p in (in_work / "one" / "gen").iterdir())
    assert names == ["3-000.png", "3-001.png", "3-002.png", "3-003.png", "3-004.png", "3-grid.png"]
    assert sorted(p.name for p in (in_work / "two" / "gen").iterdir()) == names
    pixels = {}
    for name in names:
        one, two = (np.asarray(Image.open(in_work / d / "gen" / name)) for d in ("one", "two"))
        assert np.array_equal(one, two), name
        assert (in_work / "one" / "gen" / name).read_bytes() == (in_work / "two" / "gen" / name).read_bytes(), name
        pixels[name] = one
    assert not np.array_equal(pixels["3-000.png"], pixels["3-001.png"])  # each image has its own noise
    assert launched.count("3-grid.png") == 1


@pytest.mark.slow
def test_train_many_writes_what_each_job_alone_writes(launched, in_work, tiny_model_dir):
    for job in JOBS:
        argv = _job_argv(job, "one")
        assert main([*argv, *_cpu(tiny_model_dir)]) == 0
        name = job["out"].format(dir="")[1:]
        one, two = (in_work / "one" / name), (in_work / "two" / name)
        # the same computation, so bit-equal (the files' bytes are not: safetensors orders metadata per process)
        assert Concept.load(one).metadata() == Concept.load(two).metadata(), name
        assert torch.equal(Concept.load(two).embeddings, Concept.load(one).embeddings), name
        assert launched.count(f"wrote two/{name}") == 1
    assert Concept.load(in_work / "two" / "j3.safetensors").num_stages == 4


BAD_JOBS = [
    ("not a list", {"images": "refs", "out": "x.safetensors"}, "expected a non-empty JSON list"),
    ("empty list", [], "expected a non-empty JSON list"),
    ("no out", [{"images": "refs"}], 'job 1: a job must be a JSON object with "images" and "out"'),
    ("unknown key", [{"images": "refs", "out": "a.safetensors", "learning_rate": 1}], "job 1: unknown key 'learning_rate'"),
    ("model key", [{"images": "refs", "out": "a.safetensors", "model": "m"}], "job 1: unknown key 'model'"),
    ("bad value", [{"images": "refs", "out": "a.safetensors"}, {"images": "refs", "out": "b.safetensors", "steps": 0}],
     "job 2: steps must be an integer in [1, 10000000], got 0"),
    ("bad type", [{"images": "refs", "out": "a.safetensors", "steps": "many"}], "job 1: argument --steps: invalid int"),
    ("list value", [{"images": "refs", "out": "a.safetensors", "seed": [1, 2]}], "job 1: seed: expected a single value"),
    ("missing image", [{"images": "refs", "out": "a.safetensors"}, {"images": ["nope.png"], "out": "b.safetensors"}],
     "job 2: "),
    ("same out twice", [{"images": "refs", "out": "a.safetensors"}, {"images": "refs", "out": "./a.safetensors"}],
     "job 2: writes ./a.safetensors, as job 1 does"),
    ("bad out", [{"images": "refs", "out": "a.pt"}], "job 1: --out must end in .safetensors"),
]


@pytest.mark.parametrize("case, jobs, needle", BAD_JOBS, ids=[b[0] for b in BAD_JOBS])
def test_a_bad_job_list_fails_before_any_model_loads(case, jobs, needle, work, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "refs").symlink_to(work / "refs")
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["train-many", "jobs.json", "--model", str(tmp_path / "no-model")])  # loading it would fail
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("prospect: error: "), err
    assert needle in err[0], err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_shard_is_round_robin_and_covers_every_item():
    items = list(range(7))
    shares = [shard(items, r, 3) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert shard(items, 0, 1) == items
    with pytest.raises(ValueError):
        shard(items, 2, 2)


def test_generate_share_gives_each_image_its_own_seed():
    calls = []

    def pipe(prompts, generator, **call):
        calls.append([g.initial_seed() for g in generator])
        assert len(generator) == len(prompts) and prompts == ["x"] * len(prompts) and call == {"guidance_scale": 2.0}
        return len(prompts)

    class State:
        process_index, num_processes = 1, 2

    assert [first for first, _ in generate_share(pipe, 7, 10, State(), batch_size=2, prompt="x",
                                                              guidance_scale=2.0)] == [2, 6]
    assert calls == [[12, 13], [16]]


def test_solo_never_communicates():
    solo = Solo("cpu", "fp16")
    t = torch.ones(2)
    assert solo.reduce(t, "mean") is t and solo.num_processes == 1 and solo.is_main_process
    assert solo.mixed_precision == "no"  # CPU runs fp32, as accelerate
    with solo.autocast():
        assert (t * 2).dtype == torch.float32
