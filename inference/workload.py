"""Where prompts come from: a JSONL prompts file or a seeded synthetic workload."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import orjson

from routing_replay.run_layout import request_id_problem


@dataclass(frozen=True)
class PromptSpec:
    """One request to serve: its id, tokens and optional per-request token limit. For a
    text prompt, ``prompt_token_ids`` is the tokenizer's encoding of ``prompt_text``. A
    sample of an RL group (``with_samples``) names its prompt and its index in the group;
    both are None otherwise."""

    request_id: str
    prompt_token_ids: list[int]
    max_new_tokens: int | None = None
    prompt_text: str | None = None
    routing_start: int = 0          # first routing row to return (multi-turn suffix output)
    problem: str | None = None      # why this request cannot be served (it fails alone, the others run)
    prompt_id: str | None = None    # the prompt this request samples (RL groups)
    sample_index: int | None = None  # 0 .. samples per prompt - 1
    from_text: bool = False         # encoded by a tokenizer (a text or chat prompt)
    stop: tuple[str, ...] | None = None   # the line's own stop strings (None: the run's)

    def __post_init__(self) -> None:
        if self.prompt_text is not None:
            object.__setattr__(self, "from_text", True)


class TextEncoder(Protocol):
    """What text and chat prompts need of a tokenizer: ``encode`` a text, and ``encode_chat``
    a list of chat messages through the tokenizer's chat template, ending with the prompt of
    the assistant's turn (``tools.run_setup`` wraps a transformers tokenizer so). Both raise
    ValueError when no tokenizer (or template) can do it at all, ``ChatRefused`` when the
    template refuses one chat."""

    def encode(self, text: str) -> list[int]: ...

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]: ...


PROMPT_KEYS = ("prompt_token_ids", "prompt", "messages")


class ChatRefused(ValueError):
    """A chat template refused one conversation (e.g. roles that do not alternate): that
    request fails alone, with this message."""


class PromptsFileError(ValueError):
    """The prompts file cannot be read; the message names the file and line."""


def read_prompts_file(path: str | Path, tokenizer: TextEncoder | None = None) -> list[PromptSpec]:
    """JSONL, one object per line: ``{"id": str|int, "prompt_token_ids": [int, ...]}``,
    ``{"id": ..., "prompt": "text"}`` or ``{"id": ..., "messages": [{"role": ..., "content":
    ...}, ...]}`` (a chat, rendered by the tokenizer's chat template with the assistant's
    turn opened; exactly one of the three), optionally with
    ``"max_new_tokens"``, ``"routing_start"`` and ``"stop"`` (a non-empty string or a list of
    them: the line's stop strings, replacing the run's). Ids are strings (integers are converted):
    non-empty, at most 256 characters, no control characters. Text is encoded by
    ``tokenizer.encode(text)`` (special tokens as the tokenizer adds them by default); the
    tokenizer is asked for nothing unless a text or chat line exists. Blank lines are skipped. Structural problems (bad JSON, missing keys, duplicate
    ids) fail the whole file; bad token values are left for the engine, which fails that
    request alone, and so does a chat its template refuses (``PromptSpec.problem``)."""
    path = Path(path)
    if not path.is_file():
        raise PromptsFileError(f"--prompts-file: {path} does not exist or is not a file")
    specs, seen = [], set()
    for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        spec = _parse_line(line, f"--prompts-file {path}, line {lineno}", tokenizer)
        if spec.request_id in seen:
            raise PromptsFileError(f"--prompts-file {path}, line {lineno}: duplicate id {spec.request_id!r}")
        seen.add(spec.request_id)
        specs.append(spec)
    if not specs:
        raise PromptsFileError(f"--prompts-file {path}: no prompts in the file")
    return specs


def _parse_line(line: bytes, where: str, tokenizer: TextEncoder | None) -> PromptSpec:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise PromptsFileError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise PromptsFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "id" not in obj:
        raise PromptsFileError(f"{where}: missing key 'id'")
    request_id = _request_id(obj["id"], where)
    given = [key for key in PROMPT_KEYS if key in obj]
    if len(given) != 1:
        found = " and ".join(repr(k) for k in given) if given else "none"
        raise PromptsFileError(f"{where}: give exactly one of 'prompt_token_ids', 'prompt' and 'messages' "
                               f"(found {found})")
    limit = obj.get("max_new_tokens")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise PromptsFileError(f"{where}: max_new_tokens must be an int >= 1")
    start = obj.get("routing_start", 0)
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise PromptsFileError(f"{where}: routing_start must be an int >= 0")
    return replace(_parse_prompt(obj, given, request_id, limit, start, where, tokenizer), stop=_stop(obj, where))


def _stop(obj: dict, where: str) -> tuple[str, ...] | None:
    stop = obj.get("stop")
    if stop is None:
        return None
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise PromptsFileError(f"{where}: stop must be a non-empty string or a list of them")
    return tuple(stop)


def _parse_prompt(obj: dict, given: list[str], request_id: str, limit: int | None, start: int, where: str,
                  tokenizer: TextEncoder | None) -> PromptSpec:
    if given == ["prompt_token_ids"]:
        if not isinstance(obj["prompt_token_ids"], list):
            raise PromptsFileError(f"{where}: prompt_token_ids must be a list of ints")
        return PromptSpec(request_id, obj["prompt_token_ids"], limit, routing_start=start)
    if given == ["messages"]:
        try:
            ids = _encode_chat(obj["messages"], where, tokenizer)
        except ChatRefused as exc:
            return PromptSpec(request_id, [], limit, routing_start=start, from_text=True,
                              problem=f"{where}: {exc}")
        return PromptSpec(request_id, ids, limit, routing_start=start, from_text=True)
    text = obj["prompt"]
    return PromptSpec(request_id, _encode(text, where, tokenizer), limit, prompt_text=text, routing_start=start)


def _encode_chat(messages: Any, where: str, tokenizer: TextEncoder | None) -> list[int]:
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages)):
        raise PromptsFileError(f"{where}: messages must be a non-empty list of {{\"role\": ..., \"content\": ...}} "
                               "objects")
    if tokenizer is None:
        raise PromptsFileError(f"{where}: chat prompts need --hf-checkpoint with a tokenizer")
    try:
        ids = tokenizer.encode_chat(messages)
    except ChatRefused:
        raise
    except ValueError as exc:  # no tokenizer files, no chat template: no chat line can be served
        raise PromptsFileError(f"{where}: {exc}") from None
    return [int(t) for t in ids]


def _request_id(value: Any, where: str) -> str:
    """A JSON string or integer id as the request id; anything else fails the file."""
    if value is None:
        raise PromptsFileError(f"{where}: 'id' is null; give a string or an integer")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise PromptsFileError(f"{where}: 'id' must be a string or an integer, got {type(value).__name__}")
    request_id = str(value)
    problem = request_id_problem(request_id)
    if problem is not None:
        shown = request_id if len(request_id) <= 40 else request_id[:40] + "..."
        raise PromptsFileError(f"{where}: id {shown!r} {problem}")
    return request_id


def _encode(text: Any, where: str, tokenizer: TextEncoder | None) -> list[int]:
    if not isinstance(text, str) or not text:
        raise PromptsFileError(f"{where}: prompt must be a non-empty string")
    if tokenizer is None:
        raise PromptsFileError(f"{where}: text prompts need --hf-checkpoint with a tokenizer")
    try:
        ids = tokenizer.encode(text)
    except ValueError as exc:  # e.g. the checkpoint has no tokenizer files (loaded lazily)
        raise PromptsFileError(f"{where}: {exc}") from None
    return [int(t) for t in ids]


def synthetic_prompts(*, num_requests: int, prompt_len: int, vocab_size: int, seed: int,
                      shared_prefix_len: int = 0, reserved_ids: int = 2) -> list[PromptSpec]:
    """Seeded random prompts; the first ``shared_prefix_len`` tokens are common to all
    requests (prefix-cache reuse). Ids below ``reserved_ids`` (pad/eos) are avoided."""
    if not 0 <= shared_prefix_len <= prompt_len:
        raise ValueError(f"--shared-prefix-len must be in [0, --prompt-len={prompt_len}], got {shared_prefix_len}")
    rng = np.random.default_rng(seed)
    low = min(reserved_ids, vocab_size - 1)
    prefix = rng.integers(low, vocab_size, size=shared_prefix_len).tolist()
    return [PromptSpec(str(i), prefix + rng.integers(low, vocab_size, size=prompt_len - shared_prefix_len).tolist())
            for i in range(num_requests)]


SAMPLE_ID_SEPARATOR = "_"


def with_samples(specs: Sequence[PromptSpec], samples_per_prompt: int) -> list[PromptSpec]:
    """``samples_per_prompt`` requests per prompt (an RL group), next to each other in input
    order: request id ``<prompt id>_<k>`` for k = 0 .. n - 1, with ``prompt_id`` and
    ``sample_index`` set. The ids are unique because the prompt ids are (the text after the
    last ``_`` is k). One sample per prompt returns ``specs`` as they are. Raises ValueError
    when a sample's id would be too long."""
    if isinstance(samples_per_prompt, bool) or not isinstance(samples_per_prompt, int) or samples_per_prompt < 1:
        raise ValueError(f"--samples-per-prompt must be an int >= 1, got {samples_per_prompt!r}")
    if samples_per_prompt == 1:
        return list(specs)
    samples = []
    for spec in specs:
        for k in range(samples_per_prompt):
            request_id = f"{spec.request_id}{SAMPLE_ID_SEPARATOR}{k}"
            problem = request_id_problem(request_id)
            if problem is not None:
                raise ValueError(f"--samples-per-prompt: the id {request_id[:40]!r}... of a sample of prompt "
                                 f"{spec.request_id[:40]!r} {problem}; use shorter prompt ids")
            samples.append(replace(spec, request_id=request_id, prompt_id=spec.request_id, sample_index=k))
    return samples


def replica_share(specs: Sequence[PromptSpec], dp_rank: int, dp_size: int) -> list[PromptSpec]:
    """Replica ``dp_rank``'s requests of ``specs``: the g-th group goes to replica g mod
    ``dp_size``, where a group is a run of neighbouring samples of one prompt (so a prompt's
    samples share its KV blocks) and every other request is a group of its own. Without
    groups this is ``specs[dp_rank::dp_size]``. Invariant: the shares of ranks 0 ..
    dp_size - 1 partition ``specs``, each in input order."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
    share, group, previous = [], -1, None
    for spec in specs:
        if spec.prompt_id is None or spec.prompt_id != previous:
            group += 1
        previous = spec.prompt_id
        if group % dp_size == dp_rank:
            share.append(spec)
    return share
