"""Atomic, pickle-free training checkpoints: nested dicts of tensors and plain values.

Tensors go into a safetensors file under flattened keys; everything else (ints, floats, str,
lists, None) goes into its JSON metadata. Files are written to a temporary name in the same
folder and renamed, so a kill at any moment leaves the last good checkpoint intact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .files import atomic_write_bytes

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


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write a nested state (tensors + plain values) atomically to one safetensors file."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "", tensors)
    meta = {"prospect_checkpoint": "1", "tree": json.dumps(skeleton)}
    # serialised in memory and written by Python: a full or read-only disk is an OSError like any other
    # write's (safetensors' own file writer reports it as a SafetensorError instead)
    atomic_write_bytes(Path(path), save(tensors, metadata=meta))


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
