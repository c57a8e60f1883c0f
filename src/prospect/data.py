"""Reference images: finding, opening, converting and resizing them for inversion and img2img."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MIN_SIDE = 8  # pixels; smaller images carry nothing to learn from
MAX_PIXELS = 64_000_000  # refuse decompression bombs before decoding them
MAX_SIDE = 8192  # the largest training or generation side accepted, in pixels


class ImageError(ValueError):
    """An input image that cannot be used, with the file and the reason."""


def find_images(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and folders (one level, sorted) into the list of image files."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not inside:
                raise ImageError(f"{path}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); give image "
                                 "files, or a folder that holds some")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise ImageError(f"{path}: no such file or folder")
    if not found:
        raise ImageError("no input images given")
    return found


def open_image(path: str | Path) -> Image.Image:
    """Open any common image as 8-bit RGB (16-bit, CMYK, palette, grey; alpha composited on white)."""
    path = Path(path)
    if path.is_dir():
        raise ImageError(f"{path} is a folder; give an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise ImageError(f"{path}: {img.width}x{img.height} is too large (max {MAX_PIXELS:,} pixels)")
                if img.mode == "F":  # float pixels have no agreed range (and may be NaN)
                    raise ImageError(f"{path}: 32-bit floating-point image; convert it to an 8- or 16-bit PNG or JPEG")
                img = ImageOps.exif_transpose(img)
                img.load()
                rgb = _to_rgb(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{path}: too large, refused before decoding ({str(err).splitlines()[0]})") from err
    except UnidentifiedImageError as err:
        raise ImageError(f"{path}: not an image (empty, or a format Pillow cannot identify); give a PNG, JPEG, "
                         "WebP, BMP, GIF or TIFF file") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{path}: damaged or truncated image ({str(err).splitlines()[0]}); re-export it, or "
                         "leave it out") from err
    if min(rgb.size) < MIN_SIDE:
        raise ImageError(f"{path}: {rgb.width}x{rgb.height} is too small (at least {MIN_SIDE} px a side)")
    return rgb


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bit
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def prepare(image: Image.Image, resolution: int, crop: str = "center") -> Image.Image:
    """Resize to ``resolution`` square: "center" crops to a square first, "none" stretches (official)."""
    if crop == "center":
        side = min(image.size)
        image = ImageOps.fit(image, (side, side), method=Image.Resampling.BICUBIC)
    elif crop != "none":
        raise ValueError(f"crop must be 'center' or 'none', got {crop!r}")
    return image.resize((resolution, resolution), Image.Resampling.BICUBIC)


def size_conditioning(image: Image.Image, resolution: int, crop: str = "center") -> tuple[int, ...]:
    """SDXL's micro-conditioning of an image made by :func:`prepare` (Podell et al. 2023, sec. 2.2): its original
    (height, width), the crop's top-left corner in the frame resized to ``resolution`` on its short side (as
    diffusers' SDXL training scripts count it; 0, 0 when stretched) and the target (height, width)."""
    w, h = image.size
    top = left = 0
    if crop == "center":
        scale = resolution / min(w, h)
        top, left = round((h * scale - resolution) / 2), round((w * scale - resolution) / 2)
    return (h, w, top, left, resolution, resolution)


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB images -> float tensor [B, 3, H, W] in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def rotate_hue(pixels: torch.Tensor, degrees: float) -> torch.Tensor:
    """Pixels [..., 3, H, W] in [-1, 1] with every colour turned ``degrees`` about the grey axis (Rodrigues'
    rotation in RGB): greys, brightness and saturation stay, up to clipping; 120 degrees takes red to green."""
    theta = math.radians(degrees)
    k = torch.full((3,), 1 / math.sqrt(3), dtype=pixels.dtype)
    cross = torch.tensor([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]], dtype=pixels.dtype)
    rot = math.cos(theta) * torch.eye(3, dtype=pixels.dtype) + math.sin(theta) * cross \
        + (1 - math.cos(theta)) * torch.outer(k, k)
    return torch.einsum("ij,...jhw->...ihw", rot, pixels).clamp(-1.0, 1.0)


def shuffle_patches(pixels: torch.Tensor, order: torch.Tensor, grid: int) -> torch.Tensor:
    """Pixels [..., 3, H, W] cut into a ``grid`` x ``grid`` array of patches, put back in ``order`` (a permutation
    of the grid * grid patches, row-major): the colours and the textures inside a patch stay, the shape and the
    layout across patches do not. H and W must be multiples of ``grid``."""
    *lead, c, h, w = pixels.shape
    ph, pw = h // grid, w // grid
    patches = pixels.reshape(*lead, c, grid, ph, grid, pw).movedim(-3, -2).flatten(-4, -3)  # [..., c, g*g, ph, pw]
    patches = patches[..., order, :, :].unflatten(-3, (grid, grid)).movedim(-2, -3)
    return patches.reshape(*lead, c, h, w)
