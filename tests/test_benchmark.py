"""The attribute-transfer benchmark: prompts, scoring on rendered images, intervals, and a smoke run."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest

from prospect.toyworld import benchmark as bm
from prospect.toyworld import world
from prospect.spectrum import resolve_editing
from prospect.toyworld.reader import read

REF = world.Scene(position="left", shape="triangle", colour="red", texture="checkered", background="dark")
SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "transfer.py"


def _scores(scene: world.Scene, wanted: dict[str, str]) -> bool:
    """Score a clean render of ``scene`` as the benchmark scores a generated image."""
    return bm.success(read(world.render_pil(scene)), wanted)


def _good_and_copy(scene: world.Scene, wanted: dict[str, str], attrs) -> tuple[dict, dict]:
    """Readings of clean renders: ``scene`` with ``wanted``'s ``attrs`` (the text's), and ``scene`` itself."""
    good = read(world.render_pil(scene.with_(**{a: wanted[a] for a in attrs}))).as_dict()
    return good, read(world.render_pil(scene)).as_dict()


def test_describe_is_the_world_caption():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = world.random_scene(rng)
        assert bm.describe(scene.attributes()) == world.caption(scene)
    assert bm.describe({"colour": "blue"}) == "a blue shape"
    assert bm.describe({"position": "top"}, concept=("shape",)) == "a * on the top"


def test_composed_prompts_put_the_placeholder_in_the_attribute_slot():
    text = {"shape": "square", "colour": "blue", "position": "top", "texture": "dotted"}
    assert bm.composed_prompt(bm.TASK["reconstruction"], {}) == "*"
    assert bm.composed_prompt(bm.TASK["texture"], text) == "a * blue square on the top"
    assert bm.composed_prompt(bm.TASK["colour"], text) == "a dotted * square on the top"
    assert bm.composed_prompt(bm.TASK["layout"], {"colour": "green", "texture": "dotted"}) == "a dotted green *"
    # content: the reference's texture and colour stand in one '*' before the text's shape and position
    assert bm.composed_prompt(bm.TASK["content"], {"shape": "square", "position": "right"}) == "a * square on the right"


def test_text_attributes_always_differ_from_the_reference():
    rng = np.random.default_rng(1)
    for _ in range(30):
        ref = world.random_scene(rng)
        for task in bm.TASKS:
            text = bm.text_attributes(ref, task, rng)
            assert set(text) == set(task.from_text)
            assert all(text[a] != getattr(ref, a) for a in text)
    a = bm.text_attributes(REF, bm.TASK["texture"], np.random.default_rng(7))
    assert a == bm.text_attributes(REF, bm.TASK["texture"], np.random.default_rng(7))


@pytest.mark.parametrize("task", bm.TASKS, ids=lambda t: t.name)
def test_prospect_stage_texts_are_the_ti_prompt_inside_the_split_and_text_alone_outside(task):
    text = bm.text_attributes(REF, task, np.random.default_rng(3))
    for split in bm.sweep_splits(task, range(11)):
        texts = bm.stage_texts(task, text, split)
        assert len(texts) == 10
        for i, t in enumerate(texts):
            inside = split[0] <= i < split[1]
            assert t == (bm.composed_prompt(task, text) if inside else bm.describe(text))
            assert ("*" in t) == inside
        assert resolve_editing(bm.editing_prompt(texts), 10) == texts
    assert task.default_split in bm.sweep_splits(task, [])


def test_default_splits_follow_the_paper_order():
    assert bm.TASK["texture"].default_split == (0, 5)  # late stages: end of generation
    assert bm.TASK["layout"].default_split == (5, 10)  # early stages
    lo, hi = bm.TASK["colour"].default_split
    assert 0 < lo < hi < 10
    assert bm.sweep_splits(bm.TASK["texture"], [2, 8]) == [(0, 2), (0, 5), (0, 8)]
    assert bm.sweep_splits(bm.TASK["layout"], [2, 8]) == [(2, 10), (5, 10), (8, 10)]
    assert bm.TASK["content"].default_split == (0, 8)  # the official README: text alone in the first two stages
    assert bm.sweep_splits(bm.TASK["content"], [2, 9]) == [(0, 2), (0, 8), (0, 9)]


def test_adding_a_task_keeps_the_earlier_tasks_text_draws():
    # each task draws its text from its own index in TASKS: a task appended at the end leaves the others' prompts
    # (and so every earlier benchmark figure) as they were
    assert [t.name for t in bm.TASKS[:4]] == ["reconstruction", "texture", "layout", "colour"]
    scene = bm.reference_scene(0, 3)
    texts = bm.texts_of(scene, 0, 3)
    for i, task in enumerate(bm.TASKS[:4]):
        assert texts[task.name] == bm.text_attributes(scene, task, np.random.default_rng([0, 3, i]))


def test_editing_prompt_refuses_texts_with_editing_syntax():
    with pytest.raises(ValueError):
        bm.editing_prompt(["a [red] circle"] * 5 + ["a circle"] * 5)
    with pytest.raises(ValueError):
        bm.stage_texts(bm.TASK["texture"], {}, (6, 4))


def test_reconstruction_scores_a_render_of_the_reference():
    wanted = bm.target(REF, bm.TASK["reconstruction"], {})
    assert wanted == REF.attributes()
    assert _scores(REF.with_(dx=0.7), wanted)  # the jitter is no attribute
    for attr, value in (("texture", "plain"), ("background", "light"), ("position", "right"), ("shape", "circle")):
        assert not _scores(REF.with_(**{attr: value}), wanted), attr


def test_texture_transfer_needs_the_reference_texture_and_the_text_attributes():
    task = bm.TASK["texture"]
    text = {"shape": "square", "colour": "blue", "position": "top"}
    wanted = bm.target(REF, task, text)
    assert wanted == {"texture": "checkered", **text}
    good = world.Scene(**wanted, background="light")
    assert _scores(good, wanted)  # the background is not scored in transfer tasks
    assert not _scores(good.with_(texture="striped"), wanted)  # texture not transferred
    assert not _scores(good.with_(colour="red"), wanted)  # the reference's colour leaked
    assert not _scores(REF, wanted)  # a copy of the reference fails
    hits = bm.hits(read(world.render_pil(good.with_(colour="red"))), wanted)
    assert hits == {"position": True, "shape": True, "colour": False, "texture": True}


def test_layout_and_colour_transfer_scoring():
    layout, colour = bm.TASK["layout"], bm.TASK["colour"]
    wanted = bm.target(REF, layout, {"colour": "green", "texture": "dotted"})
    assert _scores(world.Scene(position="left", shape="triangle", colour="green", texture="dotted"), wanted)
    assert not _scores(world.Scene(position="right", shape="triangle", colour="green", texture="dotted"), wanted)
    assert not _scores(REF, wanted)
    wanted = bm.target(REF, colour, {"shape": "circle", "texture": "plain", "position": "bottom"})
    assert _scores(world.Scene(position="bottom", shape="circle", colour="red", texture="plain"), wanted)
    assert not _scores(world.Scene(position="bottom", shape="circle", colour="blue", texture="plain"), wanted)


def test_wilson_interval_known_values():
    # Newcombe (1998), Stat. Med. 17:857, example 81/263 -> 0.2553 to 0.3662.
    assert bm.wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert bm.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert bm.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert bm.wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    with pytest.raises(ValueError):
        bm.wilson(3, 0)


def test_bootstrap_resamples_references_deterministically():
    rng = np.random.default_rng(0)
    x = rng.random((20, 4)) < np.linspace(0.1, 0.9, 20)[:, None]
    assert bm.bootstrap(x, seed=5) == bm.bootstrap(x, seed=5)
    lo, hi = bm.bootstrap(x, seed=5)
    assert lo < x.mean() < hi
    assert bm.bootstrap(np.ones((6, 3)), seed=1) == (1.0, 1.0)
    r = bm.rate(x)
    assert (r.successes, r.n, r.rate) == (int(x.sum()), 80, x.mean())
    # Resampling whole references is wider than Wilson's independent images when references differ.
    x = np.repeat(np.arange(20)[:, None] % 2 == 0, 4, axis=1)
    r = bm.rate(x)
    assert r.bootstrap[1] - r.bootstrap[0] > r.wilson[1] - r.wilson[0]
    with pytest.raises(ValueError):
        bm.rate(np.ones(5, dtype=bool))


def test_paired_difference_keeps_each_references_pair_together():
    rng = np.random.default_rng(1)
    b = np.zeros((12, 4), dtype=bool)
    for i, k in enumerate(rng.integers(0, 3, 12)):
        b[i, :k] = True
    a = b.copy()
    a[:, 3] = True  # each reference gains exactly one success of four: +0.25 everywhere
    d = bm.paired_difference(a, b, seed=3)
    assert (d.mean, d.lo, d.hi, d.references) == pytest.approx((0.25, 0.25, 0.25, 12))
    assert bm.paired_difference(a, b, seed=3) == d
    assert bm.paired_difference(b, b).mean == 0.0
    with pytest.raises(ValueError):
        bm.paired_difference(a, b[:5])


def _script_main():
    """``main`` of bench/transfer.py (a script, not a package module)."""
    return runpy.run_path(str(SCRIPT), run_name="bench_transfer")["main"]


@pytest.mark.slow
def test_transfer_script_smoke_run_writes_results_and_resumes(tmp_path):
    """The script end to end on the embedded model with a minute budget (numbers are meaningless)."""
    main = _script_main()
    argv = ["--references", "1", "--steps", "2", "--seeds", "1", "--num-inference-steps", "2", "--sweep", "5",
            "--out", str(tmp_path / "t")]
    result = main(argv)
    for name in ("results.json", "results.md", "sweep.png", "examples-ref000.png"):
        assert (tmp_path / "t" / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "t" / "results.json").read_text())
    assert set(saved["main"]) == {t.name for t in bm.TASKS}
    assert set(saved["main"]["texture"]) == {"prospect", "ti", "caption"}
    assert saved["differences"]["layout"]["references"] == 1
    assert "| texture | ProSpect |" in (tmp_path / "t" / "results.md").read_text()
    assert saved["edit"]["difference"]["references"] == 1
    assert "img2img edit" in (tmp_path / "t" / "results.md").read_text()
    assert result["seconds"]["inversion"] > 0
    again = main(argv)  # everything comes from the cache
    assert again["seconds"]["inversion"] == 0 and again["seconds"]["generation"] == 0
    assert again["main"] == result["main"]


def _script():
    return runpy.run_path(str(SCRIPT), run_name="bench_transfer")


def _exits_2(main, argv, says, capsys):
    """The script refuses ``argv`` with exit code 2 and a message containing ``says``."""
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    assert says in capsys.readouterr().err


def test_mixing_two_concepts_switches_placeholders_at_the_split_and_scores_a_and_b():
    cfg = _script()["BenchConfig"](references=6, seed=1)
    assert resolve_editing(bm.mix_prompts("prospect"), 10) == ["<b>"] * 5 + ["<a>"] * 5
    assert bm.mix_prompts("ti") == "a <b> <a>"
    unlike = lambda a, b: all(getattr(a, x) != getattr(b, x) for x in ("position", "shape", "texture"))  # noqa: E731
    scenes = [bm.reference_scene(1, j) for j in range(6)]
    for r in range(6):
        partner = bm.mix_partner(cfg, r)
        assert partner != r
        if any(unlike(scenes[r], scenes[j]) for j in range(6)):
            assert unlike(scenes[r], scenes[partner])
    # score_mix on clean renders: an image with A's layout and B's texture succeeds, a copy of A or B fails
    a, b = bm.reference_scene(1, 0), bm.reference_scene(1, bm.mix_partner(cfg, 0))
    mixed = a.with_(texture=b.texture)
    readings = [{"prospect": [read(world.render_pil(mixed)).as_dict()] * 2,
                 "ti": [read(world.render_pil(a)).as_dict(), read(world.render_pil(b)).as_dict()]}]
    out = bm.score_mix(readings, cfg)
    assert out["prospect"]["success"]["rate"] == 1.0 and out["ti"]["success"]["rate"] == 0.0
    assert out["difference"]["mean"] == 1.0


def test_captioned_templates_take_the_references_own_words_and_bad_ones_exit_2(capsys):
    script = _script()
    scene = bm.reference_scene(1, 0)
    filled = script["fill_templates"](("{}", "a {texture} {colour} {}", "{} on the {position}"), scene.attributes())
    assert filled == ("{}", f"a {scene.texture} {scene.colour} {{}}", f"{{}} on the {scene.position}")
    assert all(t.format("*").count("*") == 1 for t in filled)  # still one slot for the concept
    for bad, says in (("a {x} {}", "fields are"), ("a photo", "exactly once"), ("{} {}", "out of range")):
        _exits_2(script["main"], ["--template", bad], says, capsys)


def test_timestep_templates_take_the_references_own_words_and_bad_ones_exit_2(capsys):
    script = _script()
    scene = bm.reference_scene(1, 0)
    filled = script["fill_templates"](("300-700:a {texture} {} {shape} on the {position}",), scene.attributes())
    assert filled == (f"300-700:a {scene.texture} {{}} {scene.shape} on the {scene.position}",)
    for bad, says in (("300-700:a {x} {}", "fields are"), ("300:a {}", "LO-HI:TEMPLATE"), ("3-7:a", "exactly once")):
        _exits_2(script["main"], ["--template-at", bad], says, capsys)


def test_shuffle_at_reaches_the_run_and_a_bad_span_exits_2(capsys):
    main = _script()["main"]
    main.__globals__["run"] = lambda cfg: cfg  # what the run would get
    assert main(["--shuffle-at", "500-700", "--quick"]).shuffle_at == "500-700"
    assert main(["--quick"]).shuffle_at is None
    for bad in ("700-500", "5", "0-1001x"):
        _exits_2(main, ["--shuffle-at", bad], "--shuffle-at", capsys)


def test_the_edit_input_is_unlike_the_reference_and_the_edit_scores_its_texture_on_the_input():
    cfg = _script()["BenchConfig"](references=8, seed=1, sweep=(2, 4), edit_split=4)
    for r in range(8):
        ref, (edit, text) = bm.reference_scene(1, r), bm.edit_input(1, r)
        assert all(getattr(edit, a) != getattr(ref, a) for a in ("shape", "colour", "position", "texture"))
        assert text == {a: getattr(edit, a) for a in ("shape", "colour", "position")}
        assert bm.edit_input(1, r) == (edit, text)  # from (seed, r) alone
    keys = [c.key for c in bm.edit_conditions(cfg)]
    assert keys == ["prospect/edit/0-2", "prospect/edit/0-4", "prospect/edit/0-5", "ti/edit", "caption/edit"]
    stages = resolve_editing(bm.Condition("prospect", bm.EDIT, (0, 4)).prompt(bm.reference_scene(1, 0), text), 10)
    assert stages[:4] == [bm.composed_prompt(bm.EDIT, text)] * 4 and "*" not in stages[4]
    # scored on clean renders: the input with the reference's texture succeeds; the input itself or the reference fails
    ref, (edit, _) = bm.reference_scene(1, 0), bm.edit_input(1, 0)
    good, plain, copy = (read(world.render_pil(s)).as_dict() for s in (edit.with_(texture=ref.texture), edit, ref))
    readings = [{k: ([good, good] if k.startswith("prospect/edit/0-4") else [plain, copy]) for k in keys}]
    cfg = _script()["BenchConfig"](references=1, seed=1, sweep=(2, 4), edit_split=4)
    out = bm.score_edit(readings, cfg)
    assert out["prospect/edit/0-4"]["success"]["rate"] == 1.0 and out["ti/edit"]["success"]["rate"] == 0.0
    assert out["ti/edit"]["attributes"]["texture"] == 0.5 and out["difference"]["mean"] == 1.0  # the copy has it


def test_bare_layout_puts_the_token_alone_first_then_the_composed_prompt_and_ti_gets_the_same_texts():
    cfg = _script()["BenchConfig"](references=1, seed=1, sweep=(5, 8), bare=(7,), tasks=("layout",))
    layout, text = bm.TASK["layout"], {"colour": "green", "texture": "dotted"}
    stages = bm.stage_texts(layout, text, (5, 10), bare=7)
    assert stages == ["a dotted green shape"] * 5 + ["a dotted green *"] * 2 + ["*"] * 3
    assert bm.stage_texts(layout, text, (7, 10), bare=7) == ["a dotted green shape"] * 7 + ["*"] * 3
    with pytest.raises(ValueError, match="bare 4"):
        bm.stage_texts(layout, text, (5, 10), bare=4)
    keys = [c.key for c in bm.conditions(cfg)]
    assert keys == ["prospect/layout/5-10", "prospect/layout/8-10", "ti/layout", "caption/layout",
                    "prospect/layout/5-10/bare7", "ti/layout/5-10/bare7"]  # k = 8 > J = 7 has no bare row
    scene = bm.reference_scene(1, 0)
    staged, ti = bm.Condition("ti", layout, (5, 10), 7), bm.Condition("ti", layout)
    assert staged.prompt(scene, text) == bm.Condition("prospect", layout, (5, 10), 7).prompt(scene, text)
    assert ti.prompt(scene, text) == "a dotted green *"
    # scored on clean renders: ProSpect's bare row right in both images, staged TI in one, TI in none
    wanted = bm.wanted_of(cfg, 0, layout)
    good, copy = _good_and_copy(scene, wanted, ("colour", "texture"))
    readings = [{"prospect/layout/5-10": [copy, copy], "prospect/layout/8-10": [copy, copy], "ti/layout": [copy, copy],
                 "caption/layout": [good, good], "prospect/layout/5-10/bare7": [good, good],
                 "ti/layout/5-10/bare7": [good, copy]}]
    todo = bm.conditions(cfg)
    summary = bm.summarise(bm.score(readings, cfg, todo), cfg, todo)
    assert set(summary["main"]) == {"layout"} and summary["ceiling"] == {}
    assert [r["split"] for r in summary["sweep"]["layout"]] == [[5, 10], [8, 10]]  # the bare rows are not in the sweep
    (row,) = summary["bare"]
    assert row["prospect"]["success"]["rate"] == 1.0 and row["ti_staged"]["success"]["rate"] == 0.5
    assert row["minus_ti"]["mean"] == 1.0 and row["minus_ti_staged"]["mean"] == 0.5


def test_bare_below_puts_the_token_alone_last_for_texture_content_and_the_edit_and_ti_gets_the_same_texts():
    cfg = _script()["BenchConfig"](references=1, seed=1, sweep=(2, 4), bare_below=(3,), tasks=("texture", "edit"))
    texture, text = bm.TASK["texture"], {"shape": "circle", "colour": "blue", "position": "top"}
    assert bm.stage_texts(texture, text, (0, 5), bare=3) == (
        ["*"] * 3 + ["a * blue circle on the top"] * 2 + ["a blue circle on the top"] * 5)
    assert bm.stage_texts(texture, text, (0, 3), bare=3) == ["*"] * 3 + ["a blue circle on the top"] * 7
    for j in (0, 6):  # '*' alone in no stage, or past the split
        with pytest.raises(ValueError, match=f"bare {j}"):
            bm.stage_texts(texture, text, (0, 5), bare=j)
    keys = [c.key for c in bm.conditions(cfg)]
    assert keys == ["prospect/texture/0-2", "prospect/texture/0-4", "prospect/texture/0-5", "ti/texture",
                    "caption/texture", "prospect/texture/0-4/bare3", "ti/texture/0-4/bare3"]  # k = 2 < J = 3: none
    assert [c.key for c in bm.edit_conditions(cfg)][-2:] == ["prospect/edit/0-4/bare3", "ti/edit/0-4/bare3"]
    # scored on clean renders: ProSpect's bare row right in both images, staged TI in one, TI in none
    scene = bm.reference_scene(1, 0)
    wanted = bm.wanted_of(cfg, 0, texture)
    good, copy = _good_and_copy(scene, wanted, ("shape", "colour", "position"))
    readings = [{k: [copy, copy] for k in keys}]
    readings[0].update({"caption/texture": [good, good], "prospect/texture/0-4/bare3": [good, good],
                        "ti/texture/0-4/bare3": [good, copy]})
    todo = bm.conditions(cfg)
    summary = bm.summarise(bm.score(readings, cfg, todo), cfg, todo)
    assert [r["split"] for r in summary["sweep"]["texture"]] == [[0, 2], [0, 4], [0, 5]]
    (row,) = summary["bare"]
    assert row["task"] == "texture" and row["bare"] == 3 and row["prospect"]["success"]["rate"] == 1.0
    assert row["minus_ti"]["mean"] == 1.0 and row["minus_ti_staged"]["mean"] == 0.5
    md = _script()["markdown"](summary, cfg, 1)
    assert "Texture with '*' alone in stages < J" in md and "| [0, 3) | [3, 4) | **1.00** (2/2)" in md


def test_ti_staged_gives_ti_prospects_stage_texts_at_each_reported_split_and_scores_the_difference():
    cfg = _script()["BenchConfig"](references=1, seed=1, sweep=(4,), ti_staged=True, chosen=(("texture", 0, 4),),
                                   tasks=("reconstruction", "texture"), edit_split=4)
    keys = [c.key for c in bm.conditions(cfg)]
    assert "ti/texture/0-4" in keys and "ti/texture/0-5" in keys and not any(k.startswith("ti/reconstruction/") for k in keys)
    assert [c.key for c in bm.edit_conditions(cfg) if c.method == "ti"] == ["ti/edit", "ti/edit/0-4"]
    texture, scene = bm.TASK["texture"], bm.reference_scene(1, 0)
    text = bm.texts_of(scene, 1, 0)["texture"]
    assert bm.Condition("ti", texture, (0, 4)).prompt(scene, text) == bm.Condition("prospect", texture, (0, 4)).prompt(
        scene, text)
    wanted = bm.wanted_of(cfg, 0, texture)
    good, copy = _good_and_copy(scene, wanted, ("shape", "colour", "position"))
    readings = [{k: [copy, copy] for k in keys}]
    readings[0].update({"prospect/texture/0-4": [good, good], "ti/texture/0-4": [good, copy]})
    todo = bm.conditions(cfg)
    summary = bm.summarise(bm.score(readings, cfg, todo), cfg, todo)
    assert summary["main"]["texture"]["ti_staged_chosen"]["success"]["rate"] == 0.5
    assert summary["differences"]["texture (chosen split) vs TI, same texts"]["mean"] == 0.5
    assert summary["differences"]["texture vs TI, same texts"]["mean"] == 0.0
    assert "| texture | TI, the chosen split's stage texts | **0.50** (1/2)" in _script()["markdown"](summary, cfg, 1)


def test_bare_colour_puts_the_token_alone_in_the_end_of_its_window_that_generation_meets_first():
    cfg = _script()["BenchConfig"](references=1, seed=1, sweep=(4,), bare=(3, 5), tasks=("colour",))
    colour, text = bm.TASK["colour"], {"shape": "circle", "texture": "dotted", "position": "top"}
    assert bm.stage_texts(colour, text, (3, 7), bare=5) == (
        ["a dotted circle on the top"] * 3 + ["a dotted * circle on the top"] * 2 + ["*"] * 2
        + ["a dotted circle on the top"] * 3)
    keys = [c.key for c in bm.conditions(cfg) if c.bare is not None]
    assert keys == ["prospect/colour/1-5/bare3", "ti/colour/1-5/bare3", "prospect/colour/3-7/bare3",
                    "ti/colour/3-7/bare3", "prospect/colour/3-7/bare5", "ti/colour/3-7/bare5",
                    "prospect/colour/5-9/bare5", "ti/colour/5-9/bare5"]
    scene = bm.reference_scene(1, 0)
    copy = read(world.render_pil(scene)).as_dict()
    readings = [{c.key: [copy] for c in bm.conditions(cfg)}]
    todo = bm.conditions(cfg)
    summary = bm.summarise(bm.score(readings, cfg, todo), cfg, todo)
    md = _script()["markdown"](summary, cfg, 1)
    assert "Colour with '*' alone in stages [J, hi)" in md and "| [5, 7) | [3, 5) | **0.00** (0/1)" in md
    assert "| [3, 7) | none |" in md  # J = lo: the whole window alone


def test_colour_windows_replace_the_colour_sweep_and_keep_the_reported_window():
    cfg = _script()["BenchConfig"](references=1, seed=1, sweep=(4,), colour_windows=((3, 6), (4, 8)),
                                   tasks=("colour",), sweep_staged=True)
    keys = {c.key for c in bm.conditions(cfg) if c.task.name == "colour"}
    for window in ("3-6", "3-7", "4-8"):  # the given windows and the a-priori one, each with the fair TI and caption
        assert {f"prospect/colour/{window}", f"ti/colour/{window}", f"caption/colour/{window}"} <= keys
    assert not any("/1-5" in k or "/5-9" in k for k in keys)
    assert bm.sweep_splits(bm.TASK["colour"], [4]) == [(1, 5), (3, 7), (5, 9)]  # none given: the fixed windows
    assert bm.sweep_splits(bm.TASK["texture"], [4], windows=((3, 6),)) == [(0, 4), (0, 5)]  # colour's alone


@pytest.mark.parametrize("argv, says", [(["--colour-windows", "3-x"], "takes LO-HI"),
                                        (["--colour-windows", "6-3"], "0 <= LO < HI <= 10")])
def test_bad_colour_windows_exit_2_with_the_reason(argv, says, capsys):
    with pytest.raises(SystemExit) as err:
        _script()["main"](argv)
    assert err.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.parametrize("argv, says", [(["--tasks", "layout,shine"], "unknown shine"),
                                        (["--bare", "7", "--tasks", "texture"], "must include one of them"),
                                        (["--bare", "10"], "stages in 1..9"), (["--bare", "a"], "integers"),
                                        (["--bare-below", "0"], "stages in 1..9"),
                                        (["--bare-below", "x"], "--bare-below takes integers"),
                                        (["--bare-below", "3", "--tasks", "layout,colour"], "must include one of")])
def test_bad_tasks_and_bare_values_exit_2_with_the_reason(argv, says, capsys):
    with pytest.raises(SystemExit) as err:
        _script()["main"](argv)
    assert err.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.slow
def test_transfer_script_runs_the_layout_task_alone_with_bare_rows_and_colour_free_ti(tmp_path):
    main = _script_main()
    argv = ["--references", "2", "--steps", "2", "--seeds", "1", "--num-inference-steps", "2", "--sweep", "6",
            "--tasks", "layout", "--bare", "8", "--ti-hue-jitter", "--out", str(tmp_path / "t")]
    result = main(argv)
    assert set(result["main"]) == {"layout"} and "mix" not in result and "edit" not in result
    assert [(r["split"], r["bare"]) for r in result["bare"]] == [([6, 10], 8)]
    assert result["cache_keys"]["ti"] != result["cache_keys"]["inversion"]  # TI's jittered concepts are its own
    text = (tmp_path / "t" / "results.md").read_text()
    assert "at every timestep (TI)" in text and "| [8, 10) | [6, 8) |" in text
    assert not (tmp_path / "t" / "sweep.png").exists()  # its panels need every swept task


@pytest.mark.slow
def test_transfer_script_runs_texture_and_the_edit_with_bare_below_rows(tmp_path):
    main = _script_main()
    argv = ["--references", "2", "--steps", "2", "--seeds", "1", "--num-inference-steps", "2", "--sweep", "4",
            "--tasks", "texture,edit", "--bare-below", "2", "--out", str(tmp_path / "t")]
    result = main(argv)
    assert set(result["main"]) == {"texture"} and "mix" not in result
    assert [(r["task"], r["split"], r["bare"]) for r in result["bare"]] == [("texture", [0, 4], 2)]
    assert [(r["task"], r["split"], r["bare"]) for r in result["edit"]["bare"]] == [("edit", [0, 4], 2)]
    text = (tmp_path / "t" / "results.md").read_text()
    assert "Texture with '*' alone" in text and "Edit with '*' alone" in text and "| [0, 2) | [2, 4) |" in text


def test_sweep_staged_gives_ti_and_the_caption_prospects_stage_texts_at_every_split():
    cfg = _script()["BenchConfig"](references=1, seed=1, sweep=(2, 4), sweep_staged=True, ti_staged=True,
                                   tasks=("texture",))
    texture, scene = bm.TASK["texture"], bm.reference_scene(1, 0)
    text = bm.texts_of(scene, 1, 0)["texture"]
    keys = [c.key for c in bm.conditions(cfg)]
    assert keys == ["prospect/texture/0-2", "prospect/texture/0-4", "prospect/texture/0-5", "ti/texture",
                    "caption/texture", "ti/texture/0-5", "ti/texture/0-2", "caption/texture/0-2", "ti/texture/0-4",
                    "caption/texture/0-4", "caption/texture/0-5"]  # staged TI at the reported split once
    # the caption at a split: the reference's own texture word where ProSpect has '*', the text alone elsewhere
    stages = resolve_editing(bm.Condition("caption", texture, (0, 4)).prompt(scene, text), 10)
    plain = bm.describe(text)
    assert stages == [bm.describe(bm.target(scene, texture, text))] * 4 + [plain] * 6
    assert scene.texture in stages[0].split() and scene.texture not in plain.split()
    wanted = bm.wanted_of(cfg, 0, texture)
    good, copy = _good_and_copy(scene, wanted, ("shape", "colour", "position"))
    readings = [{k: [copy, copy] for k in keys}]
    readings[0].update({"caption/texture/0-4": [good, good], "ti/texture/0-4": [good, copy]})
    todo = bm.conditions(cfg)
    summary = bm.summarise(bm.score(readings, cfg, todo), cfg, todo)
    row = next(r for r in summary["sweep"]["texture"] if r["split"] == [0, 4])
    assert row["success"] == 0.0 and row["ti_staged"]["success"] == 0.5 and row["caption_staged"]["success"] == 1.0
    assert row["caption_staged"]["from_reference"] == 1.0
    md = _script()["markdown"](summary, cfg, 1)
    assert "TI, same texts: success" in md and "| texture | [0, 4) | 0.00 | 1.00 | 0.00 | 0.50 |" in md
    assert "| 1.00 | 1.00 | 1.00 |" in md


def _negative_twin(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # it imports transfer.py, as when run from the command line
    return runpy.run_path(str(SCRIPT.parent / "negative_twin.py"), run_name="bench_negative_twin")


def test_negative_twin_puts_each_negative_in_the_split_stages_only(monkeypatch):
    nt = _negative_twin(monkeypatch)
    texts = bm.stage_texts(bm.TASK["colour"], {"shape": "circle", "texture": "plain", "position": "left"}, (3, 7))
    want = {"none": "", "twin-context": texts[3].replace("*", nt["TWIN"]), "twin-alone": nt["TWIN"],
            "stage-9": nt["EARLY"], "shape-word": "a triangle"}
    assert set(want) == set(nt["VARIANTS"])
    for variant, inside in want.items():
        negative = nt["negative_texts"](variant, texts, (3, 7), "triangle")
        assert negative == [inside if 3 <= k < 7 else "" for k in range(10)]
        assert resolve_editing(bm.editing_prompt(negative), 10) == negative  # one negative prompt per call


@pytest.mark.slow
def test_negative_twin_quick_run_writes_every_variant(monkeypatch, tmp_path):
    nt = _negative_twin(monkeypatch)
    summary = nt["main"](["--quick", "--out", str(tmp_path)])
    table = (tmp_path / "negative-twin.md").read_text()
    for task in ("colour", "content"):
        assert set(summary[task]["rows"]) == {f"{m}/{v}" for m in ("prospect", "ti") for v in nt["VARIANTS"]}
        assert summary[task]["stronger_ti"] in nt["VARIANTS"]
    assert table.count("| ProSpect | twin-context |") == 2 and "shape-word (diagnostic)" in table
