"""A learned ProSpect concept: one token embedding per denoising stage, its file format, and adding it to a model.

Stage k covers the k-th slice of the training timesteps, so stage 0 holds the smallest timesteps
(the last denoising steps) and stage N-1 the largest (the first steps of generation).

A stage may hold several vectors (``vectors_per_stage`` V, as diffusers' ``--num_vectors``): its
token then stands for V consecutive prompt tokens ``<*:s3> <*:s3:1> ... <*:s3:V-1>``.

An SDXL concept has each token in both text encoders: ``embeddings`` are its rows in the first
(CLIP ViT-L, ``clip_l``, 768 wide) and ``embeddings_2`` in the second (OpenCLIP bigG, ``clip_g``, 1280).

File format (``Concept.save``): a safetensors file with float32 tensors and string metadata
``format="prospect-concept"``, ``format_version``, ``family``, ``num_stages``, ``vectors_per_stage``,
``dim``, ``num_train_timesteps``, ``placeholder``, ``initializer``, ``base_model``:

- version 1: SD 1.x/2.x, one tensor ``"embeddings"`` [num_stages, dim] (one vector per stage);
- version 2: SD 1.x/2.x, ``"embeddings"`` [num_stages, V, dim] (V > 1 vectors per stage);
- version 3: SDXL, ``"clip_l"`` [num_stages, V, dim] and ``"clip_g"`` [num_stages, V, dim_2] (the
  names of diffusers' and A1111's SDXL embeddings), ``family="sdxl"`` and ``dim_2``.

Pickle-based files (.pt/.bin/.ckpt) are refused: unpickling can run arbitrary code.
"""

from __future__ import annotations

import json
import os
import re
import struct
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from .files import atomic_write_bytes

FORMAT = "prospect-concept"
FORMAT_VERSION = 3  # the newest version this code reads; SD 1.x/2.x files are still written as 1 or 2
FAMILIES = {"sd": "SD 1.x/2.x (one text encoder)", "sdxl": "SDXL (two text encoders)"}
SDXL_KEYS = ("clip_l", "clip_g")  # the encoders' names in SDXL embedding files (diffusers, A1111, ComfyUI)
_MAX_FILE_BYTES = 256 * 2**20  # embedding files are kilobytes; refuse to read whole checkpoints


class ConceptError(ValueError):
    """A concept file, placeholder or model does not fit."""


def check_placeholder(placeholder: str) -> str:
    """Return the placeholder if usable as part of a single added token, else raise."""
    if not isinstance(placeholder, str) or not placeholder.strip():
        raise ConceptError(f"placeholder must be a non-empty word, got {placeholder!r}")
    if any(ch.isspace() for ch in placeholder):
        raise ConceptError(f"placeholder must not contain whitespace, got {placeholder!r}")
    return placeholder


def stage_token(placeholder: str, stage: int, vector: int = 0) -> str:
    """The added-token string for one stage: ``<{placeholder}:s{stage}>``, lower-cased.

    ``*`` -> ``<*:s3>``, ``<teddy>`` -> ``<<teddy>:s3>``. The angle brackets and ``:s`` suffix make
    it something nobody types by accident; the closing ``>`` keeps ``<*:s1>`` from being a prefix
    of ``<*:s10>``. It is lower-cased (after NFC) because CLIP lower-cases prompts before matching
    added tokens, so ``Teddy`` and ``teddy`` name the same tokens. Vector v > 0 of a stage with
    several vectors is ``<*:s3:v>``.
    """
    check_placeholder(placeholder)
    for name, value in (("stage", stage), ("vector", vector)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConceptError(f"{name} must be a non-negative integer, got {value!r}")
    tail = f":{vector}" if vector else ""
    return f"<{unicodedata.normalize('NFC', placeholder).lower()}:s{stage}{tail}>"


@dataclass
class Concept:
    """N per-stage token embeddings (V vectors each) learned for one placeholder."""

    placeholder: str = "*"
    embeddings: torch.Tensor = None  # [num_stages, dim] or [num_stages, V, dim]; required, None only to allow keyword use
    num_train_timesteps: int = 1000
    initializer: str = ""
    base_model: str = ""  # a name (folder or file name, or the model's hub id), never a local path
    base_model_fingerprint: str = ""  # of the base model's token embeddings (see prospect.loading.fingerprint)
    embeddings_2: torch.Tensor | None = None  # SDXL: the same tokens' rows in the second text encoder (clip_g)

    def __post_init__(self) -> None:
        """Validate fields and store the embeddings as detached float32 CPU tensors."""
        check_placeholder(self.placeholder)
        self.embeddings = _checked_table(self.embeddings, "embeddings")
        if self.embeddings_2 is not None:
            self.embeddings_2 = _checked_table(self.embeddings_2, "embeddings_2")
            if self.embeddings_2.shape[:-1] != self.embeddings.shape[:-1]:
                raise ConceptError(f"embeddings_2 {tuple(self.embeddings_2.shape)} must have the stages and vectors of "
                                   f"embeddings {tuple(self.embeddings.shape)}")
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < self.num_stages:
            raise ConceptError(
                f"num_train_timesteps {self.num_train_timesteps!r} must be an int >= num_stages {self.num_stages}"
            )
        self.base_model = _shareable_name(self.base_model)

    @property
    def family(self) -> str:
        """The model family it belongs to: "sd" (SD 1.x/2.x) or "sdxl" (a row in each of two text encoders)."""
        return "sd" if self.embeddings_2 is None else "sdxl"

    @property
    def tables(self) -> list[torch.Tensor]:
        """The embeddings of each text encoder the concept has rows in, in the model's encoder order."""
        return [self.embeddings] + ([] if self.embeddings_2 is None else [self.embeddings_2])

    @property
    def widths(self) -> str:
        """Each text encoder's embedding width, e.g. "768" or, for SDXL, "768 + 1280"."""
        return " + ".join(str(t.shape[-1]) for t in self.tables)

    def described(self) -> str:
        """The family and widths in words, for errors: e.g. "an SDXL (two text encoders) concept (768 + 1280 wide)"."""
        return f"{'an' if self.family == 'sdxl' else 'a'} {FAMILIES[self.family]} concept ({self.widths} wide)"

    @property
    def num_stages(self) -> int:
        """Number of stages N."""
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        """Text embedding width."""
        return self.embeddings.shape[-1]

    @property
    def format_version(self) -> int:
        """The file format version ``save`` writes: SD 1 for one vector per stage (readable by older versions), else 2;
        SDXL 3."""
        if self.family == "sdxl":
            return 3
        return 1 if self.vectors_per_stage == 1 else 2

    @property
    def vectors_per_stage(self) -> int:
        """V, the number of prompt tokens one stage's token stands for."""
        return 1 if self.embeddings.ndim == 2 else self.embeddings.shape[1]

    def stage_vectors(self, stage: int, encoder: int = 0) -> torch.Tensor:
        """The [V, dim] vectors of one stage (in text encoder ``encoder``: 1 is SDXL's second)."""
        self.token(stage)  # range check
        table = self._table(encoder)
        return table[stage].reshape(self.vectors_per_stage, table.shape[-1])

    def rows(self, encoder: int = 0) -> torch.Tensor:
        """All vectors as [num_stages * V, dim] rows, in the order of ``tokens()`` (of text encoder ``encoder``)."""
        table = self._table(encoder)
        return table.reshape(-1, table.shape[-1])

    def stage_file(self, stage: int) -> dict[str, torch.Tensor]:
        """One stage as the embedding file A1111, Forge and ComfyUI read: {"emb_params": [V, dim]}, or for
        SDXL {"clip_l": [V, dim], "clip_g": [V, dim_2]}."""
        if self.family == "sd":
            return {"emb_params": self.stage_vectors(stage).clone()}
        return {key: self.stage_vectors(stage, i).clone() for i, key in enumerate(SDXL_KEYS)}

    def _table(self, encoder: int) -> torch.Tensor:
        if encoder not in range(len(self.tables)):
            raise ConceptError(f"{self.described()} has no rows for text encoder {encoder}")
        return self.tables[encoder]

    def token(self, stage: int) -> str:
        """The added token for one stage (its first vector's)."""
        if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < self.num_stages:
            raise ConceptError(f"stage {stage} out of range for a {self.num_stages}-stage concept")
        return stage_token(self.placeholder, stage)

    def stage_tokens(self, stage: int) -> list[str]:
        """The V added tokens of one stage."""
        self.token(stage)
        return [stage_token(self.placeholder, stage, v) for v in range(self.vectors_per_stage)]

    def prompt_text(self, stage: int) -> str:
        """What the placeholder becomes in a prompt of this stage: its V tokens, space-separated."""
        return " ".join(self.stage_tokens(stage))

    def tokens(self) -> list[str]:
        """All added tokens, stage 0 first, each stage's V vectors in order."""
        return [tok for k in range(self.num_stages) for tok in self.stage_tokens(k)]

    def metadata(self) -> dict[str, str]:
        """The safetensors metadata written by ``save``."""
        meta = {
            "format": FORMAT, "format_version": str(self.format_version), "num_stages": str(self.num_stages),
            "dim": str(self.dim), "num_train_timesteps": str(self.num_train_timesteps),
            "placeholder": self.placeholder, "initializer": self.initializer, "base_model": self.base_model,
        }
        if self.base_model_fingerprint:
            meta["base_model_fingerprint"] = self.base_model_fingerprint
        if self.vectors_per_stage > 1 or self.family == "sdxl":  # version 1 files stay as version-1 readers expect
            meta["vectors_per_stage"] = str(self.vectors_per_stage)
        if self.family == "sdxl":  # older readers refuse version 3 by its number
            meta.update(family="sdxl", dim_2=str(self.embeddings_2.shape[-1]))
        return meta

    def save(self, path: str | os.PathLike) -> Path:
        """Write the concept atomically as safetensors; returns the path."""
        if self.family == "sd":
            tensors = {"embeddings": self.embeddings}
        else:  # always [N, V, dim]: a reader need not guess whether a middle axis is there
            shape = (self.num_stages, self.vectors_per_stage, -1)
            tensors = {key: t.reshape(shape).contiguous() for key, t in zip(SDXL_KEYS, self.tables)}
        data = safetensors.torch.save(tensors, metadata=self.metadata())
        return _atomic_write(Path(path), data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Concept:
        """Read a concept saved by ``save``, validating format, metadata and shapes."""
        tensors, meta = _read_safetensors(Path(path))
        if meta.get("format") != FORMAT:
            raise ConceptError(f"{path} is not a ProSpect concept file (format {meta.get('format')!r})")
        version = _meta_int(meta, "format_version", path)
        if version > FORMAT_VERSION:
            raise ConceptError(f"{path} has format version {version}; this prospect reads up to {FORMAT_VERSION}")
        family = meta.get("family", "sd")
        if family not in FAMILIES:
            raise ConceptError(f"{path}: unknown model family {family!r} (this prospect knows {', '.join(FAMILIES)})")
        names = ["embeddings"] if family == "sd" else list(SDXL_KEYS)
        if set(tensors) != set(names):
            raise ConceptError(f"{path} must hold exactly the tensors {names} ({FAMILIES[family]}), found {sorted(tensors)}")
        vectors = _meta_int(meta, "vectors_per_stage", path) if "vectors_per_stage" in meta else 1
        dims = [_meta_int(meta, key, path) for key in ("dim", "dim_2")[:len(names)]]
        for name, dim in zip(names, dims):
            middle = (vectors,) if vectors > 1 or family == "sdxl" else ()
            expected = (_meta_int(meta, "num_stages", path), *middle, dim)
            if tuple(tensors[name].shape) != expected:
                raise ConceptError(f"{path}: {name} shape {tuple(tensors[name].shape)} does not match metadata {expected}")
        try:
            return cls(
                placeholder=meta.get("placeholder", ""), embeddings=tensors[names[0]],
                num_train_timesteps=_meta_int(meta, "num_train_timesteps", path),
                initializer=meta.get("initializer", ""), base_model=meta.get("base_model", ""),
                base_model_fingerprint=meta.get("base_model_fingerprint", ""),
                embeddings_2=tensors[names[1]] if family == "sdxl" else None,
            )
        except ConceptError as err:
            raise ConceptError(err if str(path) in str(err) else f"{path}: {err}") from None

    @classmethod
    def from_textual_inversion(
        cls, path: str | os.PathLike, num_stages: int = 10, placeholder: str | None = None
    ) -> Concept:
        """Import a diffusers or A1111 textual-inversion safetensors file as a concept.

        One vector is repeated in every stage; ``num_stages`` vectors become one per stage. The
        placeholder defaults to the diffusers token (e.g. ``<cat-toy>``) or the A1111 file stem. An SDXL
        file ({"clip_l", "clip_g"}) becomes an SDXL concept.
        """
        path = Path(path)
        tensors, _ = _read_safetensors(path)
        if set(tensors) == set(SDXL_KEYS):
            tables = [_stages_from(path, tensors[key], num_stages) for key in SDXL_KEYS]
            if len(tables[0]) != len(tables[1]):
                raise ConceptError(f"{path}: clip_l holds {len(tables[0])} vectors but clip_g {len(tables[1])}")
            return cls(placeholder=placeholder or path.stem, embeddings=tables[0], embeddings_2=tables[1])
        if "emb_params" in tensors:  # A1111 / kohya safetensors layout
            name, vectors = path.stem, tensors["emb_params"]
        elif len(tensors) == 1:  # diffusers layout: {token: tensor}
            name, vectors = next(iter(tensors.items()))
        else:
            raise ConceptError(f"{path}: not a single-encoder textual inversion (tensors {sorted(tensors)})")
        return cls(placeholder=placeholder or name, embeddings=_stages_from(path, vectors, num_stages))


def _stages_from(path: Path, vectors: torch.Tensor, num_stages: int) -> torch.Tensor:
    """[num_stages, dim] from one textual-inversion vector (repeated) or ``num_stages`` vectors."""
    vectors = vectors.reshape(1, -1) if vectors.ndim == 1 else vectors
    if vectors.ndim != 2 or len(vectors) not in (1, num_stages):
        raise ConceptError(f"{path}: {tuple(vectors.shape)} vectors; expected 1 or num_stages={num_stages}")
    return vectors.expand(num_stages, -1)


def _checked_table(emb, name: str) -> torch.Tensor:
    """A concept's embeddings, validated: [num_stages, dim] or [num_stages, V, dim], finite floats, float32 on the CPU."""
    if not isinstance(emb, torch.Tensor) or emb.ndim not in (2, 3) or 0 in emb.shape:
        shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
        raise ConceptError(f"{name} must be a non-empty [num_stages, dim] or [num_stages, V, dim] tensor, got {shape}")
    if emb.ndim == 3 and emb.shape[1] == 1:  # one vector per stage has one layout only
        emb = emb[:, 0]
    if not emb.is_floating_point():
        raise ConceptError(f"{name} must be floating-point values, got {str(emb.dtype).replace('torch.', '')}")
    if not torch.isfinite(emb).all():
        raise ConceptError(f"{name} hold NaN or infinite values; retrain the concept (with a lower lr)")
    return emb.detach().to("cpu", torch.float32).contiguous().clone()


def _shareable_name(name_or_path: str) -> str:
    """What a concept records of its base model: a hub id as it is, a local path by its last part only
    (a shared concept must not carry the trainer's folders)."""
    name = str(name_or_path or "").strip()
    if name.startswith(("/", "~", ".", "\\")) or re.match(r"^[A-Za-z]:[\\/]", name) or name.count("/") > 1:
        return Path(name.replace("\\", "/")).name
    return name


def _meta_int(meta: dict[str, str], key: str, path) -> int:
    """A required integer metadata field."""
    try:
        return int(meta[key])
    except (KeyError, ValueError):
        raise ConceptError(f"{path}: metadata field {key!r} missing or not an integer") from None


def _atomic_write(path: Path, data: bytes) -> Path:
    """Write bytes atomically (:func:`prospect.files.atomic_write`), or raise one ConceptError line."""
    if not path.parent.is_dir():
        raise ConceptError(f"cannot write {path}: directory {path.parent} does not exist")
    try:
        return atomic_write_bytes(path, data)
    except OSError as e:
        raise ConceptError(f"cannot write {path}: {e.strerror or e}") from e


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file after checking its magic bytes; never unpickles anything."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
            kind = _sniff(head, size)
            if kind:
                raise ConceptError(f"{path} is a {kind}; refusing to unpickle it (only safetensors files are read)")
            if size > _MAX_FILE_BYTES:
                raise ConceptError(f"{path} is {size} bytes, too large for an embedding file")
            data = head + f.read()
    except OSError as e:
        raise ConceptError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        tensors = safetensors.torch.load(data)
    except Exception as e:  # noqa: BLE001 - any parse failure means a damaged file
        raise ConceptError(f"{path} is not a valid safetensors file ({type(e).__name__}: {e})") from None
    meta = header.get("__metadata__") or {}
    return tensors, meta


def _sniff(head: bytes, size: int) -> str:
    """Name a pickle-based format from its first bytes, or '' if it may be safetensors."""
    # safetensors: u64 little-endian header length, then a JSON object; checked first because a
    # header length of 128 (+256k) also starts with byte 0x80, pickle's PROTO opcode.
    if len(head) == 9 and head[8:9] == b"{" and 8 + struct.unpack("<Q", head[:8])[0] <= size:
        return ""
    if head.startswith(b"PK\x03\x04"):
        return "zip archive (PyTorch .pt/.bin/.ckpt checkpoint with pickled data)"
    # Protocol 2+ pickles open with PROTO (0x80); protocol 0/1 with MARK, EMPTY_DICT/LIST or GLOBAL.
    if head[:1] in (b"\x80", b"(", b"}", b"]", b"c"):
        return "pickle file (legacy PyTorch checkpoint)"
    return ""


def model_family(pipe) -> str:
    """"sdxl" for a pipeline with two text encoders, else "sd"."""
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd"


def text_encoders(pipe) -> list[tuple]:
    """The (tokenizer, text encoder) pairs a concept of ``pipe``'s family has rows in, in encoder order."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if model_family(pipe) == "sdxl":
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def check_family(pipe, concept: Concept) -> None:
    """Refuse, in one line naming both, a concept of the other model family than ``pipe``'s."""
    family = model_family(pipe)
    if concept.family != family:
        raise ConceptError(f"concept {concept.placeholder!r} is {concept.described()} but the model is "
                           f"{FAMILIES[family]}; learn the concept on this model (prospect train)")


def add_to_pipeline(pipe, concept: Concept) -> list[list[int]]:
    """Add the concept's stage tokens to every text encoder of ``pipe`` (both for SDXL), after
    :func:`check_family`. Returns each encoder's token ids."""
    check_family(pipe, concept)
    return [add_concept(tok, enc, concept, i) for i, (tok, enc) in enumerate(text_encoders(pipe))]


def add_concept(tokenizer, text_encoder, concept: Concept, encoder: int = 0) -> list[int]:
    """Add (or overwrite) the concept's stage tokens and its rows of text encoder ``encoder`` (1: SDXL's second);
    returns ids in ``concept.tokens()`` order."""
    weight = text_encoder.get_input_embeddings().weight
    rows = concept.rows(encoder)
    if weight.shape[1] != rows.shape[1]:
        raise ConceptError(
            f"concept dim {rows.shape[1]} does not match the model's text embedding dim {weight.shape[1]} "
            f"(concept was learned on {concept.base_model or 'an unknown model'})"
        )
    tokens = concept.tokens()
    vocab = tokenizer.get_vocab()
    tokenizer.add_tokens([t for t in tokens if t not in vocab])
    ids = tokenizer.convert_tokens_to_ids(tokens)
    for tok, tid in zip(tokens, ids):
        # Guards against a tokenizer that splits or normalises the token differently than expected.
        if tokenizer(tok, add_special_tokens=False).input_ids != [tid]:
            raise ConceptError(f"stage token {tok!r} does not tokenize to a single token with this tokenizer")
    if max(ids) >= weight.shape[0]:
        # mean_resizing=False: the new rows are overwritten below, so skip the covariance pass.
        size = max(len(tokenizer), max(ids) + 1)
        text_encoder.resize_token_embeddings(size, pad_to_multiple_of=None, mean_resizing=False)
        weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[torch.tensor(ids)] = rows.to(weight.device, weight.dtype)
    return ids


def init_embeddings(tokenizer, text_encoder, initializer: str, num_stages: int, vectors: int = 1) -> torch.Tensor:
    """Initial rows, [num_stages, dim] (or [num_stages, V, dim]): the initializer's embedding, or the mean
    over its tokens if several; with V vectors and an initializer of exactly V tokens, vector v starts
    from token v (e.g. a caption skeleton), else every vector from the mean."""
    if num_stages < 1 or vectors < 1:
        raise ConceptError(f"num_stages and vectors must be >= 1, got {num_stages}, {vectors}")
    ids = tokenizer(initializer or "", add_special_tokens=False).input_ids
    special = set(tokenizer.all_special_ids)
    if not ids or any(i in special for i in ids):
        raise ConceptError(f"initializer {initializer!r} does not tokenize to any ordinary token")
    table = text_encoder.get_input_embeddings().weight.detach()[torch.tensor(ids)].float().cpu()
    if vectors > 1:
        rows = table if len(ids) == vectors else table.mean(0).expand(vectors, -1)
        return rows.expand(num_stages, -1, -1).clone()
    return table.mean(0).expand(num_stages, -1).clone()  # multi-token words: average their meaning
