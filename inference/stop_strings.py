"""Stop strings: finish a request once its decoded output text contains one of its strings.

The engine has no tokenizer of its own; the caller gives it a detokenizer, a callable that
turns a batch of token-id lists into their texts (special tokens skipped), e.g.
``lambda ids: tokenizer.batch_decode(ids, skip_special_tokens=True)`` of an HF fast
tokenizer. One call per step covers every request that needs a check.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from inference.request import Request

Detokenizer = Callable[[list[list[int]]], Sequence[str]]

# Tokens decoded per check: enough for the longest stop string even when every token
# carries only part of a character (up to 4 UTF-8 bytes each), plus a margin for tokens
# that merge with their neighbours. Tokens that decode to nothing (special tokens, which
# the detokenizer skips) are not bounded: a window whose tokens before the newest decode
# to too little text is widened and decoded again (a rare second call).
BYTES_PER_CHAR = 4
WINDOW_MARGIN = 8
# Characters a window's start may get wrong against decoding the whole output: up to 3
# U+FFFD for a character cut by the window, and a leading space a SentencePiece-style
# decoder drops.
EDGE_CHARS = 4


def window_tokens(stop: Sequence[str]) -> int:
    """How many trailing output tokens one check decodes for these stop strings (at first)."""
    return BYTES_PER_CHAR * max(len(s) for s in stop) + WINDOW_MARGIN


class StopStringChecker:
    """Finds the requests whose newest output token completed one of their stop strings.

    Invariant: called once for every output token a request with stop strings receives
    (before the next one arrives), so the decoded text of a request's window held no stop
    string before its newest token: any match in the window now ends inside that token's
    text, hence is the first in the whole output. A window is wide enough once the tokens
    before its newest decode to at least ``len(longest stop) - 1 + EDGE_CHARS`` characters
    (or it is the whole output), so it holds every match that decoding the whole output
    would find. Of several strings completed by one token, the one ending first in the
    text wins (ties: the one listed first). The prompt is never decoded.
    """

    def __init__(self, detokenizer: Detokenizer) -> None:
        if not callable(detokenizer):
            raise TypeError(f"detokenizer must be callable (token-id lists -> texts), got {type(detokenizer).__name__}")
        self.detokenizer = detokenizer

    def check(self, requests: Sequence[Request]) -> list[tuple[Request, str]]:
        """``(request, matched string)`` for each of ``requests`` (all with stop strings)
        whose output text now contains one, in the order given. One detokenizer call of
        each request's window and newest token; another only for windows to widen."""
        texts: dict[int, str] = {}
        widths = {i: window_tokens(r.sampling_params.stop) for i, r in enumerate(requests)}
        while widths:
            order = list(widths)
            windows = [requests[i].output_token_ids[-widths[i]:] for i in order]
            decoded = self._decode(windows + [w[-1:] for w in windows])
            widths = {}
            for n, i in enumerate(order):
                request, text, newest = requests[i], decoded[n], decoded[len(order) + n]
                need = max(len(s) for s in request.sampling_params.stop) - 1 + EDGE_CHARS
                if len(text) - len(newest) < need and len(windows[n]) < len(request.output_token_ids):
                    widths[i] = 2 * len(windows[n])   # mostly tokens that decode to nothing
                else:
                    texts[i] = text
        matches = []
        for i, request in enumerate(requests):
            found = first_stop(texts[i], request.sampling_params.stop)
            if found is not None:
                matches.append((request, found))
        return matches

    def _decode(self, windows: list[list[int]]) -> Sequence[str]:
        texts = self.detokenizer(windows)
        if len(texts) != len(windows):
            raise ValueError(f"the detokenizer returned {len(texts)} texts for {len(windows)} token lists")
        return texts


def first_stop(text: str, stop: Sequence[str]) -> str | None:
    """The stop string whose first occurrence in ``text`` ends first (ties: listed first)."""
    best, best_end = None, len(text) + 1
    for candidate in stop:
        index = text.find(candidate)
        if index >= 0 and index + len(candidate) < best_end:
            best, best_end = candidate, index + len(candidate)
    return best


def cut_at_stop(text: str, stop_string: str | None, include_stop_string: bool = False) -> str:
    """``text`` up to its first ``stop_string`` (through it with ``include_stop_string``);
    unchanged when there is none or the text does not hold it."""
    if not stop_string:
        return text
    index = text.find(stop_string)
    if index < 0:
        return text
    return text[: index + len(stop_string)] if include_stop_string else text[:index]
