"""Several vectors per stage (``vectors_per_stage``, as diffusers' ``--num_vectors``): file, prompts, export, inversion."""

from __future__ import annotations

import numpy as np
import safetensors.torch
import torch
from PIL import Image

from prospect.concept import Concept, add_concept, init_embeddings
from prospect.exports import export_a1111, export_diffusers
from prospect.inversion import InversionConfig, invert

DIM = 32  # conftest's tiny pipeline


def _concept(n=3, v=3, placeholder="<toy>") -> Concept:
    return Concept(placeholder=placeholder, embeddings=torch.randn(n, v, DIM, generator=torch.Generator().manual_seed(1)))


def _row(pipe, token):
    return pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids(token)].detach()


def test_a_stage_stands_for_its_vectors_in_prompts():
    c = _concept()
    assert (c.num_stages, c.vectors_per_stage, c.dim, c.format_version) == (3, 3, DIM, 2)
    assert c.stage_tokens(1) == ["<<toy>:s1>", "<<toy>:s1:1>", "<<toy>:s1:2>"]
    assert c.prompt_text(2) == "<<toy>:s2> <<toy>:s2:1> <<toy>:s2:2>"
    assert len(c.tokens()) == 9 and c.tokens()[3] == "<<toy>:s1>"
    torch.testing.assert_close(c.rows()[4], c.embeddings[1, 1])
    one = Concept(embeddings=torch.zeros(4, 1, DIM))  # one vector per stage has one layout
    assert one.embeddings.shape == (4, DIM) and one.vectors_per_stage == 1 and one.format_version == 1


def test_multi_vector_file_round_trip_is_version_2(tmp_path):
    c = _concept()
    path = c.save(tmp_path / "toy.safetensors")
    loaded = Concept.load(path)
    assert torch.equal(loaded.embeddings, c.embeddings) and loaded.vectors_per_stage == 3
    with safetensors.safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["format_version"] == "2" and meta["vectors_per_stage"] == "3"


def test_pipeline_prompt_takes_every_vector_of_the_stage(tiny_pipe):
    from prospect.pipeline import ProSpectPipeline

    pp = ProSpectPipeline(tiny_pipe, num_stages=3)
    c = pp.load_concept(_concept(placeholder="*"))
    texts = pp.stage_prompts("a photo of *", ["*", "* in snow", 2])
    assert texts == [f"a photo of {c.prompt_text(0)}", f"a photo of {c.prompt_text(1)} in snow", f"a photo of {c.prompt_text(2)}"]
    ids = tiny_pipe.tokenizer(texts[1]).input_ids
    wanted = tiny_pipe.tokenizer.convert_tokens_to_ids(c.stage_tokens(1))
    assert ids[4:7] == wanted  # <bos> a photo of, then the stage's three vectors in order
    for k in range(3):
        for v, tok in enumerate(c.stage_tokens(k)):
            assert torch.equal(_row(tiny_pipe, tok), c.embeddings[k, v])


def test_diffusers_export_loads_every_vector_with_the_stock_loader(tiny_pipe, tmp_path):
    c = _concept(n=2)
    ours = Concept(placeholder="<ours>", embeddings=c.embeddings)  # the same vectors under our own tokens
    add_concept(tiny_pipe.tokenizer, tiny_pipe.text_encoder, ours)
    expected = [tiny_pipe.encode_prompt(f"a {ours.prompt_text(k)} toy", "cpu", 1, False)[0] for k in range(2)]
    for k, path in enumerate(export_diffusers(c, tmp_path / "ti")):
        assert safetensors.torch.load_file(path)[c.token(k)].shape == (3, DIM)
        tiny_pipe.load_textual_inversion(str(path))
        # stock diffusers expands the token to token, token_1, token_2 itself (maybe_convert_prompt)
        got = tiny_pipe.encode_prompt(f"a {c.token(k)} toy", "cpu", 1, False)[0]
        torch.testing.assert_close(got, expected[k], rtol=0, atol=1e-6)


def test_a1111_export_writes_one_multi_vector_file_per_stage(tmp_path):
    c = _concept()
    paths, prompt = export_a1111(c, tmp_path, name="toy")
    for k, path in enumerate(paths):
        data = safetensors.torch.load_file(path)
        assert list(data) == ["emb_params"] and torch.equal(data["emb_params"], c.embeddings[k])
    assert prompt.startswith("[[toy-s2:toy-s1:")


def test_inversion_with_several_vectors_trains_only_their_rows(tiny_pipe):
    table = tiny_pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    image = Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype("uint8"))
    cfg = InversionConfig(initializer="a photo", num_stages=4, vectors_per_stage=2, steps=12, lr=5e-2, batch_size=4,
                          checkpoint_every=0)
    start = init_embeddings(tiny_pipe.tokenizer, tiny_pipe.text_encoder, "a photo", 4, 2)
    torch.testing.assert_close(start[0], table[tiny_pipe.tokenizer("a photo", add_special_tokens=False).input_ids])
    concept = invert(tiny_pipe, [image], cfg, progress=False)
    assert concept.embeddings.shape == (4, 2, DIM)
    after = tiny_pipe.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(after[: len(table)], table)  # every other row bit-identical
    ids = tiny_pipe.tokenizer.convert_tokens_to_ids(concept.tokens())
    torch.testing.assert_close(after[ids], concept.rows())
    assert not torch.allclose(concept.embeddings, start)  # both vectors of each stage moved
    assert (concept.embeddings - start).flatten(2).norm(dim=2).min() > 0


def test_mixing_two_concepts_takes_each_in_its_stages_as_the_readme_shows(tiny_pipe):
    from prospect.pipeline import ProSpectPipeline

    pp = ProSpectPipeline(tiny_pipe)
    a, b = (pp.load_concept(_concept(n=10, v=2, placeholder=p)) for p in ("<a>", "<b>"))
    words = pp.stage_prompts("*", ["<b>"] * 5 + ["<a>"] * 5)
    assert words == [b.prompt_text(k) for k in range(5)] + [a.prompt_text(k) for k in range(5, 10)]
    assert pp.stage_prompts("[<a>:<b>:0.5]") == words  # the command line's way of writing it
    out = pp("*", prospect_words=["<b>"] * 5 + ["<a>"] * 5, num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    assert out.stage_prompts[0] == words and len(out.images) == 1
