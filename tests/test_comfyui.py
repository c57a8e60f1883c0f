"""The ComfyUI export: each stage's prompt gated to exactly its timesteps, as ComfyUI's sampler gates them."""

from __future__ import annotations

import json
import math

import pytest
import safetensors.torch
import torch

from prospect.cli import main
from prospect.comfyui import timestep_range, workflow_api
from prospect.concept import Concept
from prospect.stages import stage_of


def _active(start: float, end: float, t: int, num_train_timesteps: int) -> bool:
    """ComfyUI keeps a conditioning where percent_to_sigma(end) <= sigma <= percent_to_sigma(start), with
    percent_to_sigma(p) = sigma((T-1)(1-p)), p <= 0 meaning no upper limit and p >= 1 no lower one; sigma
    grows with t, so in timesteps: (T-1)(1-end) <= t <= (T-1)(1-start)."""
    top = num_train_timesteps - 1
    upper = math.inf if start <= 0 else top * (1 - start)
    lower = -math.inf if end >= 1 else top * (1 - end)
    return lower <= t <= upper


@pytest.mark.parametrize("num_stages, num_train_timesteps", [(10, 1000), (3, 1000), (7, 1000), (1, 1000), (10, 500), (4, 999), (6, 77)])
def test_every_timestep_is_gated_to_exactly_its_stage(num_stages, num_train_timesteps):
    ranges = [timestep_range(k, num_stages, num_train_timesteps) for k in range(num_stages)]
    for start, end in ranges:  # what the widgets take: [0, 1], the 0.001 step
        assert 0 <= start < end <= 1 and round(start, 3) == start and round(end, 3) == end
    for t in range(num_train_timesteps):
        active = [k for k, (start, end) in enumerate(ranges) if _active(start, end, t, num_train_timesteps)]
        assert active == [stage_of(t, num_stages, num_train_timesteps)], t


def test_more_timesteps_than_the_widget_step_separates_is_refused():
    with pytest.raises(ValueError, match="only up to T = 1000"):
        timestep_range(0, 4, 1001)


def test_the_ten_stage_ranges_are_the_issue_formula():
    """For N = 10, T = 1000: start = 1 - (k+1)/10, end = 1 - k/10 (the ends land on the same 0.001 grid)."""
    assert [timestep_range(k) for k in range(10)] == [(round(1 - (k + 1) / 10, 3), round(1 - k / 10, 3)) for k in range(10)]


def test_export_writes_embeddings_and_a_workflow_that_gates_every_stage(tmp_path, capsys):
    concept = tmp_path / "teddy.safetensors"
    c = Concept(embeddings=torch.randn(10, 3, 32), initializer="cat")
    c.save(concept)
    assert main(["export", str(concept), "--format", "comfyui", "--out", str(tmp_path / "ComfyUI")]) == 0
    out = capsys.readouterr().out
    embeddings = tmp_path / "ComfyUI" / "models" / "embeddings"
    for k in range(10):
        data = safetensors.torch.load_file(embeddings / f"teddy-s{k}.safetensors")
        assert list(data) == ["emb_params"] and torch.equal(data["emb_params"], c.stage_vectors(k))
    workflow = json.loads((tmp_path / "ComfyUI" / "teddy-workflow_api.json").read_text())
    assert "teddy-workflow_api.json" in out
    gates = {n["inputs"]["conditioning"][0]: n["inputs"] for n in workflow.values()
             if n["class_type"] == "ConditioningSetTimestepRange"}
    texts = {i: n["inputs"]["text"] for i, n in workflow.items() if n["class_type"] == "CLIPTextEncode"}
    by_stage = {int(texts[src].rsplit("-s", 1)[1]): (g["start"], g["end"]) for src, g in gates.items()}
    assert by_stage == {k: timestep_range(k) for k in range(10)}
    sampler = next(n for n in workflow.values() if n["class_type"] == "KSampler")["inputs"]

    def sources(node_id):  # the gates a conditioning combines
        node = workflow[node_id]
        if node["class_type"] == "ConditioningSetTimestepRange":
            return {node_id}
        return sources(node["inputs"]["conditioning_1"][0]) | sources(node["inputs"]["conditioning_2"][0])

    assert sources(sampler["positive"][0]) == {i for i, n in workflow.items() if n["class_type"] == "ConditioningSetTimestepRange"}
    assert workflow[sampler["negative"][0]]["class_type"] == "CLIPTextEncode"


def test_workflow_for_one_stage_has_no_combine():
    nodes = workflow_api(["x-s0"], [timestep_range(0, 1)])
    assert [n["class_type"] for n in nodes.values()].count("ConditioningCombine") == 0
    assert timestep_range(0, 1) == (0.0, 1.0)


def _prompt_from_ui(ui: dict) -> dict:
    """What ComfyUI's frontend sends for a loaded UI workflow (its graphToPrompt): widget values by the node's
    widget names, linked inputs as [origin id, origin slot]."""
    from prospect.comfyui import FRONTEND_ONLY, NODES

    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        inputs_spec, widgets, _ = NODES[node["type"]]
        inputs = {w: v for w, v in zip(widgets, node["widgets_values"]) if w not in FRONTEND_ONLY}
        for slot in node["inputs"]:
            _, origin, origin_slot, target, _, kind = links[slot["link"]]
            assert target == node["id"] and kind == slot["type"]
            inputs[slot["name"]] = [str(origin), origin_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


@pytest.mark.parametrize("num_stages", [10, 3, 1])
def test_the_ui_workflow_is_the_api_workflow_as_comfyui_loads_it(tmp_path, num_stages):
    from prospect.comfyui import export_comfyui

    concept = Concept(placeholder="<x>", embeddings=torch.randn(num_stages, 2, 32))
    export_comfyui(concept, tmp_path, name="x")
    api = json.loads((tmp_path / "x-workflow_api.json").read_text())
    ui = json.loads((tmp_path / "x-workflow.json").read_text())
    assert _prompt_from_ui(ui) == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    outputs = {(n["id"], o["slot_index"]): (o["type"], o["links"]) for n in ui["nodes"] for o in n["outputs"]}
    for link_id, origin, slot, target, target_slot, kind in ui["links"]:  # both ends know the link, types agree
        assert outputs[(origin, slot)][0] == kind and link_id in outputs[(origin, slot)][1]
        target_node = next(n for n in ui["nodes"] if n["id"] == target)
        assert target_node["inputs"][target_slot]["link"] == link_id
    assert ui["last_link_id"] == len(ui["links"]) and ui["last_node_id"] == max(n["id"] for n in ui["nodes"])
    assert len({tuple(n["pos"]) for n in ui["nodes"]}) == len(ui["nodes"])  # no two nodes on top of each other
    sampler = next(n for n in ui["nodes"] if n["type"] == "KSampler")
    assert sampler["widgets_values"][:2] == [0, "fixed"]
