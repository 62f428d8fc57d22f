"""Where prompts come from: a JSONL prompts file or a seeded synthetic workload."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson


@dataclass(frozen=True)
class PromptSpec:
    """One request to serve: its id, tokens and optional per-request token limit."""

    request_id: str
    prompt_token_ids: list[int]
    max_new_tokens: int | None = None


class PromptsFileError(ValueError):
    """The prompts file cannot be read; the message names the file and line."""


def read_prompts_file(path: str | Path) -> list[PromptSpec]:
    """JSONL, one object per line: ``{"id": str|int, "prompt_token_ids": [int, ...]}`` and
    optionally ``"max_new_tokens"``. Blank lines are skipped. Structural problems (bad JSON,
    missing keys, duplicate ids) fail the whole file; bad token values are left for the
    engine, which fails that request alone."""
    path = Path(path)
    if not path.is_file():
        raise PromptsFileError(f"--prompts-file: {path} does not exist or is not a file")
    specs, seen = [], set()
    for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"--prompts-file {path}, line {lineno}"
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise PromptsFileError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise PromptsFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for key in ("id", "prompt_token_ids"):
            if key not in obj:
                raise PromptsFileError(f"{where}: missing key {key!r}")
        rid = str(obj["id"])
        if rid in seen:
            raise PromptsFileError(f"{where}: duplicate id {rid!r}")
        seen.add(rid)
        tokens = obj["prompt_token_ids"]
        if not isinstance(tokens, list):
            raise PromptsFileError(f"{where}: prompt_token_ids must be a list of ints")
        limit = obj.get("max_new_tokens")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise PromptsFileError(f"{where}: max_new_tokens must be an int >= 1")
        specs.append(PromptSpec(rid, tokens, limit))
    if not specs:
        raise PromptsFileError(f"--prompts-file {path}: no prompts in the file")
    return specs


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
