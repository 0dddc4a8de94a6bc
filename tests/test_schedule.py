import itertools

import pytest

from loraprune.cubic_schedule import CubicSchedule
from loraprune.errors import ConfigError


@pytest.mark.parametrize("total_steps,warm,cool,units", [(100, 10, 10, 37), (7, 0, 0, 5), (50, 5, 20, 1000)])
def test_amount_is_monotone_and_reaches_target_exactly(total_steps, warm, cool, units):
    schedule = CubicSchedule(total_steps, warm, cool)
    amounts = [schedule.amount(t, units) for t in range(0, total_steps + 1)]
    assert all(a <= b for a, b in itertools.pairwise(amounts))
    assert amounts[warm] == 0
    assert amounts[schedule.ramp_end] == units
    assert amounts[-1] == units


def test_cubic_shape_matches_formula():
    schedule = CubicSchedule(110, 10, 0)
    assert schedule.fraction(60) == pytest.approx(1 - 0.5**3)


def test_from_fractions_keeps_a_pruning_step():
    schedule = CubicSchedule.from_fractions(2, 0.5, 0.5)
    assert schedule.warmup_steps + schedule.cooldown_steps < 2


def test_invalid_schedule_raises():
    with pytest.raises(ConfigError):
        CubicSchedule(10, 5, 5)
