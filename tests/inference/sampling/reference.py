"""An independent numpy sampler reference: the filtered distribution of a request's logits
row and the token its uniform draw must select (inverse CDF in vocab order, float64)."""

from __future__ import annotations

import numpy as np

from inference.request import Request, SamplingParams
from inference.sampling import request_seed, uniform_draws


def reference_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """logits / T; top-k keeps every token whose scaled logit is at least the k-th largest;
    top-p then keeps every token whose strictly more likely tokens hold at most top-p of the
    renormalised top-k mass; renormalised (float64 numpy). Ties at either cut are kept whole,
    so the set does not depend on how tied tokens are ordered; without ties this is the
    usual smallest prefix of the sorted distribution that reaches top-p."""
    scaled = logits.astype(np.float64) / params.temperature
    keep = np.ones(scaled.size, dtype=bool)
    if 0 < params.top_k < scaled.size:
        keep = scaled >= np.sort(scaled)[::-1][params.top_k - 1]
    probs = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
    probs /= probs.sum()
    if params.top_p < 1.0:
        # Mass of the tokens strictly more likely than each token: per distinct value, the
        # mass of every larger value (O(V log V); tied tokens share one value).
        values, which = np.unique(scaled, return_inverse=True)
        mass = np.bincount(which, weights=probs, minlength=values.size)
        above = (np.cumsum(mass[::-1])[::-1] - mass)[which]
        keep &= above <= params.top_p
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum()
    return probs


def assert_inverse_cdf(tokens, logits: np.ndarray, requests: list[Request], positions: list[int],
                       engine_seed: int, tol: float) -> int:
    """Every greedy row took the argmax, every sampled row the token whose CDF interval (in
    vocab order, under ``reference_probs``) holds its uniform, up to ``tol`` of CDF. Returns
    the number of sampled rows checked."""
    tokens = [int(t) for t in tokens]
    uniforms = uniform_draws([request_seed(r, engine_seed) for r in requests], positions)
    checked = 0
    for i, (req, token) in enumerate(zip(requests, tokens)):
        if req.sampling_params.is_greedy:
            assert token == int(np.argmax(logits[i])), i
            continue
        cdf = np.cumsum(reference_probs(logits[i], req.sampling_params))
        low = cdf[token - 1] if token > 0 else 0.0
        assert low - tol < float(uniforms[i]) <= cdf[token] + tol, (i, token, low, float(uniforms[i]), cdf[token])
        checked += 1
    return checked
