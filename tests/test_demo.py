"""`prospect demo` end to end on the embedded model, on a reduced budget."""

from __future__ import annotations

import html
import re

import pytest
import torch

from prospect.toyworld import world
from prospect.cli import main
from prospect.toyworld.demo import REFERENCE, TASK_BY_NAME, TASKS, DemoConfig, _shows, run_demo
from prospect.toyworld.reader import read


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One `prospect demo` on a reduced budget (2 inversion steps, 2 images a row, 4 denoising steps,
    a stage choice on one draw per stage):
    what it printed, and the report run_demo returned to the command."""
    import contextlib
    import functools
    import io

    import prospect.toyworld.demo

    reports = []

    def keep(*args, **kwargs):
        reports.append(run_demo(*args, **kwargs))
        return reports[-1]

    out = tmp_path_factory.mktemp("demo") / "d"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(prospect.toyworld.demo, "DemoConfig", functools.partial(DemoConfig, samples=2, num_inference_steps=4,
                                                                             stage_choice=1))
        mp.setattr(prospect.toyworld.demo, "run_demo", keep)
        assert main(["demo", "--out", str(out), "--steps", "2"]) == 0
    (report,) = reports
    return report, printed.getvalue(), out


def test_demo_writes_figure_report_and_concept(demo_run):
    report, _, out = demo_run
    for path in (report.figure, report.html, report.concept, out / "stages.png"):
        assert path.exists() and path.stat().st_size > 0, path
    page = report.html.read_text()
    for task in TASKS:
        assert task.name in page
        assert len(report.readings[task.name]) == 2
    assert "0: *" in page  # stage lists are written out
    assert set(report.readings["reconstruction"][0]) == {"position", "shape", "colour", "texture", "background"}
    # every row is judged from its readings; a row that does not show its claim is marked in red, not presented
    assert set(report.shown) == {t.name for t in TASKS}
    for task in TASKS:
        claim = task.claim(REFERENCE.attributes())
        assert report.shown[task.name] == sum(_shows(r, claim) for r in report.readings[task.name])
        marked = f"<h2 class='fail'>{task.name}</h2>" in page
        assert marked == (task.name in report.failed_rows()) == (report.shown[task.name] < 2)
    assert page.count("This row is not a result") == len(report.failed_rows())
    assert "guidance per row" in page
    # the layout row has its own inversion, colour-free in the early stages, and puts '*' alone in them
    from prospect import Concept
    layout = TASK_BY_NAME["layout-aware"]
    assert [t.name for t in TASKS if t.hue_jitter_from is not None] == ["layout-aware"]
    assert layout.prospect_words == ["a dotted green shape"] * 8 + ["*"] * 2
    own = Concept.load(out / "concept-layout-aware.safetensors")
    assert not torch.equal(own.embeddings, Concept.load(report.concept).embeddings)
    assert f"--hue-jitter-from {layout.hue_jitter_from}" in page
    # the img2img row has its own inversion too, colour-free in the late stages; the other rows share the first
    edit = TASK_BY_NAME["img2img edit"]
    assert [t.name for t in TASKS if t.hue_jitter_below is not None] == ["img2img edit"]
    own_edit = Concept.load(out / "concept-img2img-edit.safetensors")
    assert not torch.equal(own_edit.embeddings, Concept.load(report.concept).embeddings)
    assert not torch.equal(own_edit.embeddings, own.embeddings)
    assert f"--hue-jitter-below {edit.hue_jitter_below}" in page
    assert sorted(p.name for p in out.glob("concept*.safetensors")) == [
        "concept-img2img-edit.safetensors", "concept-layout-aware.safetensors", "concept.safetensors"]
    for task in TASKS:  # each row states the CFG scale it ran at (chosen with its stages on the pilot)
        assert f"{html.escape(task.description)} (CFG {task.guidance_scale:g})" in page


def test_each_row_runs_at_its_own_guidance_scale_unless_the_config_sets_one():
    from prospect.toyworld import demo

    calls = []

    class Recorder:
        def __call__(self, prompt, **kwargs):
            calls.append(kwargs["guidance_scale"])
            return type("Out", (), {"images": []})()

    for task in TASKS:
        demo._run_task(Recorder(), task, DemoConfig())
    assert calls == [t.guidance_scale for t in TASKS]
    assert {TASK_BY_NAME["material-aware"].guidance_scale, TASK_BY_NAME["colour-aware"].guidance_scale} == {3.0, 5.0}
    calls.clear()
    demo._run_task(Recorder(), TASK_BY_NAME["material-aware"], DemoConfig(guidance_scale=7.5))
    assert calls == [7.5]


def test_a_row_shows_its_claim_only_with_every_claimed_attribute():
    ref = REFERENCE.attributes()
    material = TASK_BY_NAME["material-aware"]
    assert material.claim(ref) == {"texture": ref["texture"], **material.from_text}
    right = world.Scene(**{**ref, **material.from_text})
    assert _shows(read(world.render_pil(right)).as_dict(), material.claim(ref))
    assert not _shows(read(world.render_pil(right.with_(texture="plain"))).as_dict(), material.claim(ref))
    assert not _shows(read(world.render_pil(REFERENCE)).as_dict(), material.claim(ref))  # a copy of the reference


def test_demo_command_prints_where_the_files_are(demo_run):
    report, out, folder = demo_run
    assert f"report: {report.html}" in out and (folder / "demo.png").exists()
    for task in TASKS:  # each row's count, and whether it is shown as a result
        mark = "NOT SHOWN" if task.name in report.failed_rows() else "ok"
        line = f"{task.name}: {report.shown[task.name]} of 2 images show what the row claims ({mark})"
        assert re.search(rf"^{re.escape(line)}$", out, re.M), out


@pytest.mark.slow
def test_demo_command_at_its_own_budget(tmp_path, capsys):
    """The demo end to end with every default but the inversion steps (about 2 min on 2 cores)."""
    assert main(["demo", "--out", str(tmp_path / "d"), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "report.html" in out and (tmp_path / "d" / "demo.png").exists()
    assert out.count("of 4 images show what the row claims") == len(TASKS)
