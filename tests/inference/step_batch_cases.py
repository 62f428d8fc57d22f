"""Random steps for StepBatch tests and what each field must hold after ``prepare``,
computed from the chunks alone, row by row (as the per-tensor uploads delivered them)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from inference.request import Request, SamplingParams
from inference.scheduled_step import ScheduledChunk
from inference.step_batch import TokenFeed

BLOCK, DUMMY_BLOCK, DUMMY_SLOT = 4, 999, 77
MAX_TOKENS, MAX_REQUESTS, MAX_BLOCKS = 48, 8, 14
LADDER = (1, 2, 4, 8)


@dataclass
class Case:
    """One step: what ``prepare`` gets and the expected used rows of every field."""

    kind: str
    chunks: list[ScheduledChunk]
    kwargs: dict
    expected: dict[str, list] = field(default_factory=dict)
    block_rows: list[list[int]] = field(default_factory=list)   # row r must start with these


class StepCases:
    """A pool of requests that grow (their block lists appended to, now and then replaced:
    re-admission) and random steps over them: decode (padded to a ladder size or not, input
    tokens pending or on the host), prefill chunks, mixed steps; hybrid ones with state slots."""

    def __init__(self, seed: int, hybrid: bool, device: torch.device) -> None:
        self.rng = np.random.default_rng(seed)
        self.hybrid, self.device = hybrid, device
        self.pool = [self._new_request(i) for i in range(MAX_REQUESTS + 3)]
        self._next_block = 0

    def _new_request(self, i: int) -> Request:
        prompt = self.rng.integers(2, 5000, size=int(self.rng.integers(2, 30))).tolist()
        return Request(f"r{i}", prompt, SamplingParams())

    def _blocks_for(self, req: Request, positions: int) -> None:
        """Make ``req.block_ids`` cover ``positions`` (appending in place, or a new list)."""
        need = -(-positions // BLOCK) + int(self.rng.integers(0, 2))
        if self.rng.random() < 0.15:
            req.block_ids = []             # re-admitted: a new list object
        while len(req.block_ids) < min(need, MAX_BLOCKS):
            req.block_ids.append(int(self.rng.integers(0, 500)))

    def _decode_chunk(self, req: Request) -> ScheduledChunk:
        if not req.output_token_ids or (self.rng.random() < 0.5 and req.num_tokens + 2 <= MAX_BLOCKS * BLOCK):
            req.output_token_ids.append(int(self.rng.integers(2, 5000)))     # decoding went on
        req.num_pending_tokens = int(self.rng.random() < 0.6)
        start = req.num_scheduled_tokens - 1
        self._blocks_for(req, start + 1)
        return ScheduledChunk(req, start, 1, True)

    def _prefill_chunk(self, req: Request, budget: int) -> ScheduledChunk:
        req.num_pending_tokens, req.output_token_ids = 0, []
        total = min(req.num_tokens, MAX_BLOCKS * BLOCK)
        start = int(self.rng.integers(0, total))
        k = int(self.rng.integers(1, min(total - start, budget) + 1))
        self._blocks_for(req, start + k)
        return ScheduledChunk(req, start, k, start + k == req.num_tokens)

    def step(self, kind: str | None = None) -> Case:
        kind = kind or str(self.rng.choice(["decode", "padded decode", "prefill", "mixed", "padded mixed"]))
        order = self.rng.permutation(len(self.pool))
        num = int(self.rng.integers(1, (MAX_REQUESTS if "decode" in kind else 4) + 1))
        reqs = [self.pool[i] for i in order[:num]]
        if "decode" in kind:
            chunks = [self._decode_chunk(r) for r in reqs]
        else:
            num_decodes = int(self.rng.integers(0, num)) if "mixed" in kind else 0
            chunks = [self._decode_chunk(r) for r in reqs[:num_decodes]]
            budget = MAX_TOKENS - 8 - len(chunks)
            for r in reqs[num_decodes:]:
                if budget > 0:
                    chunks.append(self._prefill_chunk(r, max(1, budget // 2)))
                    budget -= chunks[-1].num_tokens
        kwargs: dict = {}
        n = sum(c.num_tokens for c in chunks)
        if kind == "padded decode":
            kwargs.update(num_padded_tokens=next(s for s in LADDER if s >= n), pad_requests=True)
        elif kind == "padded mixed":
            kwargs.update(num_padded_tokens=n + int(self.rng.integers(0, 6)), pad_requests=False)
        pending = [c.request for c in chunks if c.input_pending]
        if pending or self.rng.random() < 0.3:
            tokens = self.rng.integers(2, 5000, size=len(pending) + 2)
            sources = self.rng.permutation(len(tokens))[: len(pending)]
            kwargs["feed"] = TokenFeed(torch.tensor(tokens, device=self.device),
                                       {r: int(s) for r, s in zip(pending, sources)})
        if self.hybrid:
            kwargs["state_slots"] = [int(s) for s in self.rng.permutation(40)[: len(chunks)]]
        return expect(Case(kind, chunks, kwargs))


def expect(case: Case) -> Case:
    """The used rows of every field, one token row at a time."""
    kw, feed = case.kwargs, case.kwargs.get("feed")
    rows = {name: [] for name in ("input_ids", "positions", "token_to_block", "token_to_offset")}
    starts, seq_lens, logits, feed_rows, feed_sources = [0], [], [], [], []
    for chunk in case.chunks:
        req = chunk.request
        if chunk.input_pending:
            feed_rows.append(len(rows["input_ids"]))
            feed_sources.append(feed.source_rows[req])
        for pos in range(chunk.start, chunk.start + chunk.num_tokens):
            pending = pos >= req.num_tokens
            rows["input_ids"].append(int(feed.tokens[feed.source_rows[req]]) if pending else req.all_token_ids[pos])
            rows["positions"].append(pos)
            rows["token_to_block"].append(req.block_ids[pos // BLOCK])
            rows["token_to_offset"].append(pos % BLOCK)
        starts.append(len(rows["input_ids"]))
        seq_lens.append(chunk.start + chunk.num_tokens)
        if chunk.samples:
            logits.append(starts[-1] - 1)
    n = len(rows["input_ids"])
    padded = kw.get("num_padded_tokens") or n
    padded_reqs = padded if kw.get("num_padded_tokens") and kw.get("pad_requests", True) else len(case.chunks)
    for name, fill in (("input_ids", 0), ("positions", 0), ("token_to_block", DUMMY_BLOCK), ("token_to_offset", 0)):
        rows[name] += [fill] * (padded - n)
    rows["slot_mapping"] = [b * BLOCK + o for b, o in zip(rows["token_to_block"], rows["token_to_offset"])]
    pad = padded_reqs - len(case.chunks)
    rows.update(query_start_loc=starts + [n] * pad, seq_lens=seq_lens + [0] * pad, logits_indices=logits,
                feed_rows=feed_rows, feed_sources=feed_sources)
    if "state_slots" in kw:
        rows.update(state_slots=list(kw["state_slots"]) + [DUMMY_SLOT] * pad,
                    has_initial_state=[c.start > 0 for c in case.chunks] + [False] * pad)
    case.expected = rows
    case.block_rows = [list(c.request.block_ids) for c in case.chunks]
    return case


def snapshot(batch) -> dict[str, torch.Tensor]:
    """Device copies of every static field (enqueued now, so they see this step's values)."""
    names = [*FIELDS, "block_tables"] + (["state_slots", "has_initial_state"] if batch.state_slots is not None else [])
    return {name: getattr(batch, name).clone() for name in names}


FIELDS = ("input_ids", "positions", "token_to_block", "token_to_offset", "slot_mapping", "query_start_loc",
          "seq_lens", "logits_indices", "feed_rows", "feed_sources")


def mismatches(case: Case, fields: dict[str, torch.Tensor]) -> list[str]:
    """Fields (device tensors after ``prepare``) whose used rows differ from ``case.expected``."""
    bad = [name for name, want in case.expected.items() if fields[name][: len(want)].tolist() != want]
    table = fields["block_tables"]
    bad += [f"block_tables[{r}]" for r, blocks in enumerate(case.block_rows)
            if table[r, : len(blocks)].tolist() != blocks]
    return bad
