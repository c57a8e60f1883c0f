"""`prospect demo` end to end on the embedded model, on a reduced budget."""

from __future__ import annotations

from prospect.cli import main
from prospect.demo import TASKS, DemoConfig, run_demo


def test_demo_writes_figure_report_and_concept(tmp_path):
    cfg = DemoConfig(out=tmp_path / "demo", inversion_steps=4, samples=2, num_inference_steps=4)
    report = run_demo(cfg)
    for path in (report.figure, report.html, report.concept, tmp_path / "demo" / "stages.png"):
        assert path.exists() and path.stat().st_size > 0, path
    page = report.html.read_text()
    for task in TASKS:
        assert task.name in page
        assert len(report.readings[task.name]) == 2
    assert "0: *" in page  # stage lists are written out
    assert set(report.readings["reconstruction"][0]) == {"position", "shape", "colour", "texture", "background"}


def test_demo_command_prints_where_the_files_are(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "report.html" in out and (tmp_path / "d" / "demo.png").exists()
