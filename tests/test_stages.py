"""The stage map: stage_of / stage_bounds / stages_of / StageMap."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prospect.stages import StageMap, stage_bounds, stage_of, stages_of


@st.composite
def configs(draw):
    """(num_stages, num_train_timesteps) with 1 <= N <= T <= 1000."""
    t = draw(st.integers(1, 1000))
    return draw(st.integers(1, t)), t


def test_default_split_is_100_timesteps_per_stage():
    assert stage_of(0) == 0
    assert stage_of(99) == 0
    assert stage_of(100) == 1
    assert stage_of(999) == 9
    assert [stage_bounds(s) for s in (0, 9)] == [(0, 100), (900, 1000)]


def test_accepts_python_numpy_and_torch_scalars():
    scalars = (537, 537.0, 537.9, np.int64(537), np.float32(537.5), np.array(537))
    scalars += (torch.tensor(537), torch.tensor(537.25))
    for t in scalars:
        assert stage_of(t) == 5, t
    assert stage_of(torch.tensor(999, dtype=torch.int64), 4, 1000) == 3


def test_float_timesteps_use_exact_floor():
    assert stage_of(99.999999) == 0
    assert stage_of(100.0) == 1
    assert stage_of(0.5, 3, 3) == 0
    assert stage_of(2.999, 3, 3) == 2


@pytest.mark.parametrize("t", [-1, 1000, 1000.0, -0.5, float("nan"), float("inf"), 5000])
def test_out_of_range_timestep_raises_value_error(t):
    with pytest.raises(ValueError, match=r"0 <= t < 1000"):
        stage_of(t)


@pytest.mark.parametrize("bad", [True, "5", None, torch.tensor([1, 2])])
def test_bad_timestep_types(bad):
    with pytest.raises((TypeError, ValueError)):
        stage_of(bad)


@pytest.mark.parametrize("n,t", [(0, 1000), (1001, 1000), (5, 0), (2.0, 10), (True, 10), (10, 1000.0)])
def test_bad_config_raises(n, t):
    with pytest.raises(ValueError):
        stage_of(0, n, t)
    with pytest.raises(ValueError):
        StageMap(n, t)


def test_error_messages_are_one_line():
    for call in (lambda: stage_of(1000), lambda: stage_bounds(10), lambda: StageMap(0)):
        with pytest.raises(ValueError) as info:
            call()
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("stage", [-1, 10, True, 1.0])
def test_stage_bounds_rejects_bad_stage(stage):
    with pytest.raises(ValueError, match="stage must be an int"):
        stage_bounds(stage)


def test_stages_of_sequences_and_tensors():
    assert stages_of([0, 150, 999.5], 10, 1000) == [0, 1, 9]
    assert stages_of(torch.tensor([981, 961, 21, 1]), 10, 1000) == [9, 9, 0, 0]
    assert stages_of(np.arange(0, 1000, 250), 4, 1000) == [0, 1, 2, 3]
    assert stages_of([]) == []
    with pytest.raises(ValueError, match="1-D"):
        stages_of(torch.zeros(2, 2))
    with pytest.raises(TypeError):
        stages_of("999")


def test_stage_map_wraps_functions_and_is_frozen():
    m = StageMap(4, 10)
    assert m.stage(torch.tensor(9)) == 3
    assert m.bounds(1) == stage_bounds(1, 4, 10) == (3, 5)
    assert m.stages([0, 5, 9]) == [0, 2, 3]
    assert StageMap() == StageMap(10, 1000)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.num_stages = 5


@settings(max_examples=100, deadline=None)
@given(configs())
def test_every_timestep_in_exactly_one_stage_contiguous_and_ordered(config):
    n, t = config
    bounds = [stage_bounds(s, n, t) for s in range(n)]
    assert bounds[0][0] == 0 and bounds[-1][1] == t
    for (lo, hi), (next_lo, _) in zip(bounds, bounds[1:]):
        assert lo < hi == next_lo  # non-empty, contiguous, increasing
    stages = stages_of(range(t), n, t)
    assert stages == sorted(stages)
    for s, (lo, hi) in enumerate(bounds):
        assert [i for i, x in enumerate(stages) if x == s] == list(range(lo, hi))


@settings(max_examples=200, deadline=None)
@given(configs(), st.data())
def test_stage_of_agrees_with_bounds_and_formula(config, data):
    n, t = config
    step = data.draw(st.integers(0, t - 1))
    s = stage_of(step, n, t)
    assert s == step * n // t
    lo, hi = stage_bounds(s, n, t)
    assert lo <= step < hi
    x = data.draw(st.floats(min_value=0, max_value=t, exclude_max=True))
    s = stage_of(x, n, t)
    assert Fraction(s * t, n) <= Fraction(x) < Fraction((s + 1) * t, n)  # real-valued stage interval
