"""Token sampling: greedy, temperature, top-k, top-p, with a generator per request, and the
log-probs of what was sampled (see ``SamplingParams.logprobs_mode``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inference.request import Request


@dataclass
class SampledTokens:
    """One step's sampling output, on the device. Row i belongs to the i-th request."""

    tokens: torch.Tensor                        # int64 [S]
    logprobs: torch.Tensor | None = None        # float32 [S]: log-prob of each sampled token
    top_ids: torch.Tensor | None = None         # int64 [S, N]: top-N alternatives (N = max asked)
    top_logprobs: torch.Tensor | None = None    # float32 [S, N]


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

    def sample(self, logits: torch.Tensor, requests: list[Request], logprobs: bool = True) -> SampledTokens:
        """logits: [R, V] fp32 rows in the order of ``requests``; returns the sampled token
        ids (and, with ``logprobs``, their log-probs and any top-N asked) on the device."""
        greedy = logits.argmax(dim=-1)
        top_n = max(r.sampling_params.logprobs for r in requests) if logprobs else 0
        if all(r.sampling_params.is_greedy for r in requests) and not top_n:
            if not logprobs:
                return SampledTokens(greedy)
            chosen = logits.gather(1, greedy[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
            return SampledTokens(greedy, chosen)
        tokens = greedy.clone()
        dist = torch.log_softmax(logits, dim=-1) if logprobs else None   # raw; sampled rows replaced below
        for i, req in enumerate(requests):
            params = req.sampling_params
            if params.is_greedy:
                continue
            processed = torch.log_softmax(filtered_logits(logits[i], params.temperature, params.top_k, params.top_p), -1)
            tokens[i : i + 1] = torch.multinomial(processed.exp(), 1, generator=self._generator(req))
            if dist is not None and params.logprobs_mode == "processed":
                dist[i] = processed
            elif dist is not None and params.logprobs_mode == "tempered":
                dist[i] = torch.log_softmax(logits[i] / params.temperature, -1)
        if dist is None:
            return SampledTokens(tokens)
        out = SampledTokens(tokens, dist.gather(1, tokens[:, None])[:, 0])
        if top_n:
            out.top_logprobs, out.top_ids = dist.topk(top_n, dim=-1)
        return out

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


def filtered_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """``logits / temperature`` with every token outside the top-k and outside the smallest
    top-p prefix set to -inf: the distribution a sampled token is drawn from."""
    scaled = logits / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_probs, order = torch.sort(torch.softmax(scaled, dim=-1), descending=True)
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs > top_p   # keep the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled
