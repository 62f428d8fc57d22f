"""Sampling parameters, the mutable per-request state the scheduler drives, and results."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from inference.errors import InvalidRequestError

if TYPE_CHECKING:
    import numpy as np


# Below this a temperature is greedy (as in vLLM): dividing logits by 1e-40 overflows them
# to inf and turns the softmax into NaN.
GREEDY_TEMPERATURE = 1e-5
# Which distribution log-probs are taken from (see SamplingParams.logprobs_mode).
LOGPROBS_MODES = ("processed", "tempered", "raw")
MAX_TOP_LOGPROBS = 20


def _is_int(value: object) -> bool:
    # bool is an int subclass, but True as a token id or a count is always a caller mistake.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token and when to stop.

    Invariant: immutable; `stop_token_ids` and `stop` are always tuples (a list given to the
    constructor is converted), so instances are hashable. Values are checked by `validate`, not at
    construction, so the error can name the request that carried them.
    """

    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 (anything below GREEDY_TEMPERATURE) = greedy
    # Tokens tied at a cut are kept whole: top-k keeps every token at least as likely as the
    # k-th, top-p every token whose strictly more likely tokens hold at most top_p of the mass.
    top_k: int = 0  # 0 = disabled
    top_p: float = 1.0  # 1 = disabled
    seed: int | None = None  # draws are a function of (seed, position): inference.sampling.draws
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    # Stop strings (as in vLLM): the request finishes ("stop") on the first generated token
    # after which its output text (decoded with special tokens skipped, by the engine's
    # detokenizer) contains one of them; that token stays in the output. The prompt's text
    # never counts, nor does it serve as context: unlike vLLM, the output is decoded on its
    # own, so a SentencePiece-style tokenizer drops the first output token's leading space
    # and a stop string starting with a space cannot match at the very start of the output.
    # `include_stop_str_in_output` is for callers that return text: the
    # engine returns tokens, and text is cut at the stop string unless this is set.
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    # Log-probs. Every generated token's log-prob is always returned; ``logprobs`` adds the
    # top-N alternatives of each step, ``prompt_logprobs`` the log-prob of every prompt
    # token given the tokens before it. ``logprobs_mode`` picks the distribution:
    # "processed" (default) the one the token was sampled from: logits / temperature, then
    # top-k and top-p, renormalised; "tempered": logits / temperature, before top-k/top-p
    # (what a trainer computes from the same logits); "raw": softmax of the logits. Greedy
    # requests (temperature < GREEDY_TEMPERATURE) use the raw softmax in every mode. Prompt
    # log-probs never apply top-k/top-p ("processed" and "tempered" divide by the
    # temperature, "raw" does not).
    logprobs: int = 0
    prompt_logprobs: bool = False
    logprobs_mode: str = "processed"

    def __post_init__(self) -> None:
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def validate(self, request_id: str | None = None) -> None:
        """Raise InvalidRequestError naming the first bad field, its value and what is allowed."""

        def bad(name: str, allowed: str) -> InvalidRequestError:
            value = getattr(self, name)
            return InvalidRequestError(f"{name}={value!r} is invalid: {allowed}", request_id)

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "must be an int >= 1")
        temperature = self.temperature
        if (
            not isinstance(temperature, (int, float))
            or isinstance(temperature, bool)
            or not math.isfinite(temperature)
            or temperature < 0
        ):
            raise bad("temperature", "must be a finite number >= 0 (0 = greedy)")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "must be an int >= 0 (0 = disabled)")
        top_p = self.top_p
        if (
            not isinstance(top_p, (int, float))
            or isinstance(top_p, bool)
            or not (0.0 < top_p <= 1.0)
        ):
            raise bad("top_p", "must be in (0, 1] (1 = disabled)")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise bad("seed", "must be None or an int >= 0")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "must be a bool")
        if not isinstance(self.stop_token_ids, tuple) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise bad("stop_token_ids", "must be a tuple of ints >= 0")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a tuple of non-empty strings")
        if not isinstance(self.include_stop_str_in_output, bool):
            raise bad("include_stop_str_in_output", "must be a bool")
        if not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise bad("logprobs", f"must be an int in [0, {MAX_TOP_LOGPROBS}] (top alternatives per token)")
        if not isinstance(self.prompt_logprobs, bool):
            raise bad("prompt_logprobs", "must be a bool")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise bad("logprobs_mode", f"must be one of {LOGPROBS_MODES}")


class RequestStatus(Enum):
    """Where a request is in its life: queued, holding KV blocks, or done."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One generation request, mutated in place by the scheduler.

    Invariant: `num_computed_tokens <= num_tokens + num_pending_tokens`; the KV (and
    routing) of positions `[0, num_computed_tokens)` lives (or is being written by a launched
    step) in `block_ids`, in position order, `block_size` positions per block. A WAITING
    request holds no blocks and has `num_computed_tokens == 0`; a FINISHED one holds no
    blocks. `num_pending_tokens` (0 or 1) counts tokens a launched step has sampled that the
    host has not received yet: the next one sits at position `num_tokens`. Identity equality:
    two requests are never "equal" just because their fields match.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_index: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # positions whose KV (and routing) a launched step writes into block_ids
    num_pending_tokens: int = 0  # sampled on the device by a launched step, not yet on the host
    num_cached_tokens: int = 0  # prompt tokens served by prefix-cache hits on first admission
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    finish_reason: str | None = None  # "stop" | "length"; None while unfinished or aborted
    stop_string: str | None = None    # the stop string its output text completed, if that finished it
    # One per received output token (the engine appends them with the tokens).
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: dict[int, float] = field(default_factory=dict)   # position -> log-prob of its token

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens; the last generated one has not been computed yet."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens the schedule may compute: known ones plus those still on their way."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def all_token_ids(self) -> list[int]:
        """A new list: prompt followed by generated tokens."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def token_slice(self, start: int, stop: int) -> list[int]:
        """Tokens at positions `[start, stop)` of `all_token_ids`, without building it whole."""
        num_prompt = len(self.prompt_token_ids)
        if stop <= num_prompt:
            return self.prompt_token_ids[start:stop]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : stop - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - num_prompt]


@dataclass
class RequestResult:
    """What the caller gets back for one request.

    Invariant: `error` is set exactly when `finish_reason == "error"`; `routing`, once the
    engine fills it in, has `len(prompt_token_ids) + len(output_token_ids) - 1 - routing_start`
    rows (row j is the routing of token `routing_start + j`); `output_logprobs` has one
    float32 value per output token (`output_top_logprobs` one list of at most N (token,
    log-prob) pairs per output token when top-N was asked, finite, most likely first); `prompt_logprobs`, when asked, has one
    entry per prompt token, `None` for the first; `weight_version` names the weights that
    produced the tokens; `stop_string` is set only when `finish_reason == "stop"` (the stop
    string the output text completed; None for an EOS or stop token).
    """

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "error"
    error: str | None = None
    routing: np.ndarray | None = None
    routing_start: int = 0  # first routing row returned (suffix output for multi-turn callers)
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    output_logprobs: list[float] | None = None
    output_top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list[float | None] | None = None
    weight_version: int | str | None = None
    stop_string: str | None = None

    @classmethod
    def from_request(cls, request: Request) -> RequestResult:
        """Snapshot a finished request; the lists are copies, so the request may be reused."""
        if request.finish_reason is None:
            raise ValueError(
                f"request {request.request_id!r} has no finish reason "
                f"(status {request.status.value}); only finished requests have results"
            )
        return cls(
            request_id=request.request_id,
            prompt_token_ids=list(request.prompt_token_ids),
            output_token_ids=list(request.output_token_ids),
            finish_reason=request.finish_reason,
            stop_string=request.stop_string,
            num_cached_tokens=request.num_cached_tokens,
            num_preemptions=request.num_preemptions,
            output_logprobs=list(request.output_logprobs),
            output_top_logprobs=list(request.output_top_logprobs) if request.sampling_params.logprobs else None,
            prompt_logprobs=([request.prompt_logprobs.get(p) for p in range(request.num_prompt_tokens)]
                             if request.sampling_params.prompt_logprobs else None),
        )

    @classmethod
    def failed(cls, request_id: str, prompt_token_ids: list[int], message: str) -> RequestResult:
        """A result for a request that was rejected or could not be served."""
        return cls(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            output_token_ids=[],
            finish_reason="error",
            error=message,
        )
