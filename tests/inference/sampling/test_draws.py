"""Counter-based uniforms: a pure function of (seed, position), in (0, 1], and uniform."""

from __future__ import annotations

import numpy as np
import pytest

from inference.sampling.draws import UNIFORM_BITS, uniform_draws


def test_a_draw_depends_only_on_its_own_seed_and_position():
    rng = np.random.default_rng(0)
    seeds, positions = rng.integers(0, 2 ** 62, 50).tolist(), rng.integers(0, 10 ** 6, 50).tolist()
    together = uniform_draws(seeds, positions)
    one_by_one = [uniform_draws([s], [p])[0] for s, p in zip(seeds, positions)]
    order = rng.permutation(50)
    shuffled = uniform_draws([seeds[i] for i in order], [positions[i] for i in order])
    assert together.tolist() == one_by_one
    assert shuffled.tolist() == together[order].tolist()


def test_draws_lie_in_0_1_on_the_float32_grid():
    u = uniform_draws([5] * 20000, np.arange(20000))
    assert u.dtype == np.float32
    assert u.min() > 0.0 and u.max() <= 1.0
    scaled = u.astype(np.float64) * (1 << UNIFORM_BITS)
    assert np.array_equal(scaled, np.round(scaled))


@pytest.mark.parametrize("vary", ["position", "seed"])
def test_draws_are_uniform_and_uncorrelated(vary):
    n = 100_000
    if vary == "position":
        u = uniform_draws([123] * n, np.arange(n))
    else:
        u = uniform_draws(list(range(n)), [7] * n)
    counts = np.histogram(u, bins=20, range=(0.0, 1.0))[0]
    chi2 = (((counts - n / 20) ** 2) / (n / 20)).sum()
    assert chi2 < 43.8                               # 19 degrees of freedom, p = 0.001
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.015
    assert len(np.unique(u)) > 0.99 * n


def test_seeds_are_taken_mod_2_64_and_distinct_seeds_differ():
    assert uniform_draws([2 ** 64 + 5], [9])[0] == uniform_draws([5], [9])[0]
    assert uniform_draws([5], [9])[0] != uniform_draws([6], [9])[0]


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="2 seeds for 3 positions"):
        uniform_draws([1, 2], [0, 1, 2])
