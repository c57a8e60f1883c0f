"""How much the libraries under ProSpect print: quiet by default, in the API as on the command line.

diffusers and transformers log notes (optional dependencies, the safety checker) and draw loading
and denoising bars for every pipeline built. ProSpect turns that down to errors the first time it
loads a model, unless the user chose a level: :func:`set_verbosity`, or the libraries' own
``DIFFUSERS_VERBOSITY`` / ``TRANSFORMERS_VERBOSITY`` environment variables.
"""

from __future__ import annotations

import logging
import os

LEVELS = {"critical": logging.CRITICAL, "error": logging.ERROR, "warning": logging.WARNING,
          "info": logging.INFO, "debug": logging.DEBUG}
DEFAULT = "error"
_chosen: int | None = None  # the level set_verbosity chose; None = not chosen yet


def _level(level: str | int) -> int:
    if isinstance(level, bool) or not isinstance(level, (str, int)):
        raise ValueError(f"verbosity must be one of {', '.join(LEVELS)} or a logging level, got {level!r}")
    if isinstance(level, str):
        if level.lower() not in LEVELS:
            raise ValueError(f"unknown verbosity {level!r}; choose one of {', '.join(LEVELS)}")
        return LEVELS[level.lower()]
    return level


def set_verbosity(level: str | int = "info") -> None:
    """Set what diffusers and transformers print: "critical", "error" (ProSpect's default), "warning",
    "info" or "debug" (or a ``logging`` level). At "info" and below, loading and denoising progress bars
    are shown too (for pipelines loaded after the call)."""
    global _chosen
    import diffusers
    import transformers

    _chosen = _level(level)
    for lib in (diffusers.utils.logging, transformers.utils.logging):
        lib.set_verbosity(_chosen)
        (lib.enable_progress_bar if _chosen <= logging.INFO else lib.disable_progress_bar)()


def progress_bars() -> bool:
    """Whether pipelines ProSpect loads draw their progress bars."""
    return _chosen is not None and _chosen <= logging.INFO


def quiet_by_default() -> None:
    """Apply the default level once, unless the user chose one (here or through the environment)."""
    global _chosen
    if _chosen is not None:
        return
    import diffusers
    import transformers

    _chosen = _level(DEFAULT)
    if "DIFFUSERS_VERBOSITY" not in os.environ:
        diffusers.utils.logging.set_verbosity(_chosen)
    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        transformers.utils.logging.set_verbosity(_chosen)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
