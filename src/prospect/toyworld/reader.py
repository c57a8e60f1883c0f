"""An analytic (not learned) reader of the toy world's attributes from an image.

It inverts :func:`prospect.world.render` with fixed rules, so that images made by a model can
be scored attribute by attribute: the background from the border, the object as the pixels
nearest a non-background palette colour (edges refined by their mixing ratio with the
background), shape and position by template IoU, colour by a vote of the object's pixels,
texture by the contrast of the light tone on each grid pattern. Every rule tolerates noise,
blur and slightly-off colours (the output of a small model).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image

from . import world

_R = world.RESOLUTION
# Template centres around each position: covers the jitter and some drift of a model's output.
_OFFSETS = np.arange(-2.5, 2.51, 0.5)
# Amplitude of the light tone (0 = none, 1 = full tint) below which an object reads as plain.
_MIN_CONTRAST = 0.2
_COLOUR_NAMES = tuple(world.COLOURS)
# Base colours then their tints: both tones vote for the same colour (index modulo 5).
_PALETTE = np.array(
    [world.COLOURS[c] for c in _COLOUR_NAMES] + [world.tint(world.COLOURS[c]) for c in _COLOUR_NAMES],
    dtype=np.float32,
)
_PATTERNS = np.stack([world.texture_mask(t) for t in world.TEXTURES[1:]])  # plain has no pattern
_CHUNK = 256  # images per vectorised step
_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]

SceneLike = world.Scene | Mapping[str, str]


@dataclass(frozen=True)
class Reading:
    """The attributes read from one image, plus two diagnostics that do not take part in ==."""

    position: str
    shape: str
    colour: str
    texture: str
    background: str
    fit: float = field(default=1.0, compare=False)  # IoU with the best shape template (0: no object)
    contrast: float = field(default=0.0, compare=False)  # light-tone amplitude of the best texture

    def as_dict(self) -> dict[str, str]:
        """The five attributes as a name -> value dict (like ``Scene.attributes()``)."""
        return {name: getattr(self, name) for name in world.ATTRIBUTES}

    def matches(self, target: SceneLike, attributes: Iterable[str] | None = None) -> dict[str, bool]:
        """Per attribute, whether this reading agrees with a scene or a (partial) attribute dict."""
        wanted = target.attributes() if isinstance(target, world.Scene) else dict(target)
        # A partial dict (e.g. from a partial prompt) is only checked on what it names.
        names = tuple(a for a in world.ATTRIBUTES if a in wanted) if attributes is None else tuple(attributes)
        for name in names:
            if name not in world.ATTRIBUTES:
                raise ValueError(f"unknown attribute {name!r}; choose from {', '.join(world.ATTRIBUTES)}")
            if name not in wanted:
                raise ValueError(f"the target has no value for attribute {name!r}")
        return {name: getattr(self, name) == wanted[name] for name in names}


def read(image) -> Reading:
    """Read the attributes of one image (PIL image, HxWx3 uint8 array or float array in [0, 1])."""
    return read_batch([image])[0]


def read_batch(images: Iterable) -> list[Reading]:
    """Read many images at once (a list of images or an NxHxWx3 array); vectorised over the batch."""
    if isinstance(images, (np.ndarray, Image.Image)) and np.ndim(images) == 3:
        raise ValueError("read_batch takes a sequence of images; use read() for a single image")
    arrays = [_as_array(image) for image in images]
    if not arrays:
        return []
    # Chunks keep the per-pixel temporaries small enough to stay in cache.
    return [r for i in range(0, len(arrays), _CHUNK) for r in _read_chunk(np.stack(arrays[i:i + _CHUNK]))]


def _read_chunk(x: np.ndarray) -> list[Reading]:
    """Read an Nx32x32x3 float array on the 0-255 scale."""
    x = x.astype(np.float32)  # ample precision for 0-255 values, and half the memory traffic
    backgrounds, bg_rgb = _backgrounds(x)
    d2 = _distances(x, bg_rgb)
    rough = _object_mask(d2)
    colours = _colours(d2, _core(rough))
    mask = _refined_mask(x, bg_rgb, colours, rough)
    positions, shapes, fit = _shapes(mask)
    textures, contrast = _textures(x, _core(mask), colours)
    return [
        Reading(positions[i], shapes[i], _COLOUR_NAMES[colours[i]], textures[i], backgrounds[i],
                float(fit[i]), float(contrast[i]))
        for i in range(len(x))
    ]


def accuracy(readings: Sequence[Reading], scenes: Sequence[SceneLike]) -> dict[str, float]:
    """Fraction of readings that match their scene, per attribute."""
    if len(readings) != len(scenes):
        raise ValueError(f"got {len(readings)} readings but {len(scenes)} scenes")
    if not readings:
        raise ValueError("accuracy of no readings is undefined")
    hits = [r.matches(s, world.ATTRIBUTES) for r, s in zip(readings, scenes)]
    return {name: sum(h[name] for h in hits) / len(hits) for name in world.ATTRIBUTES}


def _as_array(image) -> np.ndarray:
    """Validate an image and return it as a 32x32x3 float array on the 0-255 scale."""
    if isinstance(image, Image.Image):
        image = image.convert("RGB")  # a PIL mode says what its channels mean, so any mode is fine
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
        raise ValueError(f"expected an HxWx3 RGB image, got an array of shape {array.shape}")
    if np.issubdtype(array.dtype, np.integer):  # (bool is not an integer dtype here)
        if array.min() < 0 or array.max() > 255:
            raise ValueError(f"integer images must lie in 0..255, got {array.min()}..{array.max()}")
        array = array.astype(np.float64)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("the image contains NaN or infinite values")
        # Unclamped model output may overshoot a little; a wider range means another convention.
        if array.min() < -0.1 or array.max() > 1.1:
            raise ValueError(
                f"float images must lie in [0, 1], got {array.min():.3g}..{array.max():.3g} "
                "(convert 0-255 floats to uint8, or map [-1, 1] to [0, 1])"
            )
        array = np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0
    else:
        raise ValueError(f"unsupported image dtype {array.dtype}; use uint8 or float in [0, 1]")
    if array.shape[:2] != (_R, _R):
        # Area averaging undoes integer upscaling exactly and does not alias textures.
        array = np.stack(
            [np.asarray(Image.fromarray(array[..., c].astype(np.float32)).resize((_R, _R), Image.BOX))
             for c in range(3)], axis=-1).astype(np.float64)
    return array


def _backgrounds(x: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Background names and measured colours from the median of the border (never the object)."""
    border = np.concatenate([x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1)
    measured = np.median(border, axis=1)
    refs = np.array(list(world.BACKGROUNDS.values()), dtype=np.float32)
    nearest = np.argmin(((measured[:, None] - refs[None]) ** 2).sum(-1), axis=1)
    names = tuple(world.BACKGROUNDS)
    return [names[i] for i in nearest], measured


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dot product over the last (RGB) axis; spelled out, as numpy reduces a 3-wide axis slowly."""
    return a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1] + a[..., 2] * b[..., 2]


def _distances(x: np.ndarray, bg_rgb: np.ndarray) -> np.ndarray:
    """Squared distance of every pixel to the measured background (index 0) and to the palette."""
    # Per-channel planes: far faster than reducing a 3-wide axis or a 3-deep matrix product.
    r, g, b = np.ascontiguousarray(np.moveaxis(x, -1, 0))
    tones = [bg_rgb[:, None, None, :]] + list(_PALETTE)
    d2 = [(r - t[..., 0]) ** 2 + (g - t[..., 1]) ** 2 + (b - t[..., 2]) ** 2 for t in tones]
    return np.stack(d2, axis=-1)


def _object_mask(d2: np.ndarray) -> np.ndarray:
    """Pixels nearer to an object colour than to the measured background, cleaned of specks."""
    return _clean(np.argmin(d2, axis=-1) > 0)


def _refined_mask(x: np.ndarray, bg_rgb: np.ndarray, colours: np.ndarray, rough: np.ndarray) -> np.ndarray:
    """The rough mask with its edge pixels kept only if at least half object, half background."""
    # Blur mixes edges with the background, and on a light background a half mix of base and
    # background is near the tint: nearest-colour swells the shape, a mixing ratio does not.
    # The ratio is read on the background -> base or background -> tint line, whichever fits.
    p = x - bg_rgb[:, None, None]
    alpha, residual = np.zeros(x.shape[:3], np.float32), np.full(x.shape[:3], np.inf, np.float32)
    for tone in (_PALETTE[colours], _PALETTE[colours + len(_COLOUR_NAMES)]):
        d = (tone - bg_rgb)[:, None, None]
        a = np.clip(_dot(p, d) / np.maximum(_dot(d, d), 1.0), 0.0, 1.0)
        r = _dot(p, p) - a * (2 * _dot(p, d) - a * _dot(d, d))  # |p - a d|^2, expanded
        alpha, residual = np.where(r < residual, a, alpha), np.minimum(r, residual)
    return _clean(rough & ((alpha >= 0.5) | _core(rough)))


def _clean(mask: np.ndarray) -> np.ndarray:
    """The mask without lone pixels and with surrounded holes filled (noise flips both ways)."""
    p = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    h, w = mask.shape[1:]
    n = sum(p[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w].astype(np.int32) for dy, dx in _NEIGHBOURS)
    return (mask & (n >= 1)) | (n >= 6)


def _core(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 4-neighbours are all in the mask (edges mix with the background)."""
    p = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    core = mask & p[:, :-2, 1:-1] & p[:, 2:, 1:-1] & p[:, 1:-1, :-2] & p[:, 1:-1, 2:]
    # A tiny object has no interior: fall back on the whole mask.
    return np.where(core.sum(axis=(1, 2), keepdims=True) >= 4, core, mask)


@lru_cache(maxsize=1)
def _templates() -> list[tuple[str, np.ndarray, np.ndarray, list[str]]]:
    """Per position: the pixels its templates can cover, the templates on them, their shapes."""
    out = []
    for position, (cx, cy) in world.POSITIONS.items():
        masks, shapes = [], []
        for shape in world.SHAPES:
            for dy in _OFFSETS:
                for dx in _OFFSETS:
                    masks.append(world.shape_mask(shape, cx + dx, cy + dy).ravel())
                    shapes.append(shape)
        stack = np.array(masks)
        window = stack.any(axis=0)  # cropping to it makes the products 3x smaller, IoU unchanged
        out.append((position, window, stack[:, window].astype(np.float32), shapes))
    return out


def _shapes(mask: np.ndarray) -> tuple[list[str], list[str], np.ndarray]:
    """Position, shape and IoU of the best-matching template (IoU is robust to ragged edges)."""
    m = mask.reshape(len(mask), -1)
    area = m.sum(axis=1, keepdims=True).astype(np.float32)
    ious, labels = [], []
    for position, window, templates, shapes in _templates():
        inter = m[:, window].astype(np.float32) @ templates.T
        ious.append(inter / np.maximum(area + templates.sum(axis=1) - inter, 1.0))
        labels += [(position, shape) for shape in shapes]
    iou = np.concatenate(ious, axis=1)
    best = np.argmax(iou, axis=1)
    return [labels[b][0] for b in best], [labels[b][1] for b in best], iou[np.arange(len(m)), best]


def _colours(d2: np.ndarray, core: np.ndarray) -> np.ndarray:
    """Index of the colour that most object pixels are nearest to (base or tint alike)."""
    votes = np.argmin(d2[..., 1:], axis=-1) % len(_COLOUR_NAMES)
    k = len(_COLOUR_NAMES)
    owner = np.broadcast_to(np.arange(len(votes))[:, None, None], votes.shape)
    counts = np.bincount((owner * k + votes)[core], minlength=len(votes) * k).reshape(-1, k)
    return np.argmax(counts, axis=1)


def _textures(x: np.ndarray, core: np.ndarray, colours: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Texture whose light-tone pattern has the largest contrast inside the object."""
    base, light = _PALETTE[colours], _PALETTE[colours + len(_COLOUR_NAMES)]
    d = light - base
    # Position of each pixel on the base -> tint line (0 = base, 1 = tint); clipped against outliers.
    t = _dot(x - base[:, None, None], d[:, None, None]) / _dot(d, d)[:, None, None]
    t = np.clip(t, -0.5, 1.5)
    on = core[:, None] & _PATTERNS[None]
    off = core[:, None] & ~_PATTERNS[None]
    n_on, n_off = on.sum(axis=(2, 3)), off.sum(axis=(2, 3))
    mean_on = (t[:, None] * on).sum(axis=(2, 3)) / np.maximum(n_on, 1)
    mean_off = (t[:, None] * off).sum(axis=(2, 3)) / np.maximum(n_off, 1)
    contrast = np.where((n_on > 0) & (n_off > 0), mean_on - mean_off, 0.0)
    best = np.argmax(contrast, axis=1)
    amplitude = contrast[np.arange(len(x)), best]
    names = [world.TEXTURES[1 + b] if a >= _MIN_CONTRAST else "plain" for b, a in zip(best, amplitude)]
    return names, amplitude
