import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as js


@pytest.mark.compat
def test_polynomial_is_zhu_gupta_cubic():
    sched = js.polynomial_schedule(begin_step=100, end_step=1100)
    for t in [0, 100, 350, 600, 1099, 1100, 5000]:
        p = min(max((t - 100) / 1000, 0.0), 1.0)
        assert float(sched(t)) == pytest.approx(1 - (1 - p) ** 3, abs=1e-6)
    assert (sched.begin_step, sched.end_step) == (100, 1100)
    assert float(js.polynomial_schedule(0, 10, power=1)(5)) == pytest.approx(0.5)
    assert float(jax.jit(sched)(jnp.int32(600))) == pytest.approx(0.875)


def test_one_shot_and_update_steps():
    one = js.one_shot_schedule(7)
    assert [float(one(t)) for t in (0, 6, 7, 100)] == [0.0, 0.0, 1.0, 1.0]
    assert (one.begin_step, one.end_step) == (7, 7)
    assert list(one.update_steps(100)) == [7]
    sched = js.polynomial_schedule(2, 12)
    assert list(sched.update_steps(4)) == [2, 6, 10, 12]
    # The host evaluation is the same formula in float64.
    np.testing.assert_allclose(sched.fractions([2, 6, 12]), [0.0, 1 - 0.6**3, 1.0], rtol=1e-15)
    assert not hasattr(js, "constant_schedule")  # it changed nothing with a periodic refresh


def test_cosine_drop_fraction():
    f = js.cosine_drop_fraction(0.3, end_step=1000)
    for t in [0, 250, 500, 999]:
        assert float(f(t)) == pytest.approx(0.15 * (1 + math.cos(math.pi * t / 1000)), abs=1e-6)
    assert float(f(1000)) == 0.0 and float(f(5000)) == 0.0


def test_bad_schedules_raise():
    with pytest.raises(ValueError, match=r"end_step \(5\) precedes begin_step \(10\)"):
        js.polynomial_schedule(10, 5)
    with pytest.raises(ValueError, match="begin_step must be a non-negative int; got -1"):
        js.polynomial_schedule(-1, 5)
    with pytest.raises(ValueError, match="power must be > 0"):
        js.polynomial_schedule(0, 5, power=0)
    with pytest.raises(ValueError, match="drop_fraction must be in"):
        js.cosine_drop_fraction(1.5, 100)
    with pytest.raises(ValueError, match="end_step must be > 0"):
        js.cosine_drop_fraction(0.3, 0)
