"""Builds the real Stable Diffusion CLIP tokenizer files offline (vocab.json, merges.txt, configs).

CLIP's BPE list ships in the open-clip-torch wheel (``open_clip/bpe_simple_vocab_16e6.txt.gz``);
vocab.json / merges.txt are derived from it the way CLIP's SimpleTokenizer builds its vocabulary
(49,408 tokens). open_clip is located, never imported. The shipped ``configs/sd-v1/tokenizer``
files were written by this module::

    python -m prospect.clip_bpe src/prospect/configs/sd-v1/tokenizer

SD 1.x pads with ``<|endoftext|>``; SD 2.x (OpenCLIP ViT-H) with ``!`` (id 0): ``--pad-token '!'``.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def bpe_path() -> Path:
    """The gzipped BPE list inside the installed open-clip-torch package (not imported)."""
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "open-clip-torch is needed for the real CLIP vocabulary (pip install open-clip-torch --no-deps)"
        )
    return Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"


@lru_cache(maxsize=1)
def vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's token -> id table and its merge list."""
    lines = gzip.open(bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def tokenizer_configs(pad_token: str = EOS) -> tuple[dict, dict]:
    """tokenizer_config.json and special_tokens_map.json contents of the SD tokenizer."""
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    config = {"model_max_length": 77, **special, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}
    return config, special


def write_clip_tokenizer(folder: Path, pad_token: str = EOS, vocab_files: bool = True) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json.

    ``vocab_files=False`` writes only the two small configs (a tokenizer sharing another's vocabulary).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if vocab_files:
        vocab, merges = vocab_and_merges()
        (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config, special = tokenizer_configs(pad_token)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--pad-token", default=EOS)
    parser.add_argument("--configs-only", action="store_true", help="skip vocab.json / merges.txt")
    args = parser.parse_args(argv)
    print(write_clip_tokenizer(args.folder, args.pad_token, vocab_files=not args.configs_only))


if __name__ == "__main__":
    main()
