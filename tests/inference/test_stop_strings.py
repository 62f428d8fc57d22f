"""The stop-string matcher with a real (tiny, local) byte-level tokenizer, checked against
decoding each request's whole output after every token."""

from __future__ import annotations

import numpy as np
import pytest

from inference.request import Request, SamplingParams
from inference.stop_strings import StopStringChecker, cut_at_stop, window_tokens

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from tests.inference.tiny_tokenizer import batch_decoder, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _stream(checker, prompt, outputs, stop):
    """Feed ``outputs`` one token at a time; (index of the stopping token, string) or None."""
    request = Request("r", list(prompt), SamplingParams(stop=stop))
    for i, token in enumerate(outputs):
        request.output_token_ids.append(token)
        matches = checker.check([request])
        if matches:
            assert matches[0][0] is request
            return i, matches[0][1]
    return None


def _reference(tokenizer, outputs, stop):
    """The first token after which the whole decoded output holds a stop string, and the
    string whose first occurrence ends first (ties: listed first)."""
    for i in range(len(outputs)):
        text = tokenizer.decode(outputs[: i + 1], skip_special_tokens=True)
        found = [(text.find(s) + len(s), n, s) for n, s in enumerate(stop) if s in text]
        if found:
            return i, min(found)[2]
    return None


def _ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_stop_string_spanning_several_tokens(tokenizer):
    checker = StopStringChecker(batch_decoder(tokenizer))
    outputs = _ids(tokenizer, "<answer>42</answer> the router")
    closing = [tokenizer.decode([t]) for t in outputs].index(">", 3)   # the '>' of '</answer>'
    assert [tokenizer.decode([t]) for t in outputs[closing - 2: closing + 1]] == ["</", "answer", ">"]
    assert _stream(checker, [5, 6], outputs, ("</answer>",)) == (closing, "</answer>")


def test_stop_string_completed_inside_a_token(tokenizer):
    checker = StopStringChecker(batch_decoder(tokenizer))
    outputs = _ids(tokenizer, "<answer>42</answer>")
    answer = [tokenizer.decode([t]) for t in outputs].index("answer", 3)   # the second 'answer'
    assert _stream(checker, [5], outputs, ("2</ans",)) == (answer, "2</ans")


def test_earlier_ending_string_wins(tokenizer):
    checker = StopStringChecker(batch_decoder(tokenizer))
    outputs = _ids(tokenizer, "42 answer")
    # Both complete on the token 'answer'; "ans" ends three characters earlier.
    assert _stream(checker, [5], outputs, ("swer", "ans")) == (len(outputs) - 1, "ans")
    assert _stream(checker, [5], outputs, ("answer", "ns")) == (len(outputs) - 1, "ns")


def test_multibyte_character_split_over_tokens(tokenizer):
    checker = StopStringChecker(batch_decoder(tokenizer))
    outputs = _ids(tokenizer, "<answer>你好</answer>")
    pieces = [tokenizer.decode([t]) for t in outputs]
    assert any("\ufffd" in p for p in pieces), pieces   # the test needs a character split over tokens
    assert _stream(checker, [5], outputs, ("你好",)) == _reference(tokenizer, outputs, ("你好",))
    assert _stream(checker, [5], outputs, ("你好",)) is not None


def test_string_only_in_the_prompt_does_not_stop(tokenizer):
    checker = StopStringChecker(batch_decoder(tokenizer))
    prompt = _ids(tokenizer, "<tool_call>call</tool_call>")
    outputs = _ids(tokenizer, " the router picks two experts")
    assert _stream(checker, prompt, outputs, ("</tool_call>",)) is None
    assert _stream(checker, prompt, outputs + _ids(tokenizer, "</tool_call>"), ("</tool_call>",)) == (
        len(outputs) + len(_ids(tokenizer, "</tool_call>")) - 1, "</tool_call>")


def test_special_tokens_are_skipped(tokenizer):
    checker = StopStringChecker(batch_decoder(tokenizer))
    eos = tokenizer.convert_tokens_to_ids("<eos>")
    outputs = _ids(tokenizer, "</") + [eos] + _ids(tokenizer, "answer>")
    assert _stream(checker, [5], outputs, ("</answer>",)) == (len(outputs) - 1, "</answer>")


def test_many_special_tokens_inside_the_stop_string(tokenizer):
    """Special tokens decode to nothing: a run of them longer than the tail window between
    the stop string's first and last characters must not hide it."""
    checker = StopStringChecker(batch_decoder(tokenizer))
    eos = tokenizer.convert_tokens_to_ids("<eos>")
    stop = ("</answer>",)
    for run in (window_tokens(stop), 3 * window_tokens(stop)):
        outputs = _ids(tokenizer, "42</") + [eos] * run + _ids(tokenizer, "answer> the router")
        completing = len(_ids(tokenizer, "42</")) + run + len(_ids(tokenizer, "answer>")) - 1
        assert _reference(tokenizer, outputs, stop) == (completing, "</answer>")
        assert _stream(checker, [5], outputs, stop) == _reference(tokenizer, outputs, stop)


def test_special_tokens_before_a_long_newest_token(tokenizer):
    """The newest token's own text is long: the window is widened by what the tokens before
    it decode to, not by the whole window's text."""
    checker = StopStringChecker(batch_decoder(tokenizer))
    eos = tokenizer.convert_tokens_to_ids("<eos>")
    stop = ("pq training",)
    assert len(_ids(tokenizer, " training")) == 1
    outputs = _ids(tokenizer, "pq") + [eos] * window_tokens(stop) + _ids(tokenizer, " training")
    assert _stream(checker, [5], outputs, stop) == _reference(tokenizer, outputs, stop) == (len(outputs) - 1, stop[0])


def test_window_matches_whole_output_decoding(tokenizer):
    """Long random outputs (many tokens before the match, partial characters in the
    window): the tail window finds what decoding everything finds, at the same token."""
    checker = StopStringChecker(batch_decoder(tokenizer))
    rng = np.random.default_rng(0)
    stopped = 0
    for trial in range(40):
        outputs = rng.integers(0, 512, size=120).tolist()
        text = tokenizer.decode(outputs, skip_special_tokens=True)
        stop = []
        for _ in range(1 + trial % 3):
            start, length = int(rng.integers(len(text) // 3, len(text) - 3)), int(rng.integers(1, 6))
            candidate = text[start: start + length]
            if candidate and "\ufffd" not in candidate:
                stop.append(candidate)
        stop = tuple(dict.fromkeys(stop)) or ("zzzzzzzz",)
        assert 120 > window_tokens(stop)   # the window is a real tail, not the whole output
        expected = _reference(tokenizer, outputs, stop)
        assert _stream(checker, [], outputs, stop) == expected, (outputs, stop)
        stopped += expected is not None
    assert stopped >= 20


def test_one_batched_call_per_check(tokenizer):
    calls = []
    decode = batch_decoder(tokenizer)
    checker = StopStringChecker(lambda batch: calls.append(len(batch)) or decode(batch))
    a = Request("a", [5], SamplingParams(stop=("router",)), output_token_ids=_ids(tokenizer, "the router"))
    b = Request("b", [5], SamplingParams(stop=("xyz",)), output_token_ids=_ids(tokenizer, "the router"))
    c = Request("c", [5], SamplingParams(stop=("the",)), output_token_ids=_ids(tokenizer, "the"))
    assert checker.check([a, b, c]) == [(a, "router"), (c, "the")]
    assert calls == [6]   # each request's window and its newest token alone
    assert checker.check([]) == [] and calls == [6]


def test_detokenizer_returning_wrong_count_is_an_error():
    checker = StopStringChecker(lambda batch: ["x"])
    requests = [Request(str(i), [5], SamplingParams(stop=("x",)), output_token_ids=[1]) for i in range(2)]
    with pytest.raises(ValueError, match="returned 1 texts for 4 token lists"):
        checker.check(requests)


def test_cut_at_stop():
    assert cut_at_stop("42</answer> more", "</answer>") == "42"
    assert cut_at_stop("42</answer> more", "</answer>", include_stop_string=True) == "42</answer>"
    assert cut_at_stop("42", None) == "42"
    assert cut_at_stop("a</b>c</b>", "</b>") == "a"


@pytest.mark.parametrize("stop, message", [
    ("</answer>", "stop='</answer>' is invalid: must be a tuple of non-empty strings"),
    (("ok", ""), "must be a tuple of non-empty strings"),
    ((3,), "must be a tuple of non-empty strings"),
])
def test_bad_stop_strings_are_rejected(stop, message):
    from inference.errors import InvalidRequestError
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(stop=stop).validate("r")


def test_stop_list_becomes_a_tuple():
    params = SamplingParams(stop=["a", "b"])
    assert params.stop == ("a", "b") and hash(params) == hash(SamplingParams(stop=("a", "b")))
    with pytest.raises(Exception, match="include_stop_str_in_output"):
        SamplingParams(include_stop_str_in_output=1).validate()
