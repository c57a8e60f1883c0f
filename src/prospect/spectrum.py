"""The prompt spectrum: turn a prompt description into one text per ProSpect stage.

A spectrum is a list of N texts; index i is stage i, with the convention of
:mod:`prospect.stages` (index 0 = the end of generation = small t = texture/style;
index N-1 = the start of generation = layout). There are two ways to write one.

1. ``prospect_words`` as in the official ProSpect README: N entries, entry i for stage i.
   A str entry replaces the prompt's ``*`` (so ``prompt="*"`` takes the entry as the whole
   stage text); placeholders left in it become stage i's learned token. An entry without a
   placeholder is plain text (prompt-to-prompt editing). An int entry k makes stage i use
   the prompt with stage k's learned tokens ("flexible attribute guidance").

2. Automatic1111 prompt-editing syntax, in the prompt and in str entries:
   ``[from:to:when]``, ``[to:when]`` (= ``[:to:when]``) and ``[from::when]``, nestable,
   with ``\\[``, ``\\]``, ``\\:``, ``\\|`` and ``\\\\`` for literal characters. ``when`` is a
   fraction of the generation if ``0 < when < 1``, else a whole step number out of
   ``num_inference_steps``. Generation runs from stage N-1 down to stage 0 and ``from``
   covers its first fraction f, rounded to the nearest stage boundary (ties go to ``from``):
   with k = floor(f*N + 1/2), stage i uses ``from`` iff i >= N - k, else ``to``.
   E.g. ``[cat:dog:0.3]`` with N=10 is 'cat' in stages 9, 8, 7 and 'dog' in stages 0..6.
   Outside brackets ``:`` and ``|`` are plain text; ``[a|b]`` alternation and ``[word]``
   emphasis are not supported.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from dataclasses import dataclass
from fractions import Fraction
from numbers import Integral
from pathlib import Path
from typing import Any, Callable, Sequence, Union

__all__ = [
    "Edit", "SpectrumError", "Text", "build_spectrum", "format_editing",
    "load_prospect_words", "parse_editing", "resolve_editing",
]

MAX_NESTING = 32
_SPECIAL = "\\[]:|"
_ESCAPE = re.compile(r"[\\\[\]:|]")
_NUMBER = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*")


class SpectrumError(ValueError):
    """A prompt spectrum that cannot be built; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Text:
    """Literal text, escapes removed."""

    value: str


@dataclass(frozen=True)
class Edit:
    """``[before:after:when]``: ``before`` for the first ``when`` of the generation, then ``after``."""

    before: tuple[Node, ...]
    after: tuple[Node, ...]
    when: float


Node = Union[Text, Edit]


_BRIEF = reprlib.Repr()  # keyword arguments need Python 3.12
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxdict = 2, 3, 3
_BRIEF.maxstring = _BRIEF.maxother = _BRIEF.maxlong = 40


def _brief(value: Any) -> str:
    """Bounded repr of a user value: a YAML alias bomb must not be expanded just to print it."""
    return _BRIEF.repr(value)


def _show(text: str, limit: int = 60) -> str:
    """Short one-line repr of user text for error messages."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


class _Parser:
    """Recursive-descent parser for the prompt-editing syntax."""

    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def sequence(self, depth: int) -> tuple[Node, ...]:
        """Parse text and brackets up to the end, or up to ']' ':' '|' inside a bracket."""
        nodes: list[Node] = []
        buf: list[str] = []
        text = self.text
        while self.pos < len(text):
            ch = text[self.pos]
            if ch == "\\" and self.pos + 1 < len(text) and text[self.pos + 1] in _SPECIAL:
                buf.append(text[self.pos + 1])
                self.pos += 2
            elif ch == "[":
                if buf:
                    nodes.append(Text("".join(buf)))
                    buf = []
                nodes.append(self.bracket(depth + 1))
            elif ch == "]" and depth == 0:
                raise SpectrumError(
                    f"unbalanced ']' at position {self.pos} in {_show(text)}; escape a literal bracket as \\]"
                )
            elif ch in "]:|" and depth > 0:
                break
            else:
                buf.append(ch)
                self.pos += 1
        if buf:
            nodes.append(Text("".join(buf)))
        return tuple(nodes)

    def bracket(self, depth: int) -> Edit:
        """Parse one ``[...]`` starting at self.pos."""
        start = self.pos
        if depth > MAX_NESTING:
            raise SpectrumError(f"brackets nested deeper than {MAX_NESTING} at position {start} in {_show(self.text)}")
        self.pos += 1
        parts = []
        while True:
            parts.append(self.sequence(depth))
            if self.pos >= len(self.text):
                raise SpectrumError(
                    f"unclosed '[' at position {start} in {_show(self.text)}; close it or escape it as \\["
                )
            sep = self.text[self.pos]
            self.pos += 1
            if sep == "|":
                raise SpectrumError(
                    f"'[a|b]' alternation (position {start} in {_show(self.text)}) is not supported; "
                    "escape a literal '|' as \\|"
                )
            if sep == "]":
                return _make_edit(parts, self.text[start:self.pos])


def _make_edit(parts: list[tuple[Node, ...]], source: str) -> Edit:
    """Build an Edit from the ':'-separated parts of one bracket."""
    if len(parts) == 1:
        raise SpectrumError(
            f"{_show(source)} has no ':when'; A1111 '[word]' emphasis is not supported, "
            "escape literal brackets as \\[ \\]"
        )
    if len(parts) > 3:
        raise SpectrumError(f"{_show(source)} has too many ':'; write [from:to:when] and escape literal ':' as \\:")
    last = parts[-1]
    raw = last[0].value if len(last) == 1 and isinstance(last[0], Text) else format_editing(last)
    match = _NUMBER.fullmatch(raw)
    if not match:
        raise SpectrumError(
            f"{_show(source)} has no valid ':when' (got {_show(raw)}); write [from:to:when] with a number "
            "when, or escape literal brackets as \\[ \\]"
        )
    when = float(match.group(1))
    if not math.isfinite(when) or when <= 0:
        raise SpectrumError(
            f"{_show(source)}: when must be > 0 (a fraction 0<when<1 or a step number), got {raw.strip()}"
        )
    if when >= 1 and not when.is_integer():
        raise SpectrumError(
            f"{_show(source)}: a step number must be whole, got {raw.strip()}; use 0<when<1 for a fraction"
        )
    return Edit(parts[0] if len(parts) == 3 else (), parts[-2], when)


def parse_editing(text: str) -> tuple[Node, ...]:
    """Parse prompt-editing syntax into a tuple of Text / Edit nodes."""
    if not isinstance(text, str):
        raise SpectrumError(f"prompt text must be a str, got {type(text).__name__}")
    return _Parser(text).sequence(0)


def _format_when(when: float) -> str:
    """Write ``when`` so that it parses back to the same float."""
    return str(int(when)) if when >= 1 and when.is_integer() and when < 1e15 else repr(when)


def format_editing(nodes: Sequence[Node]) -> str:
    """Write nodes back as prompt-editing syntax (inverse of parse_editing)."""
    out = []
    for node in nodes:
        if isinstance(node, Text):
            out.append(_ESCAPE.sub(lambda m: "\\" + m.group(0), node.value))
        else:
            out.append(f"[{format_editing(node.before)}:{format_editing(node.after)}:{_format_when(node.when)}]")
    return "".join(out)


def _check_steps(num_inference_steps: Any) -> None:
    """Raise SpectrumError unless num_inference_steps is None or an int >= 1."""
    if num_inference_steps is None:
        return
    steps = num_inference_steps
    if isinstance(steps, bool) or not isinstance(steps, Integral) or steps < 1:
        raise SpectrumError(f"num_inference_steps must be an int >= 1 or None, got {steps!r}")


def _check_num_stages(num_stages: Any) -> None:
    """Raise SpectrumError unless num_stages is an int >= 1."""
    if isinstance(num_stages, bool) or not isinstance(num_stages, Integral) or num_stages < 1:
        raise SpectrumError(f"num_stages must be an int >= 1, got {num_stages!r}")


def _from_stages(edit: Edit, num_stages: int, steps: int | None) -> int:
    """Number k of stages (counted from stage N-1 down) that use ``edit.before``."""
    source = _show(format_editing((edit,)))
    fraction = Fraction(repr(edit.when))
    if edit.when >= 1:
        if steps is None:
            raise SpectrumError(
                f"{source} uses step number {int(edit.when)}; pass num_inference_steps or write a fraction 0<when<1"
            )
        if edit.when > steps:
            raise SpectrumError(f"{source}: step {int(edit.when)} is past num_inference_steps={steps}")
        fraction = Fraction(int(edit.when), int(steps))
    return math.floor(fraction * num_stages + Fraction(1, 2))


def _cuts(nodes: Sequence[Node], num_stages: int, steps: int | None, out: dict) -> dict:
    """Map when -> k for every Edit in the tree (validates all of them, even unused branches)."""
    for node in nodes:
        if isinstance(node, Edit):
            out[node.when] = _from_stages(node, num_stages, steps)
            _cuts(node.before, num_stages, steps, out)
            _cuts(node.after, num_stages, steps, out)
    return out


def _render(nodes: Sequence[Node], stage: int, num_stages: int, cuts: dict) -> str:
    """Plain text of the nodes at one stage."""
    out = []
    for node in nodes:
        if isinstance(node, Text):
            out.append(node.value)
        else:
            branch = node.before if stage >= num_stages - cuts[node.when] else node.after
            out.append(_render(branch, stage, num_stages, cuts))
    return "".join(out)


def resolve_editing(text: str, num_stages: int, num_inference_steps: int | None = None) -> list[str]:
    """The N plain texts (index = stage) that a prompt-editing text stands for."""
    _check_num_stages(num_stages)
    _check_steps(num_inference_steps)
    nodes = parse_editing(text)
    cuts = _cuts(nodes, num_stages, num_inference_steps, {})
    return [_render(nodes, i, num_stages, cuts) for i in range(num_stages)]


def _substituter(placeholders: Sequence[str] | str, token_for: Callable[[str, int], str] | None):
    """A function (text, k) -> text with every placeholder P replaced by token_for(P, k), in one pass."""
    if isinstance(placeholders, str):
        placeholders = (placeholders,)
    placeholders = tuple(placeholders)
    for p in placeholders:
        if not isinstance(p, str) or not p:
            raise SpectrumError(f"placeholders must be non-empty strings, got {p!r}")
    if token_for is None or not placeholders:
        return lambda text, k: text
    pattern = re.compile("|".join(re.escape(p) for p in sorted(set(placeholders), key=len, reverse=True)))

    def substitute(text: str, k: int) -> str:
        def token(match: re.Match) -> str:
            tok = token_for(match.group(0), k)
            if not isinstance(tok, str):
                raise SpectrumError(f"token_for({match.group(0)!r}, {k}) returned {type(tok).__name__}, expected str")
            return tok
        return pattern.sub(token, text)

    return substitute


def _check_words(words: Any, prompt: str, num_stages: int, placeholders: Any, learned: bool) -> list:
    """Validate prospect_words against the prompt and N; return them as a list."""
    if isinstance(words, (str, bytes)) or not hasattr(words, "__iter__"):
        raise SpectrumError(f"prospect_words must be a list of {num_stages} entries, got {type(words).__name__}")
    words = list(words)
    if len(words) != num_stages:
        raise SpectrumError(
            f"prospect_words needs exactly num_stages={num_stages} entries (0 = generation ends), got {len(words)}"
        )
    names = (placeholders,) if isinstance(placeholders, str) else tuple(placeholders)
    for i, word in enumerate(words):
        if isinstance(word, str):
            if "*" not in prompt:
                raise SpectrumError(
                    f"prospect_words[{i}] is text but prompt {_show(prompt)} has no '*' to receive it; "
                    "use prompt='*' to take each entry as the whole stage text"
                )
        elif isinstance(word, Integral) and not isinstance(word, bool):
            if not 0 <= word < num_stages:
                raise SpectrumError(
                    f"prospect_words[{i}] = {_brief(word)} is out of range; int entries must be in [0, {num_stages})"
                )
            if not learned:
                raise SpectrumError(
                    f"prospect_words[{i}] = {word}: int entries need a learned concept; "
                    "pass token_for or use text entries"
                )
            if not any(p in prompt for p in names):
                raise SpectrumError(
                    f"prospect_words[{i}] = {word} but prompt {_show(prompt)} has no placeholder {names!r} to fill"
                )
        else:
            raise SpectrumError(
                f"prospect_words[{i}] must be a str or an int stage index, got {type(word).__name__} {_brief(word)}"
            )
    return words


def build_spectrum(
    prompt: str,
    prospect_words: Sequence[str | int] | None = None,
    *,
    num_stages: int = 10,
    placeholders: Sequence[str] = ("*",),
    token_for: Callable[[str, int], str] | None = None,
    num_inference_steps: int | None = None,
) -> list[str]:
    """The N per-stage texts (index = stage, 0 = generation ends) for a prompt description."""
    _check_num_stages(num_stages)
    _check_steps(num_inference_steps)
    if not isinstance(prompt, str):
        raise SpectrumError(f"prompt must be a str, got {type(prompt).__name__}")
    substitute = _substituter(placeholders, token_for)
    if prospect_words is None:
        return [substitute(t, i) for i, t in enumerate(resolve_editing(prompt, num_stages, num_inference_steps))]
    words = _check_words(prospect_words, prompt, num_stages, placeholders, token_for is not None)
    base: list[str] | None = None
    out = []
    for i, word in enumerate(words):
        if isinstance(word, str):
            try:
                text = resolve_editing(prompt.replace("*", word), num_stages, num_inference_steps)[i]
            except SpectrumError as err:
                raise SpectrumError(f"prospect_words[{i}]: {err}") from None
            out.append(substitute(text, i))
        else:
            base = base if base is not None else resolve_editing(prompt, num_stages, num_inference_steps)
            out.append(substitute(base[i], int(word)))
    return out


MAX_WORDS_BYTES = 1 << 20


def parse_entries(entries: Sequence[str]) -> list[str | int]:
    """Typed prospect_words entries (``--word``, the web app's stage rows): an integer is that stage's token."""
    return [int(e) if re.fullmatch(r"\s*-?\d+\s*", e) else e for e in entries]


def load_prospect_words(path: str | Path) -> list[str | int]:
    """Read prospect_words from a JSON or YAML file: a list, or {"prospect_words": [...]}."""
    import yaml

    path = Path(path)
    try:
        size = path.stat().st_size if path.is_file() else 0
        if size > MAX_WORDS_BYTES:
            raise SpectrumError(f"prospect_words file '{path}' is too large ({size:,} bytes; "
                                f"N short prompts take at most {MAX_WORDS_BYTES:,})")
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SpectrumError(f"cannot read prospect_words file '{path}': {' '.join(str(err).split())}") from None
    try:
        data = json.loads(raw) if path.suffix.lower() == ".json" else yaml.safe_load(raw)
    except (ValueError, yaml.YAMLError) as err:
        hint = "" if path.suffix.lower() == ".json" else " (in YAML, quote entries that start with '*')"
        raise SpectrumError(f"'{path}' is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}{hint}: "
                            f"{' '.join(str(err).split())[:200]}") from None
    if isinstance(data, dict) and "prospect_words" in data:
        data = data["prospect_words"]
    if not isinstance(data, list):
        raise SpectrumError(
            f"'{path}' must hold a list of prospect words or {{\"prospect_words\": [...]}}, got {type(data).__name__}"
        )
    for i, word in enumerate(data):
        if isinstance(word, bool) or not isinstance(word, (str, int)):
            raise SpectrumError(
                f"'{path}': entry {i} must be a str or an int stage index, got {type(word).__name__} {_brief(word)}"
            )
    return data
