"""Atomic, pickle-free training checkpoints: nested dicts of tensors and plain values.

Tensors go into a safetensors file under flattened keys; everything else (ints, floats, str,
lists, None) goes into its JSON metadata. Files are written to a temporary name in the same
folder and renamed, so a kill at any moment leaves the last good checkpoint intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

_SEP = "/"
_TENSOR = "__tensor__"


def _split(tree: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Move tensors out of ``tree`` into ``tensors``, leaving references behind."""
    if isinstance(tree, torch.Tensor):
        tensors[prefix] = tree.detach().cpu().clone().contiguous()  # safetensors refuses shared storage
        return {_TENSOR: prefix}
    if isinstance(tree, dict):
        return {"__dict__": [[_key(k), _split(v, f"{prefix}{_SEP}{k}", tensors)] for k, v in tree.items()]}
    if isinstance(tree, (list, tuple)):
        return [_split(v, f"{prefix}{_SEP}{i}", tensors) for i, v in enumerate(tree)]
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TypeError(f"cannot checkpoint a value of type {type(tree).__name__}")


def _key(k: Any) -> list:
    return ["int", k] if isinstance(k, int) else ["str", str(k)]


def _join(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict) and _TENSOR in tree:
        return tensors[tree[_TENSOR]]
    if isinstance(tree, dict):
        return {(int(k) if kind == "int" else k): _join(v, tensors) for (kind, k), v in tree["__dict__"]}
    if isinstance(tree, list):
        return [_join(v, tensors) for v in tree]
    return tree


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``; never leaves a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write a nested state (tensors + plain values) atomically to one safetensors file."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "", tensors)
    meta = {"prospect_checkpoint": "1", "tree": json.dumps(skeleton)}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (never unpickles)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable checkpoint ({err})") from err
    if meta.get("prospect_checkpoint") != "1":
        raise ValueError(f"{path}: not a ProSpect checkpoint")
    return _join(json.loads(meta["tree"]), tensors)
