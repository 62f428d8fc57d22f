"""Counter-based random draws: the uniform a request's token at a position is sampled with
is a pure function of ``(seed, position)``.

So a request's tokens do not depend on which requests share its batch, on how its prompt
was chunked, on preemption (a token recomputed at the same position is drawn with the same
uniform), or on how many engine steps ran before it; nothing is stored per request, and one
step's draws for all its rows are one vectorised computation on the host (a few numpy ops,
whatever the batch size). The mixer is the output function of the SplitMix64 generator,
applied to the seed and then to the seed's hash combined with the position.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
UNIFORM_BITS = 24    # float32 carries the draw exactly: 2**-24 resolution, as torch's own float uniforms


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def uniform_draws(seeds, positions) -> np.ndarray:
    """float32 uniforms in (0, 1], one per (seed, position) pair; seeds are reduced mod 2**64.

    Invariant: the value of pair i depends on ``seeds[i]`` and ``positions[i]`` only.
    """
    seed = np.asarray([int(s) % (1 << 64) for s in seeds], dtype=np.uint64)
    pos = np.asarray(positions, dtype=np.int64).astype(np.uint64)
    if seed.shape != pos.shape:
        raise ValueError(f"{seed.size} seeds for {pos.size} positions")
    with np.errstate(over="ignore"):
        h = _mix64(_mix64(seed + _GOLDEN) ^ (pos * _GOLDEN + _GOLDEN))
    top = (h >> np.uint64(64 - UNIFORM_BITS)).astype(np.float64) + 1.0
    return (top / float(1 << UNIFORM_BITS)).astype(np.float32)
