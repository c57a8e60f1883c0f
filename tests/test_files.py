"""Files ProSpect writes: atomic, readable by others as a plain open() would make them, refused early."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from prospect.cli import main
from prospect.concept import Concept
from prospect.files import atomic_write_bytes, check_output_folder, ensure_folder, new_file_mode


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_write_gives_the_mode_of_a_plain_open(tmp_path, umask_022):
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    ours = atomic_write_bytes(tmp_path / "ours", b"x")
    assert _mode(ours) == _mode(plain) == 0o644 == new_file_mode()
    old = os.umask(0o077)  # a private umask is respected too
    try:
        assert _mode(atomic_write_bytes(tmp_path / "private", b"x")) == 0o600
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "plain", "private"]  # no temp file left


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    target = atomic_write_bytes(tmp_path / "f", b"old")

    def half_then_fail(tmp):
        open(tmp, "wb").write(b"ne")
        raise OSError(28, "No space left on device")

    from prospect.files import atomic_write

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f"]


def test_check_output_folder_refuses_a_file_and_creates_nothing(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="exists and is not a folder"):
        check_output_folder(tmp_path / "file")
    with pytest.raises(OSError, match="is a file, not a folder"):
        check_output_folder(tmp_path / "file" / "sub" / "out")
    assert check_output_folder(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()
    assert ensure_folder(tmp_path / "a" / "b").is_dir()


def test_cli_outputs_have_normal_permissions(tiny_model_dir, tmp_path, umask_022, capsys):
    concept = tmp_path / "c.safetensors"
    Concept(embeddings=torch.randn(10, 32), initializer="cat").save(concept)
    out = tmp_path / "gen"
    assert main(["generate", "--model", str(tiny_model_dir), "--steps", "2", "--out", str(out), "--concept", str(concept)]) == 0
    assert main(["export", str(concept), "--format", "diffusers", "--out", str(tmp_path / "exp")]) == 0
    written = [concept, *out.iterdir(), *(tmp_path / "exp").iterdir()]
    assert len(written) >= 4 and {p.name: _mode(p) for p in written} == {p.name: 0o644 for p in written}


@pytest.mark.parametrize("command", ["generate", "visualize", "export"])
def test_output_folder_that_is_a_file_is_refused_before_any_work(command, tiny_model_dir, tmp_path, capsys, monkeypatch):
    import prospect.cli as cli

    concept = tmp_path / "c.safetensors"
    Concept(embeddings=torch.randn(10, 32), initializer="cat").save(concept)
    taken = tmp_path / "taken"
    taken.write_text("mine")
    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("the model loaded before the output was checked"))
    argv = {"generate": ["generate", "--model", str(tiny_model_dir), "--steps", "2"],
            "visualize": ["visualize", "--model", str(tiny_model_dir), "--concept", str(concept), "--steps", "2"],
            "export": ["export", str(concept), "--format", "a1111"]}[command]
    assert main(argv + ["--out", str(taken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prospect: error: output folder") and "is not a folder" in err[0]
    assert taken.read_text() == "mine"


def test_train_out_that_is_a_folder_is_refused(tiny_model_dir, tmp_path, capsys):
    from conftest import write_reference_images

    refs = write_reference_images(tmp_path)
    (tmp_path / "c.safetensors").mkdir()
    assert main(["train", str(refs), "--out", str(tmp_path / "c.safetensors"), "--model", str(tiny_model_dir),
                 "--steps", "1"]) == 2
    assert "is a folder; give the concept file" in capsys.readouterr().err
    assert list((tmp_path / "c.safetensors").iterdir()) == []
