import pytest

from fvq.training import AnnealingSchedule, annealing_factor


def test_published_recipe_values():
    # 1000 steps: warmup 100 steps 0.005 -> 1, constant 270 steps, linear decay over 630 steps to 0.01
    s = AnnealingSchedule(total_steps=1000)
    assert s.warmup_steps == 100 and s.constant_steps == 270
    assert s(0) == pytest.approx(0.005)
    assert s(50) == pytest.approx(0.005 + 0.995 * 0.5)
    assert s(100) == pytest.approx(1.0)
    assert s(369) == pytest.approx(1.0)
    assert s(370) == pytest.approx(1.0)
    assert s(370 + 315) == pytest.approx(1.0 + (0.01 - 1.0) * 0.5)
    assert s(999) == pytest.approx(1.0 + (0.01 - 1.0) * 629 / 630)
    assert s(1000) == pytest.approx(0.01)
    assert s(5000) == pytest.approx(0.01)


def test_cosine_and_monotone_decay():
    s = AnnealingSchedule(total_steps=1000, decay="cosine")
    assert s(370 + 315) == pytest.approx(0.01 + 0.99 * 0.5)
    values = [s(i) for i in range(370, 1001)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_generation_recipe_no_warmup():
    # warmup(0) [baselr(0.05) - linear(0.95)]
    assert annealing_factor(0, 100, warmup_fraction=0.0, constant_fraction=0.05) == 1.0
    assert annealing_factor(5, 100, warmup_fraction=0.0, constant_fraction=0.05) == pytest.approx(1.0)
    assert annealing_factor(100, 100, warmup_fraction=0.0, constant_fraction=0.05) == pytest.approx(0.01)


def test_bad_arguments():
    with pytest.raises(ValueError, match="total_steps"):
        AnnealingSchedule(total_steps=0)
    with pytest.raises(ValueError, match="decay"):
        AnnealingSchedule(total_steps=10, decay="step")
    with pytest.raises(ValueError, match="warmup_fraction"):
        AnnealingSchedule(total_steps=10, warmup_fraction=1.5)
