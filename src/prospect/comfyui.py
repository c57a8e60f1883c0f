"""Export a concept to ComfyUI: per-stage embeddings where ComfyUI looks for them, and a workflow that
gates each stage's prompt to that stage's timesteps.

ComfyUI's ``ConditioningSetTimestepRange(start, end)`` keeps a conditioning for the sigmas between
``percent_to_sigma(end)`` and ``percent_to_sigma(start)`` (both ends included), with
``percent_to_sigma(p) = sigma(999 * (1 - p))`` (``p <= 0``: no upper limit; ``p >= 1``: no lower one),
so in timesteps a range is ``(T-1)(1-end) <= t <= (T-1)(1-start)``. Stage k is the integer t in
[lo, hi) (:func:`prospect.stages.stage_bounds`); the range's ends are put half way between integers,
at ``lo - 0.5`` and ``hi - 0.5``, and rounded to ComfyUI's 0.001 widget step, which moves them by
less than half a timestep while T <= 1000: every integer t falls in exactly the range of its stage,
for any N (and any T up to 1000, every Stable Diffusion model's).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import safetensors.torch

from .concept import Concept, _atomic_write
from .exports import _file_stem
from .stages import stage_bounds

STEP = 0.001  # ComfyUI's widget step for start/end


def timestep_range(stage: int, num_stages: int = 10, num_train_timesteps: int = 1000) -> tuple[float, float]:
    """(start, end) of ``ConditioningSetTimestepRange`` for one stage (start < end; 0 = generation begins)."""
    lo, hi = stage_bounds(stage, num_stages, num_train_timesteps)
    top = num_train_timesteps - 1  # ComfyUI's 999 for T = 1000
    if top * STEP >= 1:
        raise ValueError(f"ComfyUI's {STEP} step separates timesteps only up to T = 1000; this concept has T = "
                         f"{num_train_timesteps}")

    def percent(t: float) -> float:
        return min(1.0, max(0.0, round((1 - t / top) / STEP) * STEP))

    return round(percent(hi - 0.5), 3), round(percent(lo - 0.5), 3)


def workflow_api(names: list[str], ranges: list[tuple[float, float]], checkpoint: str = "model.safetensors",
                 steps: int = 20, cfg: float = 7.0, seed: int = 0, size: int = 512, negative: str = "") -> dict:
    """A ComfyUI API-format workflow: one CLIPTextEncode per stage, gated to its range, combined, sampled."""
    nodes: dict[str, dict] = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
    }
    combined = None
    for k, (name, (start, end)) in enumerate(zip(names, ranges)):
        text_id, gate_id = f"{10 + 2 * k}", f"{11 + 2 * k}"
        nodes[text_id] = {"class_type": "CLIPTextEncode", "inputs": {"text": f"embedding:{name}", "clip": ["1", 1]},
                          "_meta": {"title": f"stage {k} prompt"}}
        nodes[gate_id] = {"class_type": "ConditioningSetTimestepRange",
                          "inputs": {"conditioning": [text_id, 0], "start": start, "end": end},
                          "_meta": {"title": f"stage {k}: {start:.3f}-{end:.3f}"}}
        if combined is None:
            combined = gate_id
        else:
            combine_id = f"{100 + k}"
            nodes[combine_id] = {"class_type": "ConditioningCombine",
                                 "inputs": {"conditioning_1": [combined, 0], "conditioning_2": [gate_id, 0]}}
            combined = combine_id
    nodes["4"] = {"class_type": "KSampler", "inputs": {
        "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
        "model": ["1", 0], "positive": [combined, 0], "negative": ["2", 0], "latent_image": ["3", 0]}}
    nodes["5"] = {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}}
    nodes["6"] = {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "prospect"}}
    return nodes


# The nodes the workflow uses, as ComfyUI defines them (nodes.py INPUT_TYPES / RETURN_TYPES): linked inputs in slot
# order, widgets in order (the frontend adds KSampler's "control_after_generate" after its seed), outputs.
NODES = {
    "CheckpointLoaderSimple": ([], ["ckpt_name"], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "CLIPTextEncode": ([("clip", "CLIP")], ["text"], [("CONDITIONING", "CONDITIONING")]),
    "ConditioningSetTimestepRange": ([("conditioning", "CONDITIONING")], ["start", "end"],
                                     [("CONDITIONING", "CONDITIONING")]),
    "ConditioningCombine": ([("conditioning_1", "CONDITIONING"), ("conditioning_2", "CONDITIONING")], [],
                            [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": ([], ["width", "height", "batch_size"], [("LATENT", "LATENT")]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")],
                 ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
                 [("LATENT", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE")], ["filename_prefix"], []),
}
FRONTEND_ONLY = {"control_after_generate": "fixed"}  # widgets the API format does not carry


def workflow_ui(api: dict) -> dict:
    """The same graph in ComfyUI's UI (litegraph) format, the file its menu's Load opens: nodes with their
    widgets, slots and positions (a column per depth), and the links between them."""
    depth: dict[str, int] = {}

    def level(node_id: str) -> int:
        if node_id not in depth:
            sources = [v[0] for v in api[node_id]["inputs"].values() if isinstance(v, list)]
            depth[node_id] = 1 + max((level(s) for s in sources), default=-1)
        return depth[node_id]

    order = sorted(api, key=lambda n: (level(n), int(n)))
    rows: dict[int, int] = {}
    nodes, links = {}, []
    for position, node_id in enumerate(order):
        spec = api[node_id]
        inputs, widgets, outputs = NODES[spec["class_type"]]
        column = level(node_id)
        row = rows[column] = rows.get(column, -1) + 1
        node = {"id": int(node_id), "type": spec["class_type"], "pos": [40 + 360 * column, 40 + 200 * row],
                "size": [320, 160], "flags": {}, "order": position, "mode": 0,
                "inputs": [{"name": name, "type": kind, "link": None} for name, kind in inputs],
                "outputs": [{"name": name, "type": kind, "links": [], "slot_index": k}
                            for k, (name, kind) in enumerate(outputs)],
                "properties": {"Node name for S&R": spec["class_type"]},
                "widgets_values": [FRONTEND_ONLY[w] if w in FRONTEND_ONLY else spec["inputs"][w] for w in widgets]}
        if "_meta" in spec:
            node["title"] = spec["_meta"]["title"]
        nodes[node_id] = node
    for node_id in order:
        for slot, (name, kind) in enumerate(NODES[api[node_id]["class_type"]][0]):
            source, source_slot = api[node_id]["inputs"][name]
            link = len(links) + 1
            links.append([link, int(source), source_slot, int(node_id), slot, kind])
            nodes[node_id]["inputs"][slot]["link"] = link
            nodes[source]["outputs"][source_slot]["links"].append(link)
    return {"last_node_id": max(int(n) for n in api), "last_link_id": len(links),
            "nodes": [nodes[n] for n in order], "links": links, "groups": [], "config": {}, "extra": {},
            "version": 0.4}


def export_comfyui(concept: Concept, folder: str | os.PathLike, name: str | None = None) -> tuple[list[Path], Path]:
    """Write ``models/embeddings/<name>-s<k>.safetensors`` ({"emb_params": [V, dim]}, SDXL {"clip_l", "clip_g"}:
    what ComfyUI's embedding loader reads) under ``folder`` (a ComfyUI folder, or one to copy into it), and
    ``<name>-workflow_api.json`` (API format) and ``<name>-workflow.json`` (the UI format that ComfyUI's Load
    opens). Returns the embedding files and the API workflow."""
    stem, folder = _file_stem(concept, name), Path(folder)
    names = [f"{stem}-s{k}" for k in range(concept.num_stages)]
    ranges = [timestep_range(k, concept.num_stages, concept.num_train_timesteps) for k in range(concept.num_stages)]
    embeddings = folder / "models" / "embeddings"
    embeddings.mkdir(parents=True, exist_ok=True)
    paths = [embeddings / f"{n}.safetensors" for n in names]
    for k, path in enumerate(paths):
        _atomic_write(path, safetensors.torch.save(concept.stage_file(k)))
    api = workflow_api(names, ranges, size=1024 if concept.family == "sdxl" else 512)  # each family's native size
    workflow = folder / f"{stem}-workflow_api.json"
    _atomic_write(workflow, (json.dumps(api, indent=1) + "\n").encode())
    _atomic_write(folder / f"{stem}-workflow.json", (json.dumps(workflow_ui(api), indent=1) + "\n").encode())
    return paths, workflow
