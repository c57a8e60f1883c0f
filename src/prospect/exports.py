"""Exporting a concept into the files other tools load: diffusers' ``load_textual_inversion`` and A1111/Forge
embeddings (ComfyUI: :mod:`prospect.comfyui`).

Each stage becomes one textual-inversion file; a JSON note beside them says which stage covers which
training timesteps. SDXL files hold both encoders' rows as ``{"clip_l": [V, 768], "clip_g": [V, 1280]}``,
the layout A1111, Forge and ComfyUI read and diffusers documents for ``load_textual_inversion``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import safetensors.torch

from .concept import Concept, ConceptError, _atomic_write
from .stages import stage_bounds

_STAGE_ORDER = (
    "stage 0 = smallest timesteps (last denoising steps), stage N-1 = largest (first steps); "
    "timesteps are [lo, hi)"
)
_A1111_MAX_STEPS = 150  # the A1111 UI's step limit; fraction strings are exact up to it
_DIFFUSERS_USAGE = {
    "sd": "pipe.load_textual_inversion(file) for each file, then use the token of the current stage",
    "sdxl": ("for each file: state = safetensors.torch.load_file(file); pipe.load_textual_inversion(state['clip_l'], "
             "token=name, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer); "
             "pipe.load_textual_inversion(state['clip_g'], token=name, text_encoder=pipe.text_encoder_2, "
             "tokenizer=pipe.tokenizer_2), with name = the stage's token (its \"name\" below); then use the token "
             "of the current stage"),
}


def _file_stem(concept: Concept, name: str | None) -> str:
    """A filesystem- and A1111-prompt-safe name: given name, else the placeholder's word characters."""
    stem = name if name is not None else re.sub(r"[^a-z0-9_-]+", "", concept.placeholder.lower()) or "prospect"
    if not re.fullmatch(r"[A-Za-z0-9_-]+", stem):
        raise ConceptError(f"export name must be letters, digits, '_' or '-', got {stem!r}")
    return stem


def _write_note(folder: Path, filename: str, note: dict) -> None:
    """Write the JSON note that explains stage order next to exported files."""
    _atomic_write(folder / filename, (json.dumps(note, indent=2, ensure_ascii=False) + "\n").encode())


def _stage_notes(concept: Concept, names: list[str]) -> list[dict]:
    """Per-stage entries with the half-open training-timestep range [lo, hi) each stage covers."""
    n, t = concept.num_stages, concept.num_train_timesteps
    return [{"stage": k, "name": names[k], "timesteps": list(stage_bounds(k, n, t))} for k in range(n)]


def export_diffusers(concept: Concept, folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Write ``<name>-s<k>.safetensors`` = {token: [V, dim]} per stage, for ``load_textual_inversion``
    (diffusers names a multi-vector token's extra vectors ``<token>_1`` ... and expands the prompt itself);
    SDXL: {"clip_l": [V, dim], "clip_g": [V, dim_2]}, loaded once into each encoder (the note says how).

    With ``name`` the tokens are ``<name:s<k>>``, so two exported concepts load into one pipeline side by
    side; without it they are the concept's own (``<*:s0>`` ...) and the files ``learned_embeds-s<k>``.
    """
    folder = Path(folder)
    stem = _file_stem(concept, name) if name is not None else None
    tokens = [f"<{stem}:s{k}>" if stem else concept.token(k) for k in range(concept.num_stages)]
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem or 'learned_embeds'}-s{k}.safetensors" for k in range(concept.num_stages)]
    for k, path in enumerate(paths):
        tensors = {tokens[k]: concept.stage_vectors(k).clone()} if concept.family == "sd" else concept.stage_file(k)
        _atomic_write(path, safetensors.torch.save(tensors))
    _write_note(folder, f"{stem}-prospect_diffusers.json" if stem else "prospect_diffusers.json", {
        "format": "prospect-diffusers-export", "placeholder": concept.placeholder, "base_model": concept.base_model,
        "family": concept.family, "stage_order": _STAGE_ORDER, "usage": _DIFFUSERS_USAGE[concept.family],
        "stages": [dict(e, file=p.name) for e, p in zip(_stage_notes(concept, tokens), paths)],  # name = the token
    })
    return paths


def a1111_schedule(names: list[str], num_inference_steps: int | None = None) -> str:
    """Nested A1111 prompt editing ``[[a:b:w1]:c:w2]`` running names[-1] first and names[0] last.

    With ``num_inference_steps`` S, stage k runs the sampler calls [floor((N-1-k) S / N), floor((N-k) S / N))
    (0-based), counted the way A1111's sampler counts them: its parser keeps ``from`` for the 1-based steps
    <= ``when``, and call c (from 0) takes the first scheduled text whose end step is >= c, so ``when`` is
    the last call of the earlier part, one less than the paper's step number. One limit of A1111: calls 0
    and 1 always share a text, so a first stage of a single call (2 <= S < 2N) also runs call 1.
    Without S the switch points are fractions of A1111's step count, which A1111 floors: each switch
    lands one call late (the paper split); give the step count for an exact schedule.
    """
    order = names[::-1]  # generation runs from the largest timesteps (last stage) to stage 0
    n, prompt = len(order), order[0]
    if num_inference_steps is not None and (isinstance(num_inference_steps, bool) or num_inference_steps < 1):
        raise ConceptError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    digits = len(str(_A1111_MAX_STEPS * n))
    for i in range(1, n):
        if num_inference_steps is not None:
            calls = i * num_inference_steps // n  # calls of the earlier part: 0 .. calls - 1
            if calls == 0:  # the earlier stages get no call at this step count
                prompt = order[i]
                continue
            when = str(max(1, calls - 1))
        else:
            # A1111 floors float(when) * steps; rounding up by < 1/(150 n) survives float error and
            # still lands on floor(i * steps / n) for every step count up to 150.
            when = f"{(i * 10**digits // n + 1) / 10**digits:.{digits}f}"
        prompt = f"[{prompt}:{order[i]}:{when}]"
    return prompt


def export_a1111(
    concept: Concept, folder: str | os.PathLike, num_inference_steps: int | None = None, name: str | None = None
) -> tuple[list[Path], str]:
    """Write A1111 embeddings ``<name>-s<k>.safetensors`` = {"emb_params": [V, dim]} (SDXL: {"clip_l", "clip_g"})
    and return a scheduling prompt.

    A1111 names an embedding after its file stem. The returned prompt uses nested prompt editing
    ``[from:to:when]`` so stage N-1 is active for the first 1/N of the steps, ..., stage 0 last;
    put it where the placeholder would go. Without ``num_inference_steps`` the switch points are
    fractions of the step count, otherwise exact step numbers for that count.
    """
    stem, folder = _file_stem(concept, name), Path(folder)
    names = [f"{stem}-s{k}" for k in range(concept.num_stages)]
    prompt = a1111_schedule(names, num_inference_steps)  # validates the step count before anything is written
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{n}.safetensors" for n in names]
    for k, path in enumerate(paths):
        _atomic_write(path, safetensors.torch.save(concept.stage_file(k)))
    _write_note(folder, f"{stem}-prospect_a1111.json", {
        "format": "prospect-a1111-export", "placeholder": concept.placeholder, "base_model": concept.base_model,
        "family": concept.family,
        "stage_order": _STAGE_ORDER,
        "prompt": prompt, "num_inference_steps": num_inference_steps, "stages": _stage_notes(concept, names),
    })
    return paths, prompt
