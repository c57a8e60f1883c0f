"""The toy attribute world: a seeded renderer of 32x32 images and their captions.

Every image is one object on a plain background. Its attributes sit at known spatial
frequencies: position and shape are low-frequency (layout), colour is a flat mid-level
signal, texture is a 2-3 px pattern (high frequency by construction). The embedded default
model is trained on this world, and :mod:`prospect.toyworld.reader` reads every attribute back.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

RESOLUTION = 32  # pixels; see the model card for why 32 (and not 64)

POSITIONS: dict[str, tuple[float, float]] = {  # name -> (x, y) centre in pixels
    "left": (9.0, 16.0),
    "right": (23.0, 16.0),
    "top": (16.0, 9.0),
    "bottom": (16.0, 23.0),
    "center": (16.0, 16.0),
}
SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
    "purple": (150, 60, 190),
}
TEXTURES = ("plain", "striped", "dotted", "checkered")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "light": (210, 210, 210),
    "dark": (50, 50, 50),
}
ATTRIBUTES = ("position", "shape", "colour", "texture", "background")
CHOICES: dict[str, tuple[str, ...]] = {
    "position": tuple(POSITIONS),
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "texture": TEXTURES,
    "background": tuple(BACKGROUNDS),
}
# The second tone of a textured object: half way from the colour to white.
TINT_MIX = 0.5
HALF_SIZE = 8.0  # half the object's extent in pixels (a 16 px object: see the model card)
JITTER = 1.0  # +- pixels of random offset of the object's centre


def tint(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """The light second tone used by textures."""
    return tuple(int(round(c + (255 - c) * TINT_MIX)) for c in colour)  # type: ignore[return-value]


@dataclass(frozen=True)
class Scene:
    """One object of the world: its attributes and a sub-pixel offset of its centre."""

    position: str = "center"
    shape: str = "circle"
    colour: str = "red"
    texture: str = "plain"
    background: str = "light"
    dx: float = 0.0
    dy: float = 0.0

    def __post_init__(self) -> None:
        for name in ATTRIBUTES:
            value = getattr(self, name)
            if value not in CHOICES[name]:
                raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(CHOICES[name])}")

    def attributes(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in ATTRIBUTES}

    def with_(self, **changes: str) -> "Scene":
        return replace(self, **changes)


def random_scene(rng: np.random.Generator, jitter: float = JITTER) -> Scene:
    """A scene with every attribute drawn uniformly and a uniform jitter of the centre."""
    picks = {name: CHOICES[name][rng.integers(len(CHOICES[name]))] for name in ATTRIBUTES}
    dx, dy = rng.uniform(-jitter, jitter, size=2) if jitter > 0 else (0.0, 0.0)
    return Scene(**picks, dx=float(dx), dy=float(dy))


def shape_mask(shape: str, cx: float, cy: float, size: int = RESOLUTION) -> np.ndarray:
    """Boolean mask of a shape centred at (cx, cy), sampled at pixel centres."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    u, v = xs - cx, ys - cy
    h = HALF_SIZE
    if shape == "circle":
        return u * u + v * v <= h * h
    if shape == "square":
        # As wide as the circle: its corners, 3 px beyond the circle, are what tells them apart.
        return (np.abs(u) <= h) & (np.abs(v) <= h)
    if shape == "triangle":  # apex up, base at the bottom
        inside_y = (v >= -h) & (v <= h)
        half_width = (v + h) / 2.0 * (h + 0.5) / h
        return inside_y & (np.abs(u) <= half_width)
    raise ValueError(f"unknown shape {shape!r}")


def texture_mask(texture: str, size: int = RESOLUTION) -> np.ndarray:
    """Boolean mask of where the second (light) tone goes, fixed to the image grid."""
    ys, xs = np.mgrid[0:size, 0:size]
    if texture == "plain":
        return np.zeros((size, size), dtype=bool)
    if texture == "striped":  # horizontal stripes, 2 px on / 2 px off
        return (ys // 2) % 2 == 1
    if texture == "dotted":  # 2x2 dots every 4 px
        return ((ys % 4) < 2) & ((xs % 4) < 2)
    if texture == "checkered":  # 3 px checker
        return ((ys // 3) + (xs // 3)) % 2 == 1
    raise ValueError(f"unknown texture {texture!r}")


def render(scene: Scene, size: int = RESOLUTION) -> np.ndarray:
    """Render a scene as an HxWx3 uint8 array (no anti-aliasing: exact attributes)."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUNDS[scene.background]
    cx, cy = POSITIONS[scene.position]
    mask = shape_mask(scene.shape, cx + scene.dx, cy + scene.dy, size)
    light = texture_mask(scene.texture, size)
    image[mask & ~light] = COLOURS[scene.colour]
    image[mask & light] = tint(COLOURS[scene.colour])
    return image


def render_pil(scene: Scene, size: int = RESOLUTION) -> Image.Image:
    return Image.fromarray(render(scene, size))


def fill_template(template: str, attributes: dict[str, str]) -> str:
    """An inversion caption template with a scene's words in its named fields ({texture}, {colour}...);
    the bare ``{}`` stays, for the concept's token."""
    return template.format("{}", **attributes)


def caption(scene: Scene, omit: frozenset[str] = frozenset()) -> str:
    """The caption of a scene, e.g. "a striped red triangle on the left, dark background".

    Attributes named in ``omit`` are left out (the shape becomes "shape"), which the model
    sees in training so that partial prompts work.
    """
    words = ["a"]
    if "texture" not in omit:
        words.append(scene.texture)
    if "colour" not in omit:
        words.append(scene.colour)
    words.append("shape" if "shape" in omit else scene.shape)
    if "position" not in omit:
        words += ["on", "the", scene.position]
    text = " ".join(words)
    if "background" not in omit:
        text += f", {scene.background} background"
    return text


def random_caption(scene: Scene, rng: np.random.Generator, p_omit: float) -> str:
    """Caption with each attribute independently omitted with probability ``p_omit``."""
    omit = frozenset(a for a in ATTRIBUTES if rng.random() < p_omit)
    return caption(scene, omit)


def vocabulary() -> list[str]:
    """Every word the world's captions use (for the embedded model's tokenizer)."""
    words = {"a", "on", "the", "shape", "background", ","}
    for name in ATTRIBUTES:
        words.update(CHOICES[name])
    return sorted(words)
