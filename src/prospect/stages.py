"""The ProSpect stage map: which of the N prompt-spectrum stages a diffusion timestep belongs to.

The T training timesteps (T = 1000 for Stable Diffusion) are cut into N equal stages
(N = 10 in the paper) by ``stage(t) = floor(t * N / T)``.

Index convention (used everywhere in this package):

* stage 0 holds the *small* timesteps, i.e. the **last** denoising steps, where the
  model settles texture, material and style;
* stage N-1 holds the *large* timesteps, i.e. the **first** denoising steps, where the
  model settles layout and composition.

This is the order of the ``prospect_words`` lists in the official ProSpect code, whose
entry 0 is commented "generation ends". The paper's figures number the stages the other
way (in generation order, layout first); convert with ``N - 1 - index`` when comparing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from numbers import Integral, Real
from typing import Any, Iterable

__all__ = ["StageMap", "stage_bounds", "stage_of", "stages_of", "timestep_span"]


def _check_config(num_stages: Any, num_train_timesteps: Any) -> None:
    """Raise ValueError unless 1 <= num_stages <= num_train_timesteps are integers."""
    for name, value in (("num_stages", num_stages), ("num_train_timesteps", num_train_timesteps)):
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if not 1 <= num_stages <= num_train_timesteps:
        raise ValueError(
            f"num_stages must be in [1, num_train_timesteps={num_train_timesteps}], got {num_stages}"
        )


def _as_number(t: Any) -> int | float:
    """Convert an int, float, numpy scalar or 0-dim tensor/array to a Python int or float."""
    if isinstance(t, bool):
        raise TypeError(f"timestep must be a number, got bool {t!r}")
    if isinstance(t, Integral):
        return int(t)
    if isinstance(t, Real):
        value = float(t)
        return int(value) if value.is_integer() else value
    if hasattr(t, "item") and hasattr(t, "ndim"):
        if t.ndim != 0:
            raise ValueError(f"stage_of takes one timestep (0-dim), got shape {tuple(t.shape)}; use stages_of")
        return _as_number(t.item())
    raise TypeError(f"timestep must be a number or 0-dim tensor, got {type(t).__name__}")


def stage_of(t: Any, num_stages: int = 10, num_train_timesteps: int = 1000) -> int:
    """Stage index floor(t * N / T) of timestep t (0 = last denoising steps)."""
    _check_config(num_stages, num_train_timesteps)
    value = _as_number(t)
    if not (0 <= value < num_train_timesteps):  # also rejects NaN
        raise ValueError(f"timestep must satisfy 0 <= t < {num_train_timesteps}, got {value}")
    if isinstance(value, int):
        return value * num_stages // num_train_timesteps
    return math.floor(Fraction(value) * num_stages / num_train_timesteps)


def stage_bounds(stage: int, num_stages: int = 10, num_train_timesteps: int = 1000) -> tuple[int, int]:
    """Integer timesteps [lo, hi) of a stage: exactly the t with stage_of(t) == stage."""
    _check_config(num_stages, num_train_timesteps)
    if isinstance(stage, bool) or not isinstance(stage, Integral) or not 0 <= stage < num_stages:
        raise ValueError(f"stage must be an int in [0, {num_stages}), got {stage!r}")
    stage = int(stage)
    lo = -(-stage * num_train_timesteps // num_stages)  # ceil(stage * T / N)
    hi = -(-(stage + 1) * num_train_timesteps // num_stages)
    return lo, hi


def stages_of(timesteps: Iterable[Any], num_stages: int = 10, num_train_timesteps: int = 1000) -> list[int]:
    """Stage index of each timestep in a sequence or 1-D tensor/array."""
    if isinstance(timesteps, (str, bytes)):
        raise TypeError("timesteps must be a sequence of numbers, got a string")
    if hasattr(timesteps, "ndim") and hasattr(timesteps, "tolist"):
        if timesteps.ndim != 1:
            raise ValueError(f"stages_of takes a 1-D tensor/array, got shape {tuple(timesteps.shape)}")
        timesteps = timesteps.tolist()
    return [stage_of(t, num_stages, num_train_timesteps) for t in timesteps]


@dataclass(frozen=True)
class StageMap:
    """A fixed (num_stages, num_train_timesteps) split; methods wrap the module functions."""

    num_stages: int = 10
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        """Validate the split."""
        _check_config(self.num_stages, self.num_train_timesteps)

    def stage(self, t: Any) -> int:
        """Stage index of timestep t."""
        return stage_of(t, self.num_stages, self.num_train_timesteps)

    def bounds(self, stage: int) -> tuple[int, int]:
        """Integer timesteps [lo, hi) of a stage."""
        return stage_bounds(stage, self.num_stages, self.num_train_timesteps)

    def stages(self, timesteps: Iterable[Any]) -> list[int]:
        """Stage index of each timestep."""
        return stages_of(timesteps, self.num_stages, self.num_train_timesteps)


def timestep_span(text: str, num_train_timesteps: int | None = None) -> tuple[int, int]:
    """``"LO-HI"`` as (LO, HI), a span [LO, HI) of training timesteps (SD's stage k of N is [k*T/N, (k+1)*T/N))."""
    lo, dash, hi = text.partition("-")
    if not dash or not lo.strip().isdigit() or not hi.strip().isdigit() or int(lo) >= int(hi):
        raise ValueError(f"{text!r} is not a span LO-HI of timesteps with LO < HI, e.g. '500-700'")
    if num_train_timesteps is not None and int(hi) > num_train_timesteps:
        raise ValueError(f"{text!r}: HI must be at most the model's {num_train_timesteps} training timesteps")
    return int(lo), int(hi)
