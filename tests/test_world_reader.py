"""The analytic attribute reader: exact on clean renders, robust on model-like (noisy, soft) ones."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from prospect.toyworld import world
from prospect.toyworld.reader import Reading, accuracy, read, read_batch


def _scenes(n: int, seed: int) -> list[world.Scene]:
    rng = np.random.default_rng(seed)
    return [world.random_scene(rng) for _ in range(n)]


def _renders(scenes: list[world.Scene]) -> np.ndarray:
    """Renders as an NxHxWx3 float array in [0, 1] (the layout of a pipeline's np output)."""
    return np.stack([world.render(s) for s in scenes]).astype(np.float64) / 255.0


def _blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an NxHxWx3 batch (edges replicated)."""
    r = np.arange(-2, 3)
    k = np.exp(-(r**2) / (2 * sigma**2))
    k /= k.sum()
    h, w = images.shape[1:3]
    p = np.pad(images, ((0, 0), (2, 2), (0, 0), (0, 0)), mode="edge")
    out = sum(k[i] * p[:, i:i + h] for i in range(5))
    p = np.pad(out, ((0, 0), (0, 0), (2, 2), (0, 0)), mode="edge")
    return sum(k[i] * p[:, :, i:i + w] for i in range(5))


def _assert_at_least(acc: dict[str, float], floor: float) -> None:
    assert set(acc) == set(world.ATTRIBUTES)
    low = {name: value for name, value in acc.items() if value < floor}
    assert not low, f"below {floor}: {low} (all: {acc})"


def test_clean_renders_are_read_correctly():
    scenes = _scenes(2000, seed=0)
    readings = read_batch(_renders(scenes))
    _assert_at_least(accuracy(readings, scenes), 0.99)
    # Shape templates exist at the rendered jitter only to 0.5 px, so the fit is high, not 1.
    assert min(r.fit for r in readings) > 0.85


def test_noisy_renders_are_read_robustly():
    scenes = _scenes(1000, seed=1)
    rng = np.random.default_rng(11)
    images = _renders(scenes) + rng.normal(0.0, 8 / 255, (len(scenes), 32, 32, 3))
    _assert_at_least(accuracy(read_batch(np.clip(images, 0.0, 1.0)), scenes), 0.95)


def test_model_like_renders_are_read_robustly():
    """Soft edges (0.5 px blur), colours off by up to 15 levels per channel, and noise."""
    scenes = _scenes(600, seed=2)
    rng = np.random.default_rng(12)
    images = _blur(_renders(scenes), 0.5)
    images = images + rng.uniform(-15, 15, (len(scenes), 1, 1, 3)) / 255
    images = images + rng.normal(0.0, 8 / 255, images.shape)
    _assert_at_least(accuracy(read_batch(np.clip(images, 0.0, 1.0)), scenes), 0.95)


@pytest.mark.parametrize(
    "scene",
    [
        world.Scene("left", "triangle", "yellow", "striped", "dark", dx=0.3, dy=-0.4),
        world.Scene("right", "square", "purple", "checkered", "light", dx=-1.0, dy=1.0),
        world.Scene("top", "circle", "blue", "dotted", "dark"),
        world.Scene("bottom", "square", "green", "plain", "light", dx=0.9, dy=-0.9),
        world.Scene("center", "circle", "red", "plain", "dark"),
    ],
)
def test_hand_checked_scenes(scene):
    reading = read(world.render(scene))
    assert reading.as_dict() == scene.attributes()
    assert all(reading.matches(scene).values())
    # The light tone is exactly the tint, so its contrast is 1 on the right pattern, 0 when plain.
    assert reading.contrast == pytest.approx(0.0 if scene.texture == "plain" else 1.0, abs=1e-9)
    if scene.dx == scene.dy == 0:
        assert reading.fit == pytest.approx(1.0)  # a template sits exactly on the object


def test_input_kinds_agree():
    scene = world.Scene("right", "triangle", "green", "dotted", "light", dx=0.4, dy=0.7)
    array = world.render(scene)
    pil = Image.fromarray(array)
    expected = scene.attributes()
    assert read(array).as_dict() == expected
    assert read(array / 255.0).as_dict() == expected
    assert read(array.astype(np.float32) / 255.0).as_dict() == expected
    assert read(pil).as_dict() == expected
    assert read(pil.convert("RGBA")).as_dict() == expected  # PIL modes are converted
    assert read(pil.resize((64, 64), Image.NEAREST)).as_dict() == expected
    assert read(np.kron(array, np.ones((2, 2, 1), dtype=np.uint8))).as_dict() == expected
    assert read(pil.resize((64, 64), Image.BILINEAR)).as_dict() == expected
    assert read(pil.resize((48, 48), Image.BICUBIC)).as_dict() == expected


def test_upscaled_batch_is_read_correctly():
    scenes = _scenes(200, seed=3)
    images = [world.render_pil(s).resize((64, 64), Image.BILINEAR) for s in scenes]
    _assert_at_least(accuracy(read_batch(images), scenes), 0.99)


def test_read_batch_matches_read_and_handles_empty():
    scenes = _scenes(5, seed=4)
    images = _renders(scenes)
    assert read_batch(images) == [read(image) for image in images]
    assert read_batch([]) == []
    with pytest.raises(ValueError, match="use read"):
        read_batch(images[0])


def test_image_without_object_gives_zero_fit():
    blank = np.full((32, 32, 3), world.BACKGROUNDS["dark"], dtype=np.uint8)
    reading = read(blank)
    assert reading.background == "dark"
    assert reading.fit == 0.0
    assert reading.texture == "plain"


def test_matches_and_accuracy():
    scene = world.Scene("top", "square", "red", "striped", "dark")
    reading = Reading("top", "circle", "red", "plain", "dark")
    assert reading.matches(scene) == {
        "position": True, "shape": False, "colour": True, "texture": False, "background": True
    }
    assert reading.matches({"shape": "circle", "colour": "red"}) == {"shape": True, "colour": True}
    assert reading.matches(scene, attributes=["colour"]) == {"colour": True}
    with pytest.raises(ValueError, match="unknown attribute"):
        reading.matches(scene, attributes=["size"])
    with pytest.raises(ValueError, match="no value for attribute 'shape'"):
        reading.matches({"colour": "red"}, attributes=["shape"])
    acc = accuracy([reading, Reading(**scene.attributes())], [scene, scene.attributes()])
    assert acc == {"position": 1.0, "shape": 0.5, "colour": 1.0, "texture": 0.5, "background": 1.0}
    with pytest.raises(ValueError, match="2 readings but 1 scenes"):
        accuracy([reading, reading], [scene])
    with pytest.raises(ValueError, match="no readings"):
        accuracy([], [])


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((32, 32), dtype=np.uint8), "HxWx3"),
        (np.zeros((32, 32, 4), dtype=np.uint8), "HxWx3"),
        (np.zeros((32, 32, 1), dtype=np.uint8), "HxWx3"),
        (np.zeros((3, 32, 32), dtype=np.float32), "HxWx3"),
        (np.zeros((0, 32, 3), dtype=np.uint8), "HxWx3"),
        (np.full((32, 32, 3), 200.0), r"\[0, 1\]"),
        (np.full((32, 32, 3), -1.0), r"\[0, 1\]"),
        (np.full((32, 32, 3), np.nan), "NaN"),
        (np.full((32, 32, 3), 300, dtype=np.int32), "0..255"),
        (np.zeros((32, 32, 3), dtype=bool), "dtype"),
        (np.full((32, 32, 3), "a"), "dtype"),
    ],
)
def test_bad_input_raises(image, message):
    with pytest.raises(ValueError, match=message):
        read(image)
