"""Token sampling: greedy, temperature, top-k, top-p, with a generator per request."""

from __future__ import annotations

import torch

from inference.request import Request


class Sampler:
    """Samples one token per logits row, on the logits' device, without host syncs. Each
    sampling request owns a ``torch.Generator`` seeded from its ``seed`` (or the engine seed
    and its arrival index), so its tokens do not depend on which other requests share the
    batch. Invariant: a generator lives from a request's first sampled token until
    ``release``; it draws exactly once per token sampled for that request."""

    def __init__(self, engine_seed: int, device: torch.device) -> None:
        self.engine_seed = engine_seed
        self.device = device
        self._generators: dict[Request, torch.Generator] = {}   # keyed by identity, not id

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """logits: [R, V] fp32 rows in the order of ``requests``; returns int64 [R] token
        ids on the same device (the caller decides when they reach the host)."""
        greedy = logits.argmax(dim=-1)
        if all(r.sampling_params.is_greedy for r in requests):
            return greedy
        tokens = greedy.clone()
        for i, req in enumerate(requests):
            params = req.sampling_params
            if params.is_greedy:
                continue
            probs = _filtered_probs(logits[i], params.temperature, params.top_k, params.top_p)
            tokens[i : i + 1] = torch.multinomial(probs, 1, generator=self._generator(req))
        return tokens

    def release(self, request: Request) -> None:
        self._generators.pop(request, None)

    def _generator(self, req: Request) -> torch.Generator:
        gen = self._generators.get(req)
        if gen is None:
            seed = req.sampling_params.seed
            if seed is None:
                seed = (self.engine_seed * 1_000_003 + req.arrival_index) % (2 ** 63)
            gen = torch.Generator(device=self.device).manual_seed(seed)
            self._generators[req] = gen
        return gen


def _filtered_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    scaled = logits / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = sorted_probs.cumsum(-1)
        drop = cumulative - sorted_probs > top_p   # keep the smallest prefix reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum()
    return probs
