"""Builds the real Stable Diffusion 1.x CLIP tokenizer files offline, for tests.

The builder lives in the package (``prospect.clip_bpe``), which also wrote the shipped
``prospect/configs/sd-v1/tokenizer`` files; this module keeps the tests' import path.
"""

from __future__ import annotations

from prospect.clip_bpe import vocab_and_merges as _vocab_and_merges  # noqa: F401
from prospect.clip_bpe import write_clip_tokenizer  # noqa: F401
