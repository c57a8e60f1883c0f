"""ProSpect: attribute-aware personalization of diffusion models with the Prompt Spectrum.

Implements Zhang et al. (2023), "ProSpect: Prompt Spectrum for Attribute-Aware Personalization
of Diffusion Models", ACM TOG 42(6). The public names below are imported lazily, so that light
modules (the toy world, the stage map) do not pay for importing diffusers.
"""

from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "ProSpectPipeline": "pipeline",
    "GenerationResult": "pipeline",
    "InversionConfig": "inversion",
    "invert": "inversion",
    "Concept": "concept",
    "StageMap": "stages",
    "stage_of": "stages",
    "build_spectrum": "spectrum",
    "load_pipeline": "models",
    "open_image": "data",
    "visualize": "visualize",
    "set_verbosity": "verbosity",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'prospect' has no attribute {name!r}")
