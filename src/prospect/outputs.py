"""Writing results: PNGs that carry their generation parameters, grids, all written atomically.

File names are built from indices and seeds only, never from prompt text, so nothing a user
types can steer a file outside the chosen folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from .files import atomic_write, ensure_folder


class OutputError(ValueError):
    """The output folder cannot be written (missing permission, full disk, ...)."""


def ensure_dir(folder: str | Path) -> Path:
    """Create the output folder, or say in one line why it cannot be."""
    try:
        return ensure_folder(folder)
    except OSError as err:
        raise OutputError(str(err)) from err


def save_png(image: Image.Image, path: Path, parameters: dict | None = None) -> Path:
    """Save a PNG atomically, with ``parameters`` as JSON in its "prospect" text chunk."""
    info = PngInfo()
    if parameters is not None:
        info.add_text("prospect", json.dumps(parameters, default=str))
    try:
        atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from err
    return path


def read_parameters(path: str | Path) -> dict:
    """The generation parameters stored in a PNG written by :func:`save_png`."""
    with Image.open(path) as img:
        text = img.text.get("prospect") if hasattr(img, "text") else None
    if text is None:
        raise ValueError(f"{path}: no ProSpect parameters in this image")
    return json.loads(text)


def make_grid(images: list[Image.Image], cols: int | None = None, labels: list[str] | None = None,
              scale: int = 1, label_colours: list[str] | None = None) -> Image.Image:
    """Tile images in a grid (optionally upscaled, nearest neighbour), each with an optional label (black,
    or its entry of ``label_colours``)."""
    if not images:
        raise ValueError("no images to tile")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].width * scale, images[0].height * scale
    pad = 14 if labels else 0
    grid = Image.new("RGB", (cols * w, rows * (h + pad)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, im in enumerate(images):
        x, y = (i % cols) * w, (i // cols) * (h + pad)
        grid.paste(im.convert("RGB").resize((w, h), Image.Resampling.NEAREST), (x, y + pad))
        if labels:
            fill = label_colours[i] if label_colours else "black"
            draw.text((x + 2, y + 1), labels[i][: max(4, w // 6)], fill=fill, font=font)
    return grid
