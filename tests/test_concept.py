"""Concept file format, tokenizer/text-encoder integration and exporters."""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import tempfile

import pytest
import safetensors.torch
import torch

from prospect.concept import Concept, ConceptError, add_concept, init_embeddings, stage_token
from prospect.exports import a1111_schedule, export_a1111, export_diffusers

TINY_DIM = 32  # the text hidden size of conftest's tiny pipeline


def make_concept(num_stages: int = 10, dim: int = TINY_DIM, placeholder: str = "*", seed: int = 0, **kw) -> Concept:
    g = torch.Generator().manual_seed(seed)
    return Concept(placeholder=placeholder, embeddings=torch.randn(num_stages, dim, generator=g), **kw)


def row(pipe, token: str) -> torch.Tensor:
    tid = pipe.tokenizer.convert_tokens_to_ids(token)
    return pipe.text_encoder.get_input_embeddings().weight[tid].detach()


@pytest.fixture()
def no_unpickling(monkeypatch):
    """Fail the test if anything tries to unpickle."""

    def boom(*a, **k):
        raise AssertionError("unpickling was attempted")

    for mod, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(mod, name, boom)


# --- tokens and the dataclass -------------------------------------------------------------------


def test_stage_token_format():
    assert stage_token("*", 3) == "<*:s3>"
    assert stage_token("<teddy>", 0) == "<<teddy>:s0>"
    assert stage_token("Teddy", 1) == "<teddy:s1>"  # CLIP lower-cases prompts
    for bad in ["", "   ", "my teddy", None]:
        with pytest.raises(ConceptError, match="placeholder"):
            stage_token(bad, 0)
    with pytest.raises(ConceptError, match="stage"):
        stage_token("*", -1)


def test_concept_fields_and_validation():
    c = make_concept(num_stages=4, dim=8, placeholder="<teddy>")
    assert (c.num_stages, c.dim, c.format_version) == (4, 8, 1)
    assert c.embeddings.dtype == torch.float32 and c.embeddings.device.type == "cpu"
    assert c.tokens() == [f"<<teddy>:s{k}>" for k in range(4)] and c.token(2) == "<<teddy>:s2>"
    with pytest.raises(ConceptError):
        c.token(4)
    for bad in [torch.zeros(3), torch.zeros(0, 8), torch.zeros(2, 3, 4, 5), torch.zeros(2, 0, 4), torch.zeros(2, 3, dtype=torch.long)]:
        with pytest.raises(ConceptError):
            Concept(embeddings=bad)
    with pytest.raises(ConceptError, match="finite"):
        Concept(embeddings=torch.tensor([[float("nan")]]))
    with pytest.raises(ConceptError, match="placeholder"):
        Concept(placeholder=" ", embeddings=torch.zeros(2, 3))
    half = Concept(embeddings=torch.ones(2, 3, dtype=torch.float16))
    assert half.embeddings.dtype == torch.float32


# --- save / load ----------------------------------------------------------------------------------


def test_save_load_round_trip_with_metadata(tmp_path):
    c = make_concept(placeholder="<teddy>", num_train_timesteps=1000, initializer="teddy bear", base_model="tiny-sd")
    path = c.save(tmp_path / "teddy.safetensors")
    loaded = Concept.load(path)
    assert torch.equal(loaded.embeddings, c.embeddings)
    assert (loaded.placeholder, loaded.num_train_timesteps, loaded.initializer, loaded.base_model) == (
        "<teddy>", 1000, "teddy bear", "tiny-sd")
    with safetensors.safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta == {"format": "prospect-concept", "format_version": "1", "num_stages": "10", "dim": str(TINY_DIM),
                    "num_train_timesteps": "1000", "placeholder": "<teddy>", "initializer": "teddy bear",
                    "base_model": "tiny-sd"}
    assert os.listdir(tmp_path) == ["teddy.safetensors"]


def test_header_length_starting_with_pickle_proto_byte_still_loads(tmp_path):
    # A safetensors header of 128 (+256k) bytes makes the file's first byte 0x80, pickle's PROTO.
    for pad in range(256):
        c = make_concept(num_stages=2, dim=4, initializer="x" * pad)
        data = safetensors.torch.save({"embeddings": c.embeddings}, metadata=c.metadata())
        if data[0] == 0x80:
            break
    path = tmp_path / "c.safetensors"
    path.write_bytes(data)
    assert Concept.load(path).initializer == c.initializer


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = make_concept(seed=1).save(tmp_path / "c.safetensors")
    before = path.read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(ConceptError, match="No space left"):
        make_concept(seed=2).save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.safetensors"]  # no temp file left behind


def test_save_into_read_only_dir_keeps_old_file(tmp_path, monkeypatch):
    path = make_concept(seed=1).save(tmp_path / "c.safetensors")
    before = path.read_bytes()
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # root ignores directory permissions: simulate them

        def denied(*a, **k):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", denied)
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(ConceptError, match=re.escape(f"cannot write {path}: Permission denied")):
            make_concept(seed=2).save(path)
    finally:
        tmp_path.chmod(0o755)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["c.safetensors"]


def test_save_into_missing_dir_names_path(tmp_path):
    target = tmp_path / "nope" / "c.safetensors"
    with pytest.raises(ConceptError, match="nope"):
        make_concept().save(target)
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("kind", ["zip", "legacy", "protocol0"])
def test_pickle_files_refused_without_unpickling(tmp_path, kind, no_unpickling):
    path = tmp_path / "learned_embeds.safetensors"  # the name lies; the content decides
    if kind == "zip":
        torch.save({"*": torch.zeros(TINY_DIM)}, path)
    elif kind == "legacy":
        torch.save({"*": torch.zeros(TINY_DIM)}, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps({"*": [0.0] * 4}, protocol=0))
    with pytest.raises(ConceptError, match="refusing to unpickle"):
        Concept.load(path)
    with pytest.raises(ConceptError, match="refusing to unpickle"):
        Concept.from_textual_inversion(path)


def test_damaged_files_refused(tmp_path):
    good = make_concept().save(tmp_path / "good.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    header = good[8 : 8 + n]
    cases = {
        "empty": b"",
        "garbage": os.urandom(64),
        "truncated_data": good[:-7],
        "truncated_header": good[: 8 + n // 2],
        "bad_json": good[:8] + b"{" + b"x" * (n - 1) + good[8 + n :],
        "offsets_tampered": good[:8] + header.replace(b'"data_offsets":[0,', b'"data_offsets":[4,') + good[8 + n :],
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(ConceptError):
            Concept.load(path)
    with pytest.raises(ConceptError, match="cannot read"):
        Concept.load(tmp_path / "missing.safetensors")


def test_metadata_inconsistencies_refused(tmp_path):
    c = make_concept(num_stages=3, dim=4)

    def write(meta, tensors=None):
        path = tmp_path / "c.safetensors"
        safetensors.torch.save_file(tensors or {"embeddings": c.embeddings}, path, metadata=meta)
        return path

    with pytest.raises(ConceptError, match="not a ProSpect concept"):
        Concept.load(write({"format": "something-else"}))
    with pytest.raises(ConceptError, match="not a ProSpect concept"):
        Concept.load(write(None))
    with pytest.raises(ConceptError, match="does not match metadata"):
        Concept.load(write({**c.metadata(), "num_stages": "4"}))
    with pytest.raises(ConceptError, match="not an integer"):
        Concept.load(write({**c.metadata(), "dim": "four"}))
    with pytest.raises(ConceptError, match="format version 4"):
        Concept.load(write({**c.metadata(), "format_version": "4"}))
    with pytest.raises(ConceptError, match="unknown model family 'flux'"):
        Concept.load(write({**c.metadata(), "family": "flux"}))
    with pytest.raises(ConceptError, match=r"exactly the tensors \['clip_l', 'clip_g'\] \(SDXL"):
        Concept.load(write({**c.metadata(), "family": "sdxl"}))
    with pytest.raises(ConceptError, match="exactly the tensors"):
        Concept.load(write(c.metadata(), {"embeddings": c.embeddings, "extra": torch.zeros(1)}))
    with pytest.raises(ConceptError, match="placeholder"):
        Concept.load(write({**c.metadata(), "placeholder": ""}))


# --- tokenizer / text encoder ---------------------------------------------------------------------


def test_add_concept_to_pipeline(tiny_pipe):
    tok, enc = tiny_pipe.tokenizer, tiny_pipe.text_encoder
    original = enc.get_input_embeddings().weight.detach().clone()
    c = make_concept(placeholder="<teddy>")
    ids = add_concept(tok, enc, c)
    assert len(set(ids)) == 10 and all(i >= 49408 for i in ids)
    weight = enc.get_input_embeddings().weight.detach()
    assert torch.equal(weight[ids], c.embeddings)
    assert torch.equal(weight[: original.shape[0]], original)  # resize kept every existing row
    for k, tid in enumerate(ids):
        assert tok(f"a {c.token(k)}").input_ids == [49406, 320, tid, 49407]
    assert tok("a <<TEDDY>:S3>, red").input_ids[2] == ids[3]  # CLIP lower-cases prompts
    assert tok("a <teddy>").input_ids[2] not in ids  # the bare placeholder is not a stage token

    # Adding again reuses the tokens and overwrites the rows.
    c2 = make_concept(placeholder="<teddy>", seed=5)
    n_tokens, n_rows = len(tok), weight.shape[0]
    assert add_concept(tok, enc, c2) == ids
    assert len(tok) == n_tokens and enc.get_input_embeddings().weight.shape[0] == n_rows
    assert torch.equal(enc.get_input_embeddings().weight.detach()[ids], c2.embeddings)

    # The text encoder runs on the new ids, and different stages give different conditioning.
    with torch.no_grad():
        hidden = [enc(torch.tensor([tok(f"a photo of {c.token(k)}").input_ids]))[0] for k in (0, 9)]
    assert hidden[0].shape == (1, 6, TINY_DIM) and not torch.allclose(hidden[0], hidden[1])


def test_two_concepts_in_one_pipeline(tiny_pipe):
    tok, enc = tiny_pipe.tokenizer, tiny_pipe.text_encoder
    a, b = make_concept(placeholder="*", seed=1), make_concept(placeholder="<dog>", num_stages=5, seed=2)
    ids_a, ids_b = add_concept(tok, enc, a), add_concept(tok, enc, b)
    assert not set(ids_a) & set(ids_b)
    weight = enc.get_input_embeddings().weight.detach()
    assert torch.equal(weight[ids_a], a.embeddings) and torch.equal(weight[ids_b], b.embeddings)
    assert tok(f"{a.token(0)} and {b.token(4)}").input_ids[1:4] == [ids_a[0], 537, ids_b[4]]


def test_add_concept_dim_mismatch(tiny_pipe):
    c = make_concept(dim=768, base_model="runwayml/stable-diffusion-v1-5")
    n = len(tiny_pipe.tokenizer)
    with pytest.raises(ConceptError, match=rf"concept dim 768 does not match the model's text embedding dim {TINY_DIM} "
                                          r"\(concept was learned on runwayml/stable-diffusion-v1-5\)"):
        add_concept(tiny_pipe.tokenizer, tiny_pipe.text_encoder, c)
    assert len(tiny_pipe.tokenizer) == n  # nothing was added


def test_init_embeddings(tiny_pipe):
    tok, enc = tiny_pipe.tokenizer, tiny_pipe.text_encoder
    weight = enc.get_input_embeddings().weight.detach()
    [cat] = tok("cat", add_special_tokens=False).input_ids
    rows = init_embeddings(tok, enc, "cat", 4)
    assert rows.shape == (4, TINY_DIM) and rows.dtype == torch.float32
    assert all(torch.equal(r, weight[cat]) for r in rows)

    multi = tok("teddybear", add_special_tokens=False).input_ids
    assert len(multi) > 1
    assert torch.allclose(init_embeddings(tok, enc, "teddybear", 2)[1], weight[multi].mean(0))

    for bad in ["", "   ", "<|endoftext|>"]:
        with pytest.raises(ConceptError, match="initializer"):
            init_embeddings(tok, enc, bad, 4)
    with pytest.raises(ConceptError, match="num_stages"):
        init_embeddings(tok, enc, "cat", 0)


# --- exporters and import -------------------------------------------------------------------------


def test_export_diffusers_loads_with_stock_loader(tiny_pipe, tmp_path):
    c = make_concept(placeholder="<teddy>", num_stages=4)  # each stock load resizes the vocab: keep it short
    paths = export_diffusers(c, tmp_path / "out")
    assert [p.name for p in paths] == [f"learned_embeds-s{k}.safetensors" for k in range(4)]
    for k, path in enumerate(paths):
        tiny_pipe.load_textual_inversion(str(path))
        assert torch.equal(row(tiny_pipe, c.token(k)), c.embeddings[k])
    note = json.loads((tmp_path / "out" / "prospect_diffusers.json").read_text())
    assert note["stages"][0] == {"stage": 0, "name": "<<teddy>:s0>", "timesteps": [0, 250], "file": paths[0].name}
    assert note["stages"][3]["timesteps"] == [750, 1000]
    ids = [tiny_pipe.tokenizer.convert_tokens_to_ids(t) for t in c.tokens()]
    assert tiny_pipe.tokenizer(f"a {c.token(3)}").input_ids[2] == ids[3]


def _parse(text: str, i: int = 0):
    """A minimal parser for A1111 prompt editing ``[from:to:when]`` (nested)."""
    nodes, buf = [], ""
    while i < len(text) and text[i] not in ":]":
        if text[i] == "[":
            nodes.append(buf)
            before, i = _parse(text, i + 1)
            assert text[i] == ":"
            after, i = _parse(text, i + 1)
            assert text[i] == ":"
            end = text.index("]", i)
            nodes.append((before, after, text[i + 1 : end]))
            buf, i = "", end + 1
        else:
            buf, i = buf + text[i], i + 1
    return nodes + [buf], i


def _at_step(nodes, step: int, steps: int) -> str:
    """The prompt A1111 uses at 1-based ``step`` (its rule: floats are fractions, floored)."""
    out = ""
    for node in nodes:
        if isinstance(node, str):
            out += node
            continue
        before, after, when = node
        w = min(steps, int(float(when) * steps) if "." in when else int(when))
        out += _at_step(before if step <= w else after, step, steps)
    return out


def _expected_stage(step: int, steps: int, n: int) -> int:
    """Generation runs stage n-1 for the first 1/n of the steps, ..., stage 0 last."""
    return n - 1 - sum(1 for j in range(1, n) if j * steps // n < step)


def _sampler_texts(prompt: str, steps: int) -> list[str]:
    """The text A1111's sampler conditions each call on (calls numbered from 0), modelled on its code:
    the parser schedules (end step, text) for the 1-based end steps (every integer ``when`` >= 1, clamped to
    ``steps``, and ``steps`` itself), and call c takes the first entry whose end step is >= c."""
    tree, _ = _parse(prompt)
    ends = {steps}

    def collect(nodes):
        for node in nodes:
            if not isinstance(node, str):
                before, after, when = node
                w = min(steps, int(float(when) * steps) if "." in when else int(when))
                if w >= 1:
                    ends.add(w)
                collect(before), collect(after)

    collect(tree)
    schedule = [(end, _at_step(tree, end, steps)) for end in sorted(ends)]
    return [next(text for end, text in schedule if c <= end) for c in range(steps)]


def _intended_call_stages(steps: int, n: int) -> list[int]:
    """Stage k runs the calls [floor((n-1-k) steps / n), floor((n-k) steps / n)), stage n-1 first."""
    return [n - 1 - sum(1 for i in range(1, n) if i * steps // n <= c) for c in range(steps)]


def test_a1111_prompt_switches_stages_at_the_intended_sampler_calls():
    """Modelled on A1111's sampler, which counts calls from 0 (the paper split in 1-based steps ran every
    earlier stage one call too long: for 50 steps stage 9 got 6 calls and stage 0 only 4)."""
    names = [f"c-s{k}" for k in range(10)]
    for steps in range(1, 151):
        got = [int(t.rsplit("s", 1)[1]) for t in _sampler_texts(a1111_schedule(names, steps), steps)]
        want = _intended_call_stages(steps, 10)
        if 2 <= steps < 20:  # A1111 gives calls 0 and 1 one text: a first stage of one call takes call 1 too
            assert got[0] == want[0] and got[1] == want[0] != want[1] and got[2:] == want[2:], steps
        else:
            assert got == want, steps
    paper = a1111_schedule(names)  # fractions: A1111 floors them to the paper split, a call late
    late = [int(t.rsplit("s", 1)[1]) for t in _sampler_texts(paper, 50)]
    assert [late.count(k) for k in range(10)] == [4] + [5] * 8 + [6]


def test_export_a1111_files_and_prompt(tiny_pipe, tmp_path):
    c = make_concept(placeholder="<teddy>")
    paths, prompt = export_a1111(c, tmp_path)
    names = [f"teddy-s{k}" for k in range(10)]
    assert [p.name for p in paths] == [f"{n}.safetensors" for n in names]
    for k, path in enumerate(paths):
        if k not in (0, 5, 9):  # each stock load resizes the vocab: a few stages suffice
            continue
        data = safetensors.torch.load_file(path)
        assert list(data) == ["emb_params"] and data["emb_params"].shape == (1, TINY_DIM)
        # diffusers reads a one-key file as {token: tensor}; A1111 names it after the file stem.
        tiny_pipe.load_textual_inversion(str(path), token=names[k])
        assert torch.equal(row(tiny_pipe, names[k]), c.embeddings[k])

    assert prompt.count("[") == prompt.count("]") == 9 and prompt.startswith("[" * 9 + "teddy-s9:")
    tree, end = _parse(prompt)
    assert end == len(prompt)
    for steps in range(1, 151):  # fractions land on the intended step for every A1111 step count
        for step in range(1, steps + 1):
            assert _at_step(tree, step, steps) == f"teddy-s{_expected_stage(step, steps, 10)}"

    _, exact = export_a1111(c, tmp_path / "exact", num_inference_steps=30)
    assert exact == "[[[[[[[[[teddy-s9:teddy-s8:2]:teddy-s7:5]:teddy-s6:8]:teddy-s5:11]:teddy-s4:14]" \
                    ":teddy-s3:17]:teddy-s2:20]:teddy-s1:23]:teddy-s0:26]"
    assert _sampler_texts(exact, 30) == [f"teddy-s{9 - c // 3}" for c in range(30)]  # 3 calls each

    note = json.loads((tmp_path / "teddy-prospect_a1111.json").read_text())
    assert note["prompt"] == prompt and note["stages"][9]["name"] == "teddy-s9"
    assert a1111_schedule(["x-s0"]) == "x-s0"
    star_paths, _ = export_a1111(make_concept(num_stages=2), tmp_path / "star")
    assert star_paths[0].name == "prospect-s0.safetensors"  # "*" has no file-safe characters
    with pytest.raises(ConceptError, match="export name"):
        export_a1111(c, tmp_path, name="bad name")


def test_from_textual_inversion(tmp_path):
    vec = torch.randn(TINY_DIM)
    safetensors.torch.save_file({"<cat-toy>": vec}, tmp_path / "learned_embeds.safetensors")
    c = Concept.from_textual_inversion(tmp_path / "learned_embeds.safetensors", num_stages=4)
    assert c.placeholder == "<cat-toy>" and c.embeddings.shape == (4, TINY_DIM)
    assert all(torch.equal(r, vec) for r in c.embeddings)

    many = torch.randn(4, TINY_DIM, dtype=torch.float16)
    safetensors.torch.save_file({"emb_params": many}, tmp_path / "charturner.safetensors")
    c = Concept.from_textual_inversion(tmp_path / "charturner.safetensors", num_stages=4)
    assert c.placeholder == "charturner" and torch.equal(c.embeddings, many.float())
    c = Concept.from_textual_inversion(tmp_path / "charturner.safetensors", num_stages=4, placeholder="*")
    assert c.placeholder == "*"

    with pytest.raises(ConceptError, match="expected 1 or num_stages=10"):
        Concept.from_textual_inversion(tmp_path / "charturner.safetensors")
    # An SDXL embedding (A1111 / diffusers' SDXL convention) becomes an SDXL concept, clip_l first.
    wide = torch.randn(4, 48)
    safetensors.torch.save_file({"clip_g": wide, "clip_l": many}, tmp_path / "sdxl.safetensors")
    xl = Concept.from_textual_inversion(tmp_path / "sdxl.safetensors", num_stages=4)
    assert xl.family == "sdxl" and xl.placeholder == "sdxl"
    assert torch.equal(xl.embeddings, many.float()) and torch.equal(xl.embeddings_2, wide)
    with pytest.raises(ConceptError, match="expected 1 or num_stages=10"):
        Concept.from_textual_inversion(tmp_path / "sdxl.safetensors")
    safetensors.torch.save_file({"clip_l": many, "other": many.clone()}, tmp_path / "odd.safetensors")
    with pytest.raises(ConceptError, match="single-encoder"):
        Concept.from_textual_inversion(tmp_path / "odd.safetensors")

    # A per-stage diffusers export imports back stage by stage.
    orig = make_concept(num_stages=3)
    paths = export_diffusers(orig, tmp_path / "export")
    back = Concept.from_textual_inversion(paths[2], num_stages=1, placeholder="*")
    assert torch.equal(back.embeddings[0], orig.embeddings[2])


@pytest.mark.parametrize("given, recorded", [
    ("/home/alice/models/sd15", "sd15"), ("~/models/sd15/", "sd15"), ("./sd15", "sd15"),
    ("C:\\Users\\bob\\sd15", "sd15"), ("runwayml/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"),
    ("prospect/toy-world", "prospect/toy-world"), ("", ""),
])
def test_a_concept_never_carries_a_local_path(given, recorded, tmp_path):
    """Also for files written before names were recorded: the path is cut to its last part on reading."""
    c = Concept(embeddings=torch.zeros(2, 4), num_train_timesteps=10, base_model=given)
    assert c.base_model == recorded
    assert Concept.load(c.save(tmp_path / "c.safetensors")).base_model == recorded


def test_two_exports_with_their_names_load_side_by_side(tiny_pipe, tmp_path):
    """Concepts trained with the same placeholder: named exports neither overwrite nor refuse each other."""
    a, b = make_concept(), make_concept()
    a.embeddings.fill_(0.5), b.embeddings.fill_(-0.5)
    pa, pb = export_diffusers(a, tmp_path / "ti", name="cat"), export_diffusers(b, tmp_path / "ti", name="dog")
    for path in (pa[3], pb[3]):
        tiny_pipe.load_textual_inversion(str(path))  # a second <*:s3> would raise "already in tokenizer"
    assert torch.equal(row(tiny_pipe, "<cat:s3>"), a.embeddings[3]) and torch.equal(row(tiny_pipe, "<dog:s3>"), b.embeddings[3])
    ta, _ = export_a1111(a, tmp_path / "a1111", name="cat")
    tb, _ = export_a1111(b, tmp_path / "a1111", name="dog")
    assert len({p.name for p in ta + tb}) == 20 and len(list((tmp_path / "a1111").glob("*.safetensors"))) == 20
