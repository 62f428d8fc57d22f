"""Fused sampling: two Triton kernels draw every row of a step's logits, with top-k / top-p
found without sorting the vocabulary.

``fused_sample`` computes what ``inference.sampling.sampler`` computes with torch ops (the
same kept sets, the same inverse CDF in vocab order, the same log-prob modes), from the
same per-row table, in two launches instead of about twenty, and without materialising any
``[S, V]`` intermediate.

1. ``_segment_kernel``, one program per (row, segment of ``SEGMENT`` columns): the
   segment's max / arg-max / sum-exp of the raw and of the scaled (``logits / T``) values;
   for a row that filters, also a *bound*: the lowest of a ladder of levels below the
   segment's max that at most ``CANDIDATES`` of its values exceed, and those values (their
   order-preserving integer keys packed with the column). No sort: one count per level.
2. ``_finish_kernel``, one program per row, combines the segments. Every value above the
   largest of the segments' bounds is among the candidates (sorted here, at most
   ``MAX_SEGMENTS x CANDIDATES`` of them), so when
   the candidates above the bound hold at least k values (top-k) and more than p of the
   kept mass (top-p), both cuts are found exactly among them. The draw picks the segment
   whose running (kept) mass reaches ``uniform x mass`` and scans that segment alone.
   A row whose cut lies below the bound (a very flat distribution) falls back to an exact
   search over the whole row in that program: a (P+1)-ary search over the keys, each pass
   counting (top-k) or summing the mass (top-p) of the values beyond each of P pivots.

Both cuts keep ties whole and depend only on the values, as the torch path's do: the
k-th largest *value* bounds top-k, and top-p compares the mass of *strictly* larger values.
Only float32 rounding of the masses can move a cut or a draw boundary relative to the
torch path, as CUDA's and the CPU's reductions already do between themselves.

Greedy rows (``sampled`` 0) take the first arg-max of the raw row. Log-probs (``mode``:
``inference.request.LOGPROBS_MODES``): raw ``logit - lse(logits)``, tempered
``x - lse(x)``, processed ``x - (max + log(kept mass))``, each computed as
``(x - max) - log(mass)`` (exact near the max even where x is ~1e6). The top-N alternatives
are not computed here (the sampler keeps its torch path when they are asked).

No host sync; the grids and the allocations depend on shapes only.
"""

from __future__ import annotations

import torch

from inference.request import LOGPROBS_MODES

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the sampler keeps its torch path there
    triton = None
    tl = None

SEGMENT = 4096         # columns per segment program (raised so that a row has at most MAX_SEGMENTS)
MAX_SEGMENTS = 64
CANDIDATES = 64        # at most this many values per segment of a filtering row become candidates
SCAN_BLOCK = 4096      # columns per step of the fallback's mass and draw passes
# Fallback search: 1024 x 8 beat 512 x 16, 2048 x 4 and 256 x 32 on the H200, and pipelined
# loads (tl.range num_stages 2-3) made every pass 2-3x slower (docs/BENCHMARKS.md, stop 23).
SEARCH_BLOCK = 1024    # columns per step of a fallback search pass (x PIVOTS accumulators)
PIVOTS = 8             # pivots per fallback search pass: the key interval shrinks 9x per pass
_MODE = {name: code for code, name in enumerate(LOGPROBS_MODES)}
PATHS = ("greedy", "unfiltered", "candidates", "search")   # codes written to ``paths``
TABLE_COLUMNS = 6      # temperature, top_k, top_p, uniform, mode, sampled (the sampler's table)


def fused_sample_available() -> bool:
    return triton is not None


def fused_sample(logits: torch.Tensor, table: torch.Tensor | None, *, top_k: bool, top_p: bool,
                 logprobs: bool, segment: int | None = None, candidates: int = CANDIDATES,
                 paths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tokens int64 [S], log-probs float32 [S] or None) for fp32 ``logits`` [S, V] (unit
    column stride) and the sampler's float32 ``table`` [S, 6] on the same device (None: every
    row greedy). ``top_k`` / ``top_p``: whether any row may cut there (False skips that code;
    a row cuts when its k < V / its p < 1). ``segment`` / ``candidates`` (powers of two) are
    for tests; ``paths`` (int32 [S]) receives which path each row took (``PATHS``). Runs on
    CUDA tensors, or anywhere under TRITON_INTERPRET=1."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(f"fused_sample: fp32 [S, V] logits with unit column stride, got {logits.dtype} "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    s, v = logits.shape
    if table is not None and (table.shape != (s, TABLE_COLUMNS) or table.dtype != torch.float32
                              or not table.is_contiguous() or table.device != logits.device):
        raise ValueError(f"fused_sample: the table must be contiguous float32 [{s}, {TABLE_COLUMNS}] on "
                         f"{logits.device}, got {table.dtype} {tuple(table.shape)} on {table.device}")
    if paths is not None and (paths.shape != (s,) or paths.dtype != torch.int32 or paths.device != logits.device):
        raise ValueError(f"fused_sample: paths must be int32 [{s}] on {logits.device}")
    seg = segment or max(SEGMENT, triton.next_power_of_2(triton.cdiv(v, MAX_SEGMENTS)))
    if seg & (seg - 1) or candidates & (candidates - 1):
        raise ValueError(f"fused_sample: segment and candidates must be powers of two, got {seg}, {candidates}")
    tokens = torch.empty(s, dtype=torch.int64, device=logits.device)
    out = torch.empty(s if logprobs else 1, dtype=torch.float32, device=logits.device)
    if s == 0:
        return tokens, out if logprobs else None
    num_segments = triton.cdiv(v, seg)
    padded = triton.next_power_of_2(num_segments)
    filters = table is not None and (top_k or top_p)
    stats = torch.empty(s, padded, 5, dtype=torch.float32, device=logits.device)
    cand = torch.empty(s, padded, candidates if filters else 1, dtype=torch.int64, device=logits.device)
    bound = torch.empty(s, padded, 2, dtype=torch.int32, device=logits.device)      # per segment: bound key, count
    table_arg = table if table is not None else logits
    flags = dict(GREEDY_ONLY=table is None, TOP_K=top_k and table is not None, TOP_P=top_p and table is not None,
                 SEG=seg, C=candidates)
    _segment_kernel[(s, num_segments)](
        logits, logits.stride(0), table_arg, stats, cand, bound, v, padded, **flags, LEVELS=16, num_warps=8)
    _finish_kernel[(s,)](
        logits, logits.stride(0), table_arg, stats, cand, bound, tokens, out, paths if paths is not None else bound,
        v, num_segments, **flags, LOGPROBS=logprobs, PATH_OUT=paths is not None, RAW=_MODE["raw"],
        TEMPERED=_MODE["tempered"], GP=padded, SCAN=SCAN_BLOCK, SEARCH=SEARCH_BLOCK, P=PIVOTS, num_warps=8)
    return tokens, out if logprobs else None


if triton is not None:
    _KEY_MIN = tl.constexpr(-2147483647 - 1)            # below every order key: keeps every value
    _KEY_MAX = tl.constexpr(2147483647)
    _PACKED_MIN = tl.constexpr(-9223372036854775807 - 1)   # below every packed (key, column)

    @triton.jit
    def _order_key(x):
        """int32 keys ordered as the float32 values (-0 and +0 share key 0)."""
        bits = x.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        return tl.where(x == 0.0, 0, key)

    @triton.jit
    def _scaled(row_ptr, idx, v, temperature):
        valid = idx < v
        raw = tl.load(row_ptr + idx, mask=valid, other=float("-inf"))
        return raw / temperature, valid

    @triton.jit
    def _mass_at_least(row_ptr, v, temperature, row_max, threshold, SCAN: tl.constexpr):
        """Sum of exp(x - row_max) over the scaled values x whose key is >= ``threshold``,
        accumulated chunk by chunk in column order (the draw pass sums the same way)."""
        offs = tl.arange(0, SCAN)
        total = tl.zeros([], dtype=tl.float32)
        for start in range(0, v, SCAN):
            x, valid = _scaled(row_ptr, start + offs, v, temperature)
            w = tl.where(valid & (_order_key(x) >= threshold), tl.exp(x - row_max), 0.0)
            total += tl.sum(w, axis=0)
        return total

    @triton.jit
    def _kth_largest_key(row_ptr, v, temperature, lo, hi, k, SEARCH: tl.constexpr, P: tl.constexpr):
        """The largest key K in [lo, hi] that at least k values reach (given that k values
        reach ``lo``): the key of the k-th largest value."""
        offs = tl.arange(0, SEARCH)
        j = tl.arange(0, P).to(tl.int64)
        lo = lo.to(tl.int64)
        hi = hi.to(tl.int64)
        while lo < hi:
            pivots = (lo + ((hi - lo) * (j + 1) + P - 1) // P).to(tl.int32)     # in (lo, hi], the last = hi
            counts = tl.zeros([SEARCH, P], dtype=tl.int32)
            for start in range(0, v, SEARCH):
                x, valid = _scaled(row_ptr, start + offs, v, temperature)
                reach = (_order_key(x)[:, None] >= pivots[None, :]) & valid[:, None]
                counts += reach.to(tl.int32)
            ok = tl.sum(counts, axis=0) >= k
            new_lo = tl.max(tl.where(ok, pivots.to(tl.int64), lo), axis=0)
            hi = tl.min(tl.where(ok, hi, pivots.to(tl.int64) - 1), axis=0)
            lo = new_lo
        return lo.to(tl.int32)

    @triton.jit
    def _top_p_key(row_ptr, v, temperature, row_max, lo, hi, limit, SEARCH: tl.constexpr, P: tl.constexpr):
        """The smallest key K in [lo, hi] whose strictly larger values hold at most ``limit``
        of exp(x - row_max) (given that ``hi`` is such a key). Every pivot's mass is summed
        in the same order, so the masses are monotone in the pivot."""
        offs = tl.arange(0, SEARCH)
        j = tl.arange(0, P).to(tl.int64)
        lo = lo.to(tl.int64)
        hi = hi.to(tl.int64)
        while lo < hi:
            pivots = (lo + ((hi - lo) * j) // P).to(tl.int32)                     # in [lo, hi), the first = lo
            mass = tl.zeros([SEARCH, P], dtype=tl.float32)
            for start in range(0, v, SEARCH):
                x, valid = _scaled(row_ptr, start + offs, v, temperature)
                w = tl.where(valid, tl.exp(x - row_max), 0.0)
                mass += tl.where(_order_key(x)[:, None] > pivots[None, :], w[:, None], 0.0)
            ok = tl.sum(mass, axis=0) <= limit
            new_hi = tl.min(tl.where(ok, pivots.to(tl.int64), hi), axis=0)
            lo = tl.max(tl.where(ok, lo, pivots.to(tl.int64) + 1), axis=0)
            hi = new_hi
        return lo.to(tl.int32)

    @triton.jit
    def _draw(row_ptr, v, temperature, row_max, threshold, target, SCAN: tl.constexpr):
        """The first column whose running kept weight reaches ``target`` (the last kept
        column if rounding leaves the target unreached; v - 1 if nothing is kept)."""
        offs = tl.arange(0, SCAN)
        running = tl.zeros([], dtype=tl.float32)
        token = tl.full([], -1, dtype=tl.int32)
        last = tl.full([], -1, dtype=tl.int32)
        start = 0
        while (start < v) & (token < 0):
            idx = start + offs
            x, valid = _scaled(row_ptr, idx, v, temperature)
            w = tl.where(valid & (_order_key(x) >= threshold), tl.exp(x - row_max), 0.0)
            reached = ((tl.cumsum(w, axis=0) + running) >= target) & (w > 0)
            token = tl.min(tl.where(reached, idx, v), axis=0)
            token = tl.where(token < v, token, -1)
            last = tl.maximum(last, tl.max(tl.where(w > 0, idx, -1), axis=0))
            running += tl.sum(w, axis=0)
            start += SCAN
        return tl.where(token >= 0, token, tl.where(last >= 0, last, v - 1))

    @triton.jit
    def _from_key(key):
        """The float32 value of an order key (inverse of ``_order_key``)."""
        bits = key ^ ((key >> 31) & 0x7FFFFFFF)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _row_params(table_ptr, row, v, GREEDY_ONLY: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr):
        """(temperature, sampled, k, top-p, whether the row cuts at all) of one table row."""
        temperature = 1.0
        sampled = False
        k = v
        top_p = 1.0
        if not GREEDY_ONLY:
            temperature = tl.load(table_ptr + row * 6)
            sampled = tl.load(table_ptr + row * 6 + 5) > 0
        if TOP_K:
            k = tl.load(table_ptr + row * 6 + 1).to(tl.int32)
        if TOP_P:
            top_p = tl.load(table_ptr + row * 6 + 2)
        return temperature, sampled, k, top_p, sampled & ((k < v) | (top_p < 1.0))

    @triton.jit
    def _segment_kernel(logits_ptr, row_stride, table_ptr, stats_ptr, cand_ptr, bound_ptr, v, padded,
                        GREEDY_ONLY: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr,
                        SEG: tl.constexpr, C: tl.constexpr, LEVELS: tl.constexpr):
        row = tl.program_id(0)
        g = tl.program_id(1)
        temperature, sampled, k, top_p, cuts = _row_params(table_ptr, row, v, GREEDY_ONLY, TOP_K, TOP_P)
        idx = g * SEG + tl.arange(0, SEG)
        valid = idx < v
        raw = tl.load(logits_ptr + row.to(tl.int64) * row_stride + idx, mask=valid, other=float("-inf"))
        raw_max = tl.max(raw, axis=0)
        out = stats_ptr + (row * padded + g) * 5
        tl.store(out, raw_max)
        # A segment of -inf alone (a padded vocab) sums to 0, not NaN.
        tl.store(out + 1, tl.sum(tl.exp(raw - tl.where(raw_max > float("-inf"), raw_max, 0.0)), axis=0))
        tl.store(out + 2, (g * SEG + tl.argmax(raw, axis=0, tie_break_left=True)).to(tl.float32, bitcast=True))
        x = raw / temperature
        x_max = tl.max(x, axis=0)
        tl.store(out + 3, x_max)
        tl.store(out + 4, tl.sum(tl.exp(x - tl.where(x_max > float("-inf"), x_max, 0.0)), axis=0))
        if TOP_K or TOP_P:
            if cuts:
                # The bound: the lowest of LEVELS levels below the segment's max (0, 0.25, 1, 2.25, ...
                # nats, then -inf), refined by LEVELS more, that at most C values exceed; those
                # values (packed with their column) are the candidates, in column order. Any
                # level would be exact; a lower one lets the finish kernel's fast path cover more.
                j = tl.arange(0, LEVELS)
                depth = tl.where(j == LEVELS - 1, float("inf"), 0.25 * (j * j).to(tl.float32))
                # The last level is -inf itself, not x_max - inf: that is NaN for a +inf max (and
                # for the interpreter's NaN max), which no value exceeds, so a segment of more than
                # C values would pick it and store past its C candidate slots.
                ladder = tl.where(j == LEVELS - 1, float("-inf"), x_max - depth)
                counts = tl.sum((x[:, None] > ladder[None, :]).to(tl.int32), axis=0)
                best = tl.max(tl.where(counts <= C, j, 0), axis=0)
                # Then LEVELS finer levels between that depth and the next one.
                shallow = tl.sum(tl.where(j == best, depth, 0.0), axis=0)
                deep = tl.sum(tl.where(j == best + 1, depth, 0.0), axis=0)
                deep = tl.where(deep == float("inf"), 2.0 * shallow + 1.0, deep)
                fine = x_max - (shallow + (deep - shallow) * (j + 1).to(tl.float32) / LEVELS)
                fine_counts = tl.sum((x[:, None] > fine[None, :]).to(tl.int32), axis=0)
                fine_best = tl.max(tl.where(fine_counts <= C, j, -1), axis=0)
                level = tl.where(fine_best >= 0, tl.sum(tl.where(j == fine_best, fine, 0.0), axis=0), x_max - shallow)
                level = tl.where(best == LEVELS - 1, float("-inf"), level)
                chosen = x > level
                slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
                packed = (_order_key(x).to(tl.int64) << 32) | idx.to(tl.int64)
                tl.store(cand_ptr + (row * padded + g) * C + slot, packed, mask=chosen)
                tl.store(bound_ptr + (row * padded + g) * 2, _order_key(level))
                tl.store(bound_ptr + (row * padded + g) * 2 + 1, tl.sum(chosen.to(tl.int32), axis=0))

    @triton.jit
    def _finish_kernel(logits_ptr, row_stride, table_ptr, stats_ptr, cand_ptr, bound_ptr, tokens_ptr, logprobs_ptr,
                       paths_ptr, v, num_segments, GREEDY_ONLY: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr,
                       LOGPROBS: tl.constexpr, PATH_OUT: tl.constexpr, RAW: tl.constexpr, TEMPERED: tl.constexpr, SEG: tl.constexpr,
                       C: tl.constexpr, GP: tl.constexpr, SCAN: tl.constexpr, SEARCH: tl.constexpr, P: tl.constexpr):
        row = tl.program_id(0)
        row_ptr = logits_ptr + row.to(tl.int64) * row_stride
        temperature, sampled, k, top_p, cuts = _row_params(table_ptr, row, v, GREEDY_ONLY, TOP_K, TOP_P)
        g = tl.arange(0, GP)
        seg_ok = g < num_segments
        stats = stats_ptr + (row * GP + g) * 5
        seg_raw_max = tl.load(stats, mask=seg_ok, other=float("-inf"))
        raw_max = tl.max(seg_raw_max, axis=0)
        raw_sum = tl.sum(tl.where(seg_ok, tl.load(stats + 1, mask=seg_ok, other=0.0) * tl.exp(seg_raw_max - raw_max),
                                  0.0), axis=0)
        seg_arg = tl.load(stats + 2, mask=seg_ok, other=0.0).to(tl.int32, bitcast=True)
        # The first segment holding the row's max has its first arg-max (segments in column order).
        first = tl.min(tl.where(seg_ok & (seg_raw_max == raw_max), g, GP), axis=0)
        token = tl.sum(tl.where(g == first, seg_arg, 0), axis=0)
        seg_max = tl.load(stats + 3, mask=seg_ok, other=float("-inf"))
        row_max = tl.max(seg_max, axis=0)
        seg_mass = tl.where(seg_ok, tl.load(stats + 4, mask=seg_ok, other=0.0) * tl.exp(seg_max - row_max), 0.0)
        scaled_sum = tl.sum(seg_mass, axis=0)
        mass = scaled_sum
        path = tl.full([], 0, dtype=tl.int32)
        if sampled:
            path = tl.full([], 1, dtype=tl.int32)
            threshold = tl.full([], _KEY_MIN, dtype=tl.int32)      # every value kept
            exact = tl.full([], 1, dtype=tl.int1)
            if TOP_K or TOP_P:
                if cuts:
                    # Candidates [GP, C]: segment g's values above its bound; exact above the largest bound.
                    rank = tl.arange(0, C)
                    filled = tl.load(bound_ptr + (row * GP + g) * 2 + 1, mask=seg_ok, other=0)
                    cand = tl.load(cand_ptr + (row * GP + g[:, None]) * C + rank[None, :],
                                   mask=rank[None, :] < filled[:, None], other=_PACKED_MIN)
                    bound = tl.max(tl.load(bound_ptr + (row * GP + g) * 2, mask=seg_ok, other=_KEY_MIN), axis=0)
                    key = (cand >> 32).to(tl.int32)
                    above = key > bound
                    weight = tl.where(above, tl.exp(_from_key(key) - row_max), 0.0)
                    flat_key = tl.reshape(tl.where(above, cand, _PACKED_MIN), [GP * C])
                    ranked = tl.sort(flat_key, descending=True)
                    ranked_key = (ranked >> 32).to(tl.int32)
                    position = tl.arange(0, GP * C)
                    ranked_ok = ranked_key > bound
                    if TOP_K:
                        if k < v:
                            exact = tl.sum(ranked_ok.to(tl.int32), axis=0) >= k
                            threshold = tl.max(tl.where(position == k - 1, ranked_key, _KEY_MIN), axis=0)
                    if TOP_P:
                        if top_p < 1.0:
                            ranked_w = tl.where(ranked_ok, tl.exp(_from_key(ranked_key) - row_max), 0.0)
                            kept = tl.where(ranked_key >= threshold, ranked_w, 0.0)
                            total = scaled_sum
                            if TOP_K:
                                if k < v:
                                    total = tl.sum(kept, axis=0)
                            limit = top_p * total
                            before = tl.cumsum(kept, axis=0) - kept
                            cut = tl.min(tl.where(ranked_ok & (ranked_key >= threshold) & (before <= limit), ranked_key,
                                                  _KEY_MAX), axis=0)
                            exact = exact & (tl.sum(kept, axis=0) > limit)
                            threshold = tl.maximum(threshold, cut)
                    path = tl.where(exact, 2, 3)
                    if exact:
                        seg_mass = tl.sum(tl.where(key >= threshold, weight, 0.0), axis=1)
                        mass = tl.sum(seg_mass, axis=0)
            if exact:
                # The segment whose running mass reaches the target, then the column inside it.
                target = tl.load(table_ptr + row * 6 + 3) * mass
                running = tl.cumsum(seg_mass, axis=0)
                chosen = tl.min(tl.where(seg_ok & (running >= target) & (seg_mass > 0), g, GP), axis=0)
                chosen = tl.where(chosen < GP, chosen, tl.max(tl.where(seg_mass > 0, g, 0), axis=0))
                start = tl.sum(tl.where(g == chosen, running - seg_mass, 0.0), axis=0)
                idx = chosen * SEG + tl.arange(0, SEG)
                valid = idx < v
                x = tl.load(row_ptr + idx, mask=valid, other=float("-inf")) / temperature
                w = tl.where(valid & (_order_key(x) >= threshold), tl.exp(x - row_max), 0.0)
                reached = ((tl.cumsum(w, axis=0) + start) >= target) & (w > 0)
                hit = tl.min(tl.where(reached, idx, v), axis=0)
                last = tl.max(tl.where(w > 0, idx, -1), axis=0)
                token = tl.where(hit < v, hit, tl.where(last >= 0, last, v - 1))
            else:
                # The cut lies below the bound: the exact search over the whole row.
                low_key = tl.full([], _KEY_MIN, dtype=tl.int32)
                threshold = low_key
                if TOP_K:
                    if k < v:
                        threshold = _kth_largest_key(row_ptr, v, temperature, low_key, _order_key(row_max), k,
                                                     SEARCH, P)
                if TOP_P:
                    if top_p < 1.0:
                        kept = _mass_at_least(row_ptr, v, temperature, row_max, threshold, SCAN)
                        threshold = _top_p_key(row_ptr, v, temperature, row_max, threshold, _order_key(row_max),
                                               top_p * kept, SEARCH, P)
                mass = _mass_at_least(row_ptr, v, temperature, row_max, threshold, SCAN)
                target = tl.load(table_ptr + row * 6 + 3) * mass
                token = _draw(row_ptr, v, temperature, row_max, threshold, target, SCAN)
        tl.store(tokens_ptr + row, token.to(tl.int64))
        if PATH_OUT:
            tl.store(paths_ptr + row, path)
        if LOGPROBS:
            # The max first: near the greedy temperature the scaled values reach ~1e6, where
            # max + log(mass) would round to a step of 0.1 nats; x - max is exact near the max.
            raw_token = tl.load(row_ptr + token)
            logprob = (raw_token - raw_max) - tl.log(raw_sum)
            if sampled:
                mode = tl.load(table_ptr + row * 6 + 4).to(tl.int32)
                x_token = raw_token / temperature
                if mode == TEMPERED:
                    logprob = (x_token - row_max) - tl.log(scaled_sum)
                elif mode != RAW:
                    logprob = (x_token - row_max) - tl.log(mass)
            tl.store(logprobs_ptr + row, logprob)
