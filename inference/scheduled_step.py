"""What the scheduler hands out for one step: the chunks to compute (``ScheduledChunk``)
and the step as a whole (``SchedulerOutput``). The step batch, the model runner, the
sequence caches and the step log read these; only ``inference.scheduler`` makes them."""

from __future__ import annotations

from dataclasses import dataclass, field

from inference.request import Request


@dataclass
class ScheduledChunk:
    """Positions `[start, start + num_tokens)` of `request` to compute this step.

    Invariant: `start` is the request's `num_computed_tokens` when scheduled; `samples` is
    True exactly when the chunk reaches the request's last (possibly pending) token, so the
    engine samples the next one; `input_pending` is True when the chunk's one input token is
    still on the device (sampled by the previous step); `is_decode` and `input_pending` are
    fixed at construction (the request changes afterwards).
    """

    request: Request
    start: int
    num_tokens: int
    samples: bool
    is_decode: bool = field(init=False)
    input_pending: bool = field(init=False)

    def __post_init__(self) -> None:
        req = self.request
        self.input_pending = self.start >= req.num_tokens
        self.is_decode = (
            self.num_tokens == 1
            and self.start == req.num_scheduled_tokens - 1
            and (bool(req.output_token_ids) or req.num_pending_tokens > 0)
        )


@dataclass
class SchedulerOutput:
    """What to run this step.

    Invariant: decode chunks come before prefill chunks; no request appears twice;
    `num_tokens` never exceeds the config's `max_step_tokens`.
    """

    chunks: list[ScheduledChunk]  # empty when there is nothing to do
    preempted: list[Request]  # preempted during this schedule() call, now WAITING
    applied: bool = False  # set by Scheduler.update(); an output is applied once

    @property
    def num_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunks)

    @staticmethod
    def is_decode(chunk: ScheduledChunk) -> bool:
        """Whether `chunk` is a one-token decode (the same as `chunk.is_decode`)."""
        return chunk.is_decode

    @property
    def num_decode_requests(self) -> int:
        return sum(chunk.is_decode for chunk in self.chunks)

    @property
    def num_prefill_requests(self) -> int:
        return len(self.chunks) - self.num_decode_requests
