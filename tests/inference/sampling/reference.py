"""An independent numpy sampler reference: the filtered distribution of a request's logits
row and the token its uniform draw must select (inverse CDF in vocab order, float64)."""

from __future__ import annotations

import numpy as np

from inference.request import Request, SamplingParams
from inference.sampling import request_seed, uniform_draws


def reference_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """logits / T, top-k, then the smallest prefix of the renormalised distribution that
    reaches top-p, renormalised (float64 numpy, stable sort)."""
    scaled = logits.astype(np.float64) / params.temperature
    order = np.argsort(-scaled, kind="stable")
    keep = np.ones(scaled.size, dtype=bool)
    if 0 < params.top_k < scaled.size:
        keep[order[params.top_k:]] = False
    probs = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
    probs /= probs.sum()
    if params.top_p < 1.0:
        sorted_probs = probs[order]
        keep[order[np.cumsum(sorted_probs) - sorted_probs > params.top_p]] = False
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
