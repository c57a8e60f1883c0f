"""A CLIP BPE tokenizer for the toy world's words, built by the project (no download).

The files follow CLIP's layout (vocab.json + merges.txt): the 256 byte symbols with and
without the end-of-word marker, so any text tokenizes; merges learned by byte-pair encoding
on the world's vocabulary until every world word is a single token; then the two specials.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ...clip_bpe import _bytes_to_unicode
from ..world import vocabulary

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EXTRA_WORDS = ("*", "and", "with", "of", "in", "photo", "image")  # common prompt words


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair encoding until every word is one symbol (ties broken alphabetically)."""
    split = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(p for s in split.values() for p in zip(s, s[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, s in split.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            split[w] = tuple(out)


def write_tokenizer(folder: Path, model_max_length: int = 24) -> Path:
    # captions are at most 12 tokens; 24 (not SD's 77) keeps the text encoder 3x cheaper
    """Write vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({w for w in vocabulary() + list(EXTRA_WORDS) if len(w) > 1})
    merges = learn_merges(words)
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + [BOS, EOS]
    ids = {tok: i for i, tok in enumerate(vocab)}
    (folder / "vocab.json").write_text(json.dumps(ids, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials), encoding="utf-8")
    config = dict(specials, model_max_length=model_max_length, do_lower_case=True,
                  tokenizer_class="CLIPTokenizer")
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder
