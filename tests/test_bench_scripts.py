"""The benchmark scripts' --quick mode on a tiny model: the tables are complete and the ratios finite.

No timing is asserted (timings belong to the benchmarks, on a quiet machine).
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture()
def bench(monkeypatch):
    """Import a script of bench/ as the scripts import each other (bench/ on the path)."""
    import diffusers
    import transformers

    monkeypatch.syspath_prepend(str(BENCH))
    levels = diffusers.utils.logging.get_verbosity(), transformers.logging.get_verbosity()
    yield importlib.import_module
    diffusers.utils.logging.set_verbosity(levels[0])  # the scripts quieten the libraries' logs
    transformers.logging.set_verbosity(levels[1])
    diffusers.utils.logging.enable_progress_bar()
    transformers.logging.enable_progress_bar()


def _row(out: str, label: str) -> list[str]:
    """The cells after the label of the table row that starts with ``label``."""
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no row {label!r} in:\n{out}")


def _number(cell: str) -> float:
    return float(cell.split()[0].rstrip("x%").lstrip("+"))


def test_generation_quick_prints_counts_and_a_finite_ratio(bench, tiny_model_dir, capsys):
    bench("generation").main(["--quick", "--model", str(tiny_model_dir)])
    out = capsys.readouterr().out
    assert out.startswith("machine: CPU ") and "torch threads" in out
    assert _row(out, "text-encoder calls per call") == ["2", "1", "1"]  # stock: prompt, negative; ours: one batch
    stock_rows, prospect_rows, one_rows = map(int, _row(out, "text-encoder sequences per call"))
    assert stock_rows == 2 and 3 <= prospect_rows <= 11 and one_rows == 2  # stages the 8 steps reach, + negative
    assert _row(out, "UNet calls per call") == ["8", "8", "8"]
    assert all(_number(c) > 0 for c in _row(out, "UNet wall time, s (median)"))
    for label in ("ratio to stock, wall (medians)", "ratio to stock, CPU time (medians)",
                  "paired wall ratio: median [min-max]", "paired wall ratio without text encoding"):
        cells = _row(out, label)
        assert cells[0] == "" and len(cells) == 3, label
        assert all(math.isfinite(_number(c)) and _number(c) > 0 for c in cells[1:]), label


def test_inversion_quick_prints_ratio_memory_and_levers(bench, tiny_model_dir, capsys):
    bench("inversion").main(["--quick", "--model", str(tiny_model_dir)])
    out = capsys.readouterr().out
    for label in ("ratio invert/irreducible, wall (medians)", "ratio invert/irreducible, CPU time (medians)"):
        ratio = _number(_row(out, label)[0])
        assert math.isfinite(ratio) and ratio > 0, label
    memory = _row(out, "peak memory above resting, MiB: median [min-max]")
    assert len(memory) == 2 and all(math.isfinite(_number(c)) for c in memory)
    assert _number(_row(out, "model FLOPs per step (counted), GFLOP")[-1]) > 0
    assert "UNet attention processors: AttnProcessor2_0" in out
    for lever in ("classic attention (AttnProcessor, no SDPA)", "channels_last UNet",
                  "weight gradients computed (not frozen)"):
        assert math.isfinite(_number(_row(out, lever)[-1])), lever
    assert _row(out, "torch.compile(unet)")[0].startswith("not measured")


@pytest.fixture()
def tiny_sdxl_dir(tiny_sdxl, tmp_path):
    tiny_sdxl.save_pretrained(tmp_path / "sdxl")
    return tmp_path / "sdxl"


@pytest.mark.slow
def test_generation_and_inversion_benchmarks_run_on_sdxl(bench, tiny_sdxl_dir, capsys):
    bench("generation").main(["--quick", "--model", str(tiny_sdxl_dir)])
    out = capsys.readouterr().out
    stock_calls, prospect_calls, one_calls = map(int, _row(out, "text-encoder calls per call"))
    assert stock_calls == 2 and prospect_calls == one_calls == 2  # each of the two encoders once per call
    assert _row(out, "UNet calls per call") == ["8", "8", "8"]
    assert all(math.isfinite(_number(c)) for c in _row(out, "ratio to stock, wall (medians)")[1:])
    bench("inversion").main(["--quick", "--model", str(tiny_sdxl_dir), "--no-levers"])
    out = capsys.readouterr().out
    assert math.isfinite(_number(_row(out, "ratio invert/irreducible, wall (medians)")[0]))
    assert _number(_row(out, "model FLOPs per step (counted), GFLOP")[-1]) > 0


def test_sdxl_is_a_model_the_benchmarks_know_but_not_a_default(bench):
    common = bench("common")
    args = type("Args", (), {"model": None, "quick": False, "size": None, "batch": None, "steps": None})()
    names = [s.model for s in common.settings(args, bench("generation").PRESETS, bench("generation").QUICK)]
    assert names == ["toy", "sd15"] and "sdxl" in bench("inversion").PRESETS


@pytest.mark.slow
def test_reconstruction_pilot_prints_a_row_per_setting(bench, capsys):
    bench("reconstruction_pilot").main(["--setting", "snr_gamma=0", "--setting", "snr_gamma=5,lr=0.01",
                                        "--references", "1", "--images", "2", "--steps", "2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| snr_gamma")]
    assert len(rows) == 2 and all(len(r.split("|")) == 10 for r in rows)
    assert all(0 <= float(cell) <= 1 for r in rows for cell in r.split("|")[2:8])
