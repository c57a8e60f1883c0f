"""The embedded default model: a tiny Stable-Diffusion-format model of the toy world.

`prospect.toymodel.train` is the recipe that reproduces the shipped weights from scratch;
`prospect.toymodel.quality` measures them. The weights live in `prospect/models/toy-world`.
"""

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "toy-world"


def default_model_path() -> Path:
    """The folder of the embedded model (a diffusers Stable Diffusion layout)."""
    return MODEL_DIR
