"""One step's token sampling, in a number of device ops that does not grow with the batch.

Greedy, temperature, top-k and top-p rows share one batched pass over the logits: each row
is scaled by its temperature, filtered (top-k, then top-p over the renormalised top-k
distribution; tokens tied at a cut are kept, so the kept set never depends on tie order),
and sampled by inverse CDF with its counter-based uniform
(``inference.sampling.draws``). The per-row parameters travel in one small table (one
host-to-device copy); which branches run (any sampled row, any filter, candidate count,
log-prob modes, top-N) is decided on the host from the requests, so nothing waits for the
device. The old sampler ran about ten device ops per sampled row (900 at batch 64 with
top-p), each several microseconds of host time on CUDA, which made sampled decode
host-bound; this one runs the same 4 (greedy) to about 20 ops at batch 1 and at batch 256.

On CUDA (``Sampler(kernel=None)``) the same pass is one Triton kernel
(``inference.kernels.sample_triton``: top-k / top-p by search instead of a sort, no
``[S, V]`` intermediates) whenever no row asks for top-N alternatives; the torch ops stay
the CPU path, the top-N path and the reference the kernel is tested against.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from inference.kernels.sample_triton import fused_sample, fused_sample_available
from inference.request import LOGPROBS_MODES, Request
from inference.sampling.draws import uniform_draws

MODE_CODES = {name: float(code) for code, name in enumerate(LOGPROBS_MODES)}
_RAW = MODE_CODES["raw"]
_PROCESSED = MODE_CODES["processed"]
_TEMPERED = MODE_CODES["tempered"]
# Names the sampling algorithm (filters, draws, inverse CDF) in a sampled run's fingerprint:
# any change that can change a sampled token gets a new name, so --resume never mixes the
# tokens of two versions in one directory.
# v2: on CUDA the fused kernel (its own float32 reduction order can move a draw boundary).
SAMPLER_VERSION = "batched-inverse-cdf-splitmix64-v2"
# Candidate sets of at most V / _TOPK_FRACTION tokens come from topk, larger ones from a full sort.
_TOPK_FRACTION = 8
# Columns of the per-row table (float32; top-k and flags are small integers, exact in float32).
_COLUMNS = ("temperature", "top_k", "top_p", "uniform", "mode", "sampled")


def request_seed(request: Request, engine_seed: int) -> int:
    """The seed of a request's draws: its own, else one derived from the engine seed and its
    arrival index (so an unseeded run is reproducible from the engine seed)."""
    seed = request.sampling_params.seed
    if seed is not None:
        return seed
    return (engine_seed * 1_000_003 + request.arrival_index) % (2 ** 63)


@dataclass(frozen=True)
class SamplingPlan:
    """The host's view of one step's sampling rows (row i belongs to ``requests[i]``): the
    per-row table and which parts of the batched pass this step needs.

    Invariant: ``table`` (float32 ``[S, len(_COLUMNS)]``, None when every row is greedy) holds
    for a greedy row temperature 1, top-k ``num_candidates``, top-p +inf, mode raw and
    sampled 0, so the batched pass leaves its logits unchanged and its argmax is kept; for a
    sampled row top-k is ``num_candidates`` when it has none and top-p is +inf when it is 1.
    A flag is False only when the op it guards would change no row."""

    num_candidates: int          # C: sampled rows draw among their top-C scaled logits (C = V: all)
    modes: frozenset             # log-prob mode codes present among the rows
    top_n: int                   # top alternatives asked (max over rows; 0 without log-probs)
    table: np.ndarray | None
    has_greedy: bool = True      # some row is greedy (argmax kept for it)
    scales: bool = False         # some sampled row's temperature is not 1
    top_k: bool = False          # some sampled row has a top-k (below the vocab size)
    masks_rank: bool = False     # some sampled row has a top-k below num_candidates
    top_p: bool = False          # some sampled row has a top-p below 1

    @property
    def filtered(self) -> bool:
        """Some sampled row has a top-k or a top-p."""
        return self.top_k or self.top_p

    @classmethod
    def build(cls, requests: list[Request], positions: list[int], vocab_size: int, engine_seed: int,
              logprobs: bool) -> "SamplingPlan":
        params = [r.sampling_params for r in requests]
        top_n = max((p.logprobs for p in params), default=0) if logprobs else 0
        sampled = [not p.is_greedy for p in params]
        if not any(sampled):
            return cls(vocab_size, frozenset((_RAW,)), top_n, None)
        ks = [p.top_k if s and 0 < p.top_k < vocab_size else 0 for p, s in zip(params, sampled)]
        limited = all(k > 0 for k, s in zip(ks, sampled) if s)
        candidates = max(ks) if limited and max(ks) * _TOPK_FRACTION <= vocab_size else vocab_size
        temperatures = [p.temperature if s else 1.0 for p, s in zip(params, sampled)]
        top_ps = [p.top_p if s and p.top_p < 1.0 else np.inf for p, s in zip(params, sampled)]
        modes = [MODE_CODES[p.logprobs_mode] if s else _RAW for p, s in zip(params, sampled)]
        table = np.empty((len(params), len(_COLUMNS)), dtype=np.float32)
        table[:, 0] = temperatures
        table[:, 1] = [k or candidates for k in ks]
        table[:, 2] = top_ps
        table[:, 3] = uniform_draws([request_seed(r, engine_seed) for r in requests], positions)
        table[:, 4] = modes
        table[:, 5] = sampled
        top_p = any(p < np.inf for p in top_ps)
        return cls(candidates, frozenset(modes), top_n, table, has_greedy=not all(sampled),
                   scales=any(t != 1.0 for t in temperatures), top_k=any(ks),
                   masks_rank=any(0 < k < candidates for k in ks), top_p=top_p)


@dataclass
class SampledTokens:
    """One step's sampling output, on the device. Row i belongs to the i-th request."""

    tokens: torch.Tensor                        # int64 [S]
    logprobs: torch.Tensor | None = None        # float32 [S]: log-prob of each sampled token
    top_ids: torch.Tensor | None = None         # int64 [S, N]: top-N alternatives (N = max asked)
    top_logprobs: torch.Tensor | None = None    # float32 [S, N]


@dataclass
class _Draw:
    """The batched pass over one step's logits: ``scaled`` (each row divided by its
    temperature), ``processed`` (``scaled`` with -inf outside each row's top-k / top-p set;
    ``scaled`` itself when no row is filtered), both in vocab order, and the drawn tokens."""

    scaled: torch.Tensor
    processed: torch.Tensor
    tokens: torch.Tensor
    # ``processed`` rows' logsumexp as (max, log of the mass below it), from the draw's sums
    processed_norm: tuple[torch.Tensor, torch.Tensor] | None = None


class Sampler:
    """Samples one token per logits row, on the logits' device, without host syncs.

    Invariant: the token a request samples at a position depends only on its logits row, its
    sampling parameters and ``(seed, position)`` (``request_seed``), never on the other rows
    of the batch or on earlier steps; the sampler keeps no per-request state."""

    def __init__(self, engine_seed: int, device: torch.device, kernel: bool | None = None) -> None:
        """``kernel``: draw with the fused Triton kernel (None: on CUDA when Triton is
        installed; True elsewhere needs TRITON_INTERPRET=1); False: always the torch ops."""
        if kernel and not fused_sample_available():
            raise ValueError("Sampler(kernel=True) needs triton installed")
        if kernel and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"Sampler(kernel=True) on {device}: the kernel runs on CUDA (or under TRITON_INTERPRET=1)")
        self.engine_seed = engine_seed
        self.device = device
        self.kernel = fused_sample_available() and device.type == "cuda" if kernel is None else kernel

    def sample(self, logits: torch.Tensor, requests: list[Request], positions: list[int],
               logprobs: bool = True) -> SampledTokens:
        """logits: [S, V] fp32 rows in the order of ``requests``; ``positions[i]``: the
        sequence position of the token row i samples. Returns the sampled token ids (and,
        with ``logprobs``, their log-probs and any top-N asked) on the device."""
        if len(positions) != len(requests) or logits.shape[0] != len(requests):
            raise ValueError(f"{logits.shape[0]} logits rows, {len(requests)} requests, {len(positions)} positions")
        plan = SamplingPlan.build(requests, positions, logits.shape[-1], self.engine_seed, logprobs)
        if self.kernel and not plan.top_n and logits.dtype == torch.float32 and logits.stride(-1) == 1:
            table = None if plan.table is None else self._to_device(plan.table)
            tokens, chosen = fused_sample(logits, table, top_k=plan.top_k, top_p=plan.top_p, logprobs=logprobs)
            return SampledTokens(tokens, chosen)
        if plan.table is None:
            tokens = logits.argmax(dim=-1)
            draw, modes = _Draw(logits, logits, tokens), None
        else:
            table = self._to_device(plan.table)
            draw = _draw(logits, table, plan)
            tokens = draw.tokens
            if plan.has_greedy:
                tokens = torch.where(table[:, 5] > 0, tokens, logits.argmax(dim=-1))
            modes = table[:, 4]
        if not logprobs:
            return SampledTokens(tokens)
        return _with_logprobs(tokens, logits, draw, plan, modes)

    def _to_device(self, table: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(table)
        if self.device.type != "cuda":
            return host.to(self.device)
        # A fresh pinned block: the host allocator reuses it only once this copy has run.
        pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
        pinned.copy_(host)
        return pinned.to(self.device, non_blocking=True)


def _draw(logits: torch.Tensor, table: torch.Tensor, plan: SamplingPlan) -> _Draw:
    """Scale, filter and draw every row (greedy rows too; their draw is discarded). The draw
    is an inverse CDF over the vocab in vocab order with unnormalised weights
    ``exp(processed - max(scaled))``, so a row's token does not depend on which branch the
    batch took (topk or full sort): the kept logits are exact copies of ``scaled``."""
    temperature, top_k, top_p, uniform = table[:, 0], table[:, 1], table[:, 2], table[:, 3]
    scaled = logits / temperature[:, None] if plan.scales else logits
    if plan.filtered:
        processed, row_max = _filtered(scaled, top_k, top_p, plan)
    else:
        processed, row_max = scaled, scaled.amax(dim=-1, keepdim=True)
    tokens, total = _inverse_cdf(torch.exp(processed - row_max), uniform)
    return _Draw(scaled, processed, tokens, (row_max[:, 0], torch.log(total)))


def _filtered(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
              plan: SamplingPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(``scaled`` with -inf below each row's threshold, each row's max of ``scaled``). The
    threshold is the row's k-th largest scaled logit (top-k keeps every token at least that
    large), raised by top-p to the smallest logit whose strictly larger logits hold at most
    top-p of the renormalised top-k mass. Both cuts keep tied tokens whole and depend only on
    the sorted *values*, never on which tied tokens the topk / sort ranked first, so a row's
    kept set is the same on either branch and for any candidate count (bf16 logits tie)."""
    c, vocab = plan.num_candidates, scaled.shape[-1]
    values = scaled.topk(c, dim=-1).values if c < vocab else scaled.sort(dim=-1, descending=True).values
    row_max = values[:, :1]
    threshold = kth = None
    if plan.masks_rank:
        kth = top_k.long()[:, None] - 1
        threshold = values.gather(1, kth)
    elif c < vocab:      # every row keeps its c candidates: the last one is the k-th
        threshold = values[:, -1:]
    if plan.top_p:
        kept = values if threshold is None else values.masked_fill(values < threshold, float("-inf"))
        probs = torch.softmax(kept, dim=-1)          # the renormalised top-k distribution of the candidates
        limit = top_p[:, None]
        if c < vocab:
            # Tokens tied with the k-th value past the c candidates are kept too: the true
            # normaliser is larger by their mass, each the k-th candidate's.
            past = (scaled >= threshold).sum(dim=-1, keepdim=True) - (values >= threshold).sum(dim=-1, keepdim=True)
            limit = limit * (1 + past * (probs[:, -1:] if kth is None else probs.gather(1, kth)))
        # Candidates whose predecessors hold at most top-p of the mass form a prefix; its last
        # value is the cut (a tie group's first member has exactly its strictly larger mass before it).
        before = probs.cumsum(dim=-1) - probs
        cut = values.masked_fill(before > limit, float("inf")).amin(dim=-1, keepdim=True)
        threshold = cut if threshold is None else torch.maximum(threshold, cut)
    return scaled.masked_fill(scaled < threshold, float("-inf")), row_max


def _inverse_cdf(weights: torch.Tensor, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per row, the first column whose cumulative weight reaches ``uniform`` x the row's
    total, and that total): column j with probability ``weights[j] / total`` (uniform in
    (0, 1], so a zero-weight column is never chosen; weights >= 0 keep the cumulative sums
    sorted). The clamp only matters for NaN logits, which must not index out of range."""
    cum = weights.cumsum(dim=-1)
    total = cum[:, -1:]
    return torch.searchsorted(cum, uniform[:, None] * total)[:, 0].clamp_max_(weights.shape[-1] - 1), total[:, 0]


def _with_logprobs(tokens: torch.Tensor, logits: torch.Tensor, draw: _Draw, plan: SamplingPlan,
                   modes: torch.Tensor | None) -> SampledTokens:
    """Each row's log-prob of its token in its mode's distribution (greedy rows: raw), and
    the top-N of that distribution when asked: one source tensor whose row r is row r's
    mode's logits (a select per extra mode present), normalised by one logsumexp, kept as
    (max, log mass) and subtracted in that order: near the greedy temperature the scaled
    logits reach ~1e6, where max + log(mass) would round by up to 0.1 nats."""
    sources = {_RAW: logits, _TEMPERED: draw.scaled, _PROCESSED: draw.processed}
    present = sorted(plan.modes)
    source = sources[present[0]]
    for mode in present[1:]:
        if sources[mode] is not source:
            source = torch.where((modes == mode)[:, None], sources[mode], source)
    if source is draw.processed and draw.processed_norm is not None:
        shift, log_mass = draw.processed_norm
    else:
        shift = source.amax(dim=-1)
        shift = torch.where(torch.isfinite(shift), shift, 0.0)      # an all -inf row: logsumexp's -inf
        log_mass = torch.log(torch.exp(source - shift[:, None]).sum(dim=-1))
    out = SampledTokens(tokens, (source.gather(1, tokens[:, None])[:, 0] - shift) - log_mass)
    if plan.top_n:
        values, out.top_ids = source.topk(plan.top_n, dim=-1)
        out.top_logprobs = (values - shift[:, None]) - log_mass[:, None]
    return out
