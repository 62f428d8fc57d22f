"""Per-step layout of a packed batch for recurrent layers (the analogue of AttentionMetadata)."""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

import torch


@dataclass
class RecurrentMetadata:
    """Sequence r of a step owns rows ``query_start_loc[r]:query_start_loc[r + 1]`` of the
    packed ``[num_tokens, ...]`` inputs and reads/writes state slot ``state_slots[r]`` of
    every recurrent layer. ``has_initial_state[r]`` False means its slot's content is
    ignored (a fresh sequence: zero state); True continues from it (a later prefill chunk,
    a decode step, or a restored prefix-cache checkpoint).

    Decode-only steps (every sequence has one row) take the batched path, which reads no
    host data: with ``state_slots`` a static tensor whose padding rows hold the pool's dummy
    slot, it is CUDA-graph capturable. Other steps loop over sequences on the host using
    ``query_start_loc_host``.
    """

    query_start_loc: torch.Tensor          # [R + 1] int32, on the device
    state_slots: torch.Tensor              # [R] int64, on the device
    has_initial_state: torch.Tensor        # [R] bool, on the device
    query_start_loc_host: list[int]
    state_slots_host: list[int]
    has_initial_state_host: list[bool]
    decode_only: bool

    @property
    def num_sequences(self) -> int:
        return len(self.query_start_loc_host) - 1

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc_host[-1]

    @classmethod
    def build(cls, query_lens: Sequence[int], state_slots: Sequence[int],
              has_initial_state: Sequence[bool], device: torch.device | str = "cpu") -> "RecurrentMetadata":
        """Metadata of one step from host lists (tests and the eager path)."""
        if not (len(query_lens) == len(state_slots) == len(has_initial_state)):
            raise ValueError(f"query_lens ({len(query_lens)}), state_slots ({len(state_slots)}) and "
                             f"has_initial_state ({len(has_initial_state)}) must have one entry per sequence")
        if any(n < 1 for n in query_lens):
            raise ValueError(f"every sequence needs at least one token, got query_lens={list(query_lens)}")
        if len(set(state_slots)) != len(state_slots):
            raise ValueError(f"two sequences of one step share a state slot: {list(state_slots)}")
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        flags = [bool(f) for f in has_initial_state]
        return cls(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            state_slots=torch.tensor(list(state_slots), dtype=torch.int64, device=device),
            has_initial_state=torch.tensor(flags, dtype=torch.bool, device=device),
            query_start_loc_host=starts,
            state_slots_host=[int(s) for s in state_slots],
            has_initial_state_host=flags,
            decode_only=all(n == 1 for n in query_lens),
        )

    def sequence_rows(self, r: int) -> slice:
        return slice(self.query_start_loc_host[r], self.query_start_loc_host[r + 1])

    def apply_per_sequence(self, out: torch.Tensor, states: torch.Tensor, step, whole) -> torch.Tensor:
        """The host loop of a step that is not decode-only, shared by the recurrences:
        single-token sequences in one batched ``step(rows, slots, has_initial_state)`` (device
        index tensors) whose result fills ``out[rows]``; every longer sequence through
        ``whole(rows, initial_state_or_None) -> (out_rows, final_state)``, its slot of
        ``states`` then overwritten with the final state. Returns ``out``."""
        starts = self.query_start_loc_host
        singles = [r for r in range(self.num_sequences) if starts[r + 1] - starts[r] == 1]
        if singles:
            rows = torch.tensor([starts[r] for r in singles], device=out.device)
            picked = torch.tensor(singles, device=out.device)
            out[rows] = step(rows, self.state_slots[picked], self.has_initial_state[picked])
        single_set = set(singles)
        for r, slot in enumerate(self.state_slots_host):
            if r in single_set:
                continue
            rows = self.sequence_rows(r)
            initial = states[slot] if self.has_initial_state_host[r] else None
            out[rows], final = whole(rows, initial)
            states[slot] = final.to(states.dtype)
        return out
