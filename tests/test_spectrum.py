"""The prompt spectrum: prospect_words, prompt-editing syntax, file loading."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prospect.spectrum import (
    Edit,
    SpectrumError,
    Text,
    build_spectrum,
    format_editing,
    load_prospect_words,
    parse_editing,
    resolve_editing,
)


def tf(p, k):
    return f"<{p}:{k}>"


# --- prospect_words (official README semantics) --------------------------------------------


def test_readme_example_str_entries():
    words = ["a teddy * walking in times square"] * 8 + ["a teddy walking in times square"] * 2
    out = build_spectrum("*", words, token_for=tf)
    assert out[:8] == [f"a teddy <*:{i}> walking in times square" for i in range(8)]
    assert out[8:] == ["a teddy walking in times square"] * 2


def test_prompt_star_receives_entry_then_placeholders_get_stage_tokens():
    words = ["* dog"] * 5 + ["red *"] * 5
    out = build_spectrum("a photo of *", words, token_for=tf)
    assert out[0] == "a photo of <*:0> dog"
    assert out[9] == "a photo of red <*:9>"


def test_int_entries_flexible_attribute_guidance():
    out = build_spectrum("a * in the snow", [0, 0, 0, 0, 0, 9, 9, 9, 9, 9], token_for=tf)
    assert out == ["a <*:0> in the snow"] * 5 + ["a <*:9> in the snow"] * 5


def test_mixed_int_and_str_entries():
    words = [3, "a cat", 3, "* toy", 0, 0, 0, 0, 0, 0]
    out = build_spectrum("*", words, token_for=tf)
    assert out[:4] == ["<*:3>", "a cat", "<*:3>", "<*:3> toy"]


def test_no_prospect_words_uses_stage_tokens():
    assert build_spectrum("a * toy", num_stages=3, token_for=tf) == ["a <*:0> toy", "a <*:1> toy", "a <*:2> toy"]


def test_plain_text_mode_leaves_placeholders():
    assert build_spectrum("a * toy", num_stages=2) == ["a * toy", "a * toy"]
    words = ["a * toy", "a dog"]
    assert build_spectrum("*", words, num_stages=2) == ["a * toy", "a dog"]


def test_multiple_placeholders_one_pass_longest_first():
    out = build_spectrum("* with <teddy> and <teddy>s", num_stages=2, placeholders=("*", "<teddy>"), token_for=tf)
    assert out[1] == "<*:1> with <<teddy>:1> and <<teddy>:1>s"
    # replacement text containing a placeholder is never re-replaced
    out = build_spectrum("<a> *", num_stages=1, placeholders=("*", "<a>", "<a>b"), token_for=lambda p, k: "*<a>")
    assert out == ["*<a> *<a>"]
    out = build_spectrum("<a>b", num_stages=1, placeholders=("<a>", "<a>b"), token_for=lambda p, k: p.upper())
    assert out == ["<A>B"]


def test_single_string_placeholder_accepted():
    assert build_spectrum("<t> x", num_stages=1, placeholders="<t>", token_for=tf) == ["<<t>:0> x"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prompt="*", prospect_words=["a"] * 9), r"exactly num_stages=10 entries.*got 9"),
        (dict(prompt="*", prospect_words=["a"] * 11), r"got 11"),
        (dict(prompt="*", prospect_words=[0] * 9 + [10]), r"prospect_words\[9\] = 10 is out of range"),
        (dict(prompt="*", prospect_words=[-1] + [0] * 9), r"prospect_words\[0\] = -1 is out of range"),
        (dict(prompt="*", prospect_words=[True] + [0] * 9), r"prospect_words\[0\] must be a str or an int"),
        (dict(prompt="*", prospect_words=[0, 1.5] + [0] * 8), r"prospect_words\[1\].*float"),
        (dict(prompt="*", prospect_words=[None] * 10), r"prospect_words\[0\].*NoneType"),
        (dict(prompt="a cat", prospect_words=["x"] * 10), r"no '\*'.*prompt='\*'"),
        (dict(prompt="a cat", prospect_words=[0] * 10), r"no placeholder"),
        (dict(prompt="*", prospect_words="abc"), r"must be a list"),
        (dict(prompt="*", prospect_words=["[a:b:0.5"] * 10), r"prospect_words\[0\]: unclosed"),
    ],
)
def test_prospect_words_errors(kwargs, match):
    with pytest.raises(SpectrumError, match=match) as info:
        build_spectrum(token_for=tf, **kwargs)
    assert "\n" not in str(info.value)


def test_int_entries_need_learned_concept():
    with pytest.raises(SpectrumError, match="int entries need a learned concept"):
        build_spectrum("*", list(range(10)))


def test_bad_arguments():
    with pytest.raises(SpectrumError, match="num_stages"):
        build_spectrum("x", num_stages=0)
    with pytest.raises(SpectrumError, match="num_inference_steps"):
        build_spectrum("x", num_inference_steps=0)
    with pytest.raises(SpectrumError, match="placeholders"):
        build_spectrum("x", placeholders=("",), token_for=tf)
    with pytest.raises(SpectrumError, match="prompt must be a str"):
        build_spectrum(None)
    with pytest.raises(SpectrumError, match="returned int"):
        build_spectrum("*", num_stages=1, token_for=lambda p, k: k)
    assert issubclass(SpectrumError, ValueError)


# --- prompt-editing syntax -----------------------------------------------------------------


def test_editing_fraction_maps_to_stages():
    out = resolve_editing("a [cat:dog:0.3]", 10)
    assert out[7:] == ["a cat"] * 3 and out[:7] == ["a dog"] * 7


def test_editing_step_numbers():
    assert resolve_editing("[cat:dog:15]", 10, 50) == resolve_editing("[cat:dog:0.3]", 10)
    assert resolve_editing("[cat:dog:50]", 10, 50) == ["cat"] * 10
    assert resolve_editing("[cat:dog:1]", 10, 50) == ["dog"] * 10  # 0.02 rounds to 0 stages
    with pytest.raises(SpectrumError, match="num_inference_steps"):
        resolve_editing("[cat:dog:15]", 10)
    with pytest.raises(SpectrumError, match="past num_inference_steps=50"):
        resolve_editing("[cat:dog:51]", 10, 50)


def test_editing_rounds_to_nearest_boundary_ties_to_from():
    assert resolve_editing("[a:b:0.25]", 10).count("a") == 3  # 2.5 stages -> 3
    assert resolve_editing("[a:b:0.24]", 10).count("a") == 2
    assert resolve_editing("[a:b:0.35]", 10).count("a") == 4  # exact decimal, no float drift
    assert resolve_editing("[a:b:0.04]", 10).count("a") == 0


def test_editing_short_forms():
    assert resolve_editing("[dog:0.5]", 4) == ["dog", "dog", "", ""]
    assert resolve_editing("[cat::0.5]", 4) == ["", "", "cat", "cat"]
    assert parse_editing("[dog:0.5]") == parse_editing("[:dog:0.5]")


def test_editing_nesting():
    out = resolve_editing("[a:[b:c:0.8]:0.3]", 10)
    assert out == ["c", "c"] + ["b"] * 5 + ["a"] * 3


def test_editing_escapes_and_plain_colons():
    assert resolve_editing(r"style: \[x\] a\:b \| c\\d", 1) == ["style: [x] a:b | c\\d"]
    assert resolve_editing("a | b", 1) == ["a | b"]
    assert resolve_editing(r"C:\path", 1) == [r"C:\path"]


def test_editing_inside_prospect_words_and_with_placeholders():
    words = ["[* cat:dog:0.5]"] * 4
    out = build_spectrum("*", words, num_stages=4, token_for=tf)
    assert out == ["dog", "dog", "<*:2> cat", "<*:3> cat"]
    assert build_spectrum("[*:a dog:0.5]", num_stages=2, token_for=tf) == ["a dog", "<*:1>"]


def test_parse_ast():
    assert parse_editing("x [a:b:0.5]y") == (Text("x "), Edit((Text("a"),), (Text("b"),), 0.5), Text("y"))
    assert parse_editing("") == ()


@pytest.mark.parametrize(
    "text,match",
    [
        ("[word]", "emphasis is not supported"),
        ("[]", "emphasis is not supported"),
        ("[a|b]", "alternation"),
        ("[a:b|c:0.5]", "alternation"),
        ("[a:b:0.5", "unclosed '\\['"),
        ("a [[b:0.5]", "unclosed"),
        ("a]", "unbalanced '\\]'"),
        ("[a:b:0]", "when must be > 0"),
        ("[a:b:-0.5]", "when must be > 0"),
        ("[a:b:c]", "no valid ':when'"),
        ("[a:b:]", "no valid ':when'"),
        ("[a:b:[c:0.5]]", "no valid ':when'"),
        ("[a:b:c:0.5]", "too many ':'"),
        ("[a:b:2.5]", "step number must be whole"),
        ("[a:b:inf]", "no valid ':when'"),
        ("[a:b:1e999]", "when must be > 0"),
        ("[" * 40 + "a", "nested deeper"),
    ],
)
def test_editing_errors(text, match):
    with pytest.raises(SpectrumError, match=match) as info:
        resolve_editing(text, 10, 50)
    assert "\n" not in str(info.value)


def test_unused_branch_still_validated():
    with pytest.raises(SpectrumError, match="past num_inference_steps"):
        resolve_editing("[[a:b:99]:c:0.01]", 10, 50)


# --- files ---------------------------------------------------------------------------------


def test_load_prospect_words_json_and_yaml(tmp_path):
    words = ["a teddy * walking", 3, "plain"]
    (tmp_path / "w.json").write_text(json.dumps(words))
    (tmp_path / "w.yaml").write_text("prospect_words:\n  - '* walking'\n  - 3\n")
    (tmp_path / "w.yml").write_text("- x\n- 0\n")
    assert load_prospect_words(tmp_path / "w.json") == words
    assert load_prospect_words(str(tmp_path / "w.yaml")) == ["* walking", 3]
    assert load_prospect_words(tmp_path / "w.yml") == ["x", 0]


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("a.json", "{not json", "not valid JSON"),
        ("a.yaml", "- *\n", "quote entries that start with"),
        ("a.json", '{"words": []}', "must hold a list"),
        ("a.yaml", "just text", "got str"),
        ("a.json", "[1, true]", "entry 1 must be a str or an int"),
        ("a.yaml", "- 1.5\n", "entry 0"),
        ("a.yaml", "- !!python/object:os.system x\n", "not valid YAML"),
    ],
)
def test_load_prospect_words_errors(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(SpectrumError, match=match) as info:
        load_prospect_words(path)
    assert name in str(info.value) and "\n" not in str(info.value)


def test_load_missing_file(tmp_path):
    with pytest.raises(SpectrumError, match="cannot read"):
        load_prospect_words(tmp_path / "missing.json")


# --- properties ----------------------------------------------------------------------------

_WILD = st.text(alphabet=st.sampled_from(list("ab *:|[]\\.0123456789-e\n")), max_size=40)
_words = st.sampled_from(["cat", "a *", "", "x:y", "[", "]", "|", "\\", "0.5", "*"])


@st.composite
def editing_texts(draw, depth=0):
    """Valid prompt-editing texts (with escapes and nesting)."""
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        if depth < 3 and draw(st.booleans()):
            when = draw(st.one_of(st.sampled_from(["0.3", ".5", "1", "20", "0.999", "1e-3"]),
                                  st.floats(0.001, 0.999).map(repr)))
            before, after = draw(editing_texts(depth + 1)), draw(editing_texts(depth + 1))
            form = draw(st.sampled_from(["[{b}:{a}:{w}]", "[{a}:{w}]", "[{b}::{w}]"]))
            parts.append(form.format(b=before, a=after, w=when))
        else:
            parts.append(format_editing((Text(draw(_words)),)))
    return "".join(parts)


@settings(max_examples=80, deadline=None)
@given(editing_texts())
def test_round_trip_parse_format(text):
    ast = parse_editing(text)
    assert parse_editing(format_editing(ast)) == ast
    assert resolve_editing(format_editing(ast), 7, 20) == resolve_editing(text, 7, 20)


@settings(max_examples=300, deadline=None)
@given(_WILD)
def test_round_trip_on_any_parsable_text(text):
    try:
        ast = parse_editing(text)
    except SpectrumError:
        return
    assert parse_editing(format_editing(ast)) == ast


@settings(max_examples=300, deadline=None)
@given(_WILD, st.integers(1, 12), st.one_of(st.none(), st.integers(1, 60)))
def test_never_crashes_on_arbitrary_text(text, n, steps):
    try:
        out = build_spectrum(text, num_stages=n, token_for=tf, num_inference_steps=steps)
    except SpectrumError as err:
        assert "\n" not in str(err)
        return
    assert len(out) == n and all(isinstance(s, str) for s in out)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30), st.lists(st.one_of(_WILD, st.integers(-2, 12)), min_size=3, max_size=3))
def test_never_crashes_with_arbitrary_prospect_words(prompt, words):
    try:
        out = build_spectrum(prompt, words, num_stages=3, token_for=tf, num_inference_steps=30)
    except SpectrumError:
        return
    assert len(out) == 3 and all(isinstance(s, str) for s in out)
