"""Real faults, not mocks: a tiny tmpfs that fills up, and a read-only one (needs root and mount; skipped otherwise).

A mocked ``os.replace`` raises the exception the test expects; the kernel may fail elsewhere (at
``write``, at ``fsync``, at the temp file's creation). Here the file system itself says no, and each
command must still end with one line, keep the last good checkpoint, and leave no temp file behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from conftest import write_reference_images
from prospect.checkpoint import load_checkpoint
from prospect.cli import main
from prospect.concept import Concept


def _can_mount() -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    import tempfile

    probe = Path(tempfile.mkdtemp(prefix="prospect-tmpfs-probe-"))
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", str(probe)], check=True)
        return ok
    finally:
        probe.rmdir()


pytestmark = pytest.mark.skipif(not _can_mount(), reason="needs root and a kernel that lets it mount tmpfs")


@contextmanager
def tmpfs(where: Path, size: int):
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def _fill(fs: Path, leave: int) -> None:
    """Fill ``fs`` until only about ``leave`` bytes are free."""
    free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
    (fs / "filler").write_bytes(b"\0" * max(0, free - leave))


def _error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.split("\n") if line.strip() and not line.lstrip("\r").startswith("inversion:")]
    assert len(err) == 1 and err[0].startswith("prospect: error: "), err
    return err[0]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


TRAIN = ["--steps", "4", "--batch-size", "2", "--checkpoint-every", "1"]


def test_full_disk_during_training_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path, capsys):
    refs = write_reference_images(tmp_path)
    # the size of one checkpoint of this run, measured on the ordinary disk
    probe = tmp_path / "probe"
    probe.mkdir()
    assert main(["train", str(refs), "--out", str(probe / "c.safetensors"), "--model", str(tiny_model_dir), *TRAIN]) == 0
    size = (probe / "c.ckpt.safetensors").stat().st_size
    capsys.readouterr()
    with tmpfs(tmp_path / "fs", 4 * size + (1 << 20)) as fs:
        _fill(fs, size + size // 2)  # room for one checkpoint, not for the next beside it
        code = main(["train", str(refs), "--out", str(fs / "c.safetensors"), "--model", str(tiny_model_dir), *TRAIN])
        line = _error_line(capsys)
        assert code == 2 and "No space left on device" in line and "previous one is kept" in line, line
        kept = load_checkpoint(fs / "c.ckpt.safetensors")  # whole, and the one of step 1
        assert kept["step"] == 1
        assert not (fs / "c.safetensors").exists() and _leftovers(fs) == []


def test_full_disk_during_generation_and_export_is_one_line_and_no_temp_file(tiny_model_dir, tmp_path, capsys):
    concept = tmp_path / "c.safetensors"
    Concept(embeddings=torch.randn(10, 32), initializer="cat").save(concept)
    with tmpfs(tmp_path / "fs", 1 << 20) as fs:
        (fs / "gen").mkdir()
        (fs / "exp").mkdir()
        _fill(fs, 0)
        code = main(["generate", "--model", str(tiny_model_dir), "--steps", "2", "--out", str(fs / "gen")])
        line = _error_line(capsys)
        assert code == 2 and "cannot write" in line and "No space left on device" in line, line
        code = main(["export", str(concept), "--format", "diffusers", "--out", str(fs / "exp")])
        line = _error_line(capsys)
        assert code == 2 and "No space left on device" in line, line
        assert list((fs / "gen").iterdir()) == [] and list((fs / "exp").iterdir()) == [] and _leftovers(fs) == []


@pytest.mark.parametrize("command", ["train", "generate", "export"])
def test_read_only_disk_is_refused_before_any_work(command, tiny_model_dir, tmp_path, capsys, monkeypatch):
    import prospect.cli as cli

    refs = write_reference_images(tmp_path)
    concept = tmp_path / "c.safetensors"
    Concept(embeddings=torch.randn(10, 32), initializer="cat").save(concept)
    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("the model loaded before the output was checked"))
    with tmpfs(tmp_path / "fs", 1 << 20) as fs:
        (fs / "out").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        argv = {"train": ["train", str(refs), "--out", str(fs / "out" / "c.safetensors"), "--model", str(tiny_model_dir)],
                "generate": ["generate", "--model", str(tiny_model_dir), "--out", str(fs / "out" / "new")],
                "export": ["export", str(concept), "--format", "a1111", "--out", str(fs / "out")]}[command]
        assert main(argv) == 2
        line = _error_line(capsys)
        assert "read-only file system" in line and str(fs / "out") in line, line
        assert list((fs / "out").iterdir()) == []
