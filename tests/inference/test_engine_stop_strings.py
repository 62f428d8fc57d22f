"""Stop strings end to end on the tiny model (greedy, sync and async scheduling): a stopped
request's tokens and routing are the prefix of an unstopped run's, up to and including the
token that completed the string (found by decoding the whole reference output)."""

from __future__ import annotations

import numpy as np
import pytest

from inference.request import SamplingParams

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from tests.inference.tiny_tokenizer import batch_decoder, tiny_tokenizer  # noqa: E402

MAX_NEW = 24


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _prompts(n: int = 6) -> list[list[int]]:
    rng = np.random.default_rng(3)
    return [rng.integers(1, 512, size=int(rng.integers(3, 12))).tolist() for _ in range(n)]


def _first_stop_index(tokenizer, outputs: list[int], stop: str) -> int | None:
    """The first output token after which the whole decoded output contains ``stop``."""
    for i in range(len(outputs)):
        if stop in tokenizer.decode(outputs[: i + 1], skip_special_tokens=True):
            return i
    return None


def _stop_string_ending_at(tokenizer, outputs: list[int], k: int) -> str:
    """The last few characters of the output text through token ``k`` (no partial ones)."""
    text = tokenizer.decode(outputs[: k + 1], skip_special_tokens=True).rstrip("\ufffd")
    return text[-3:] if text.strip() else "never-in-this-output"


def _reference(make_engine, prompts):
    engine = make_engine(record_routing=True)
    return engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True))


def test_stop_strings_cut_at_the_completing_token(make_engine, tokenizer):
    prompts = _prompts()
    reference = _reference(make_engine, prompts)
    params, expected = [], []
    for i, ref in enumerate(reference):
        out = ref.output_token_ids
        assert len(out) == MAX_NEW
        if i == len(prompts) - 1:   # no stop strings: served as without any
            params.append(SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True))
            expected.append((None, None))
            continue
        stop = _stop_string_ending_at(tokenizer, out, 4 + 3 * i)
        index = _first_stop_index(tokenizer, out, stop)
        # ignore_eos does not turn stop strings off; a second string that never matches is inert
        params.append(SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True, stop=[stop, "\x00never\x00"]))
        expected.append((stop, index))
    engine = make_engine(record_routing=True, detokenizer=batch_decoder(tokenizer))
    results = engine.generate(prompts, params)
    num_stopped = 0
    for ref, result, (stop, index) in zip(reference, results, expected):
        if index is None:
            assert result.output_token_ids == ref.output_token_ids
            assert result.finish_reason == ref.finish_reason == "length" and result.stop_string is None
        else:
            num_stopped += 1
            assert result.output_token_ids == ref.output_token_ids[: index + 1]
            assert result.finish_reason == "stop" and result.stop_string == stop
        rows = len(result.prompt_token_ids) + len(result.output_token_ids) - 1
        assert result.routing.shape[0] == rows
        np.testing.assert_array_equal(result.routing, ref.routing[:rows])
    assert num_stopped >= 3
    assert not engine.has_unfinished()


def test_stop_string_on_the_last_allowed_token_is_a_stop(make_engine, tokenizer):
    """As in vLLM, a stop string completed by the max_new_tokens-th token wins over "length"."""
    prompts = _prompts(1)
    out = _reference(make_engine, prompts)[0].output_token_ids
    stop = _stop_string_ending_at(tokenizer, out, 6)
    index = _first_stop_index(tokenizer, out, stop)
    engine = make_engine(detokenizer=batch_decoder(tokenizer))
    [result] = engine.generate(prompts, SamplingParams(max_new_tokens=index + 1, ignore_eos=True, stop=(stop,)))
    assert result.output_token_ids == out[: index + 1]
    assert (result.finish_reason, result.stop_string) == ("stop", stop)


def test_stop_string_in_the_prompt_only_does_not_stop(make_engine, tokenizer):
    stop = "</answer>"
    prompt = tokenizer.encode("<answer>42</answer>", add_special_tokens=False)
    ref = _reference(make_engine, [prompt])[0]
    assert stop not in tokenizer.decode(ref.output_token_ids, skip_special_tokens=True)
    engine = make_engine(detokenizer=batch_decoder(tokenizer))
    [result] = engine.generate([prompt], SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True, stop=(stop,)))
    assert result.output_token_ids == ref.output_token_ids
    assert (result.finish_reason, result.stop_string) == ("length", None)


def test_stop_strings_without_a_detokenizer_fail_alone(make_engine):
    engine = make_engine(record_routing=True)
    prompts = _prompts(3)
    results = engine.generate(prompts, [SamplingParams(max_new_tokens=4),
                                        SamplingParams(max_new_tokens=4, stop=("</tool_call>",)),
                                        SamplingParams(max_new_tokens=4)], request_ids=["a", "bad", "c"])
    assert results[1].finish_reason == "error"
    assert "need a detokenizer" in results[1].error and "'bad'" in results[1].error
    assert "detokenizer=" in results[1].error
    for r in (results[0], results[2]):
        assert r.finish_reason in ("stop", "length") and r.output_token_ids
        assert r.routing.shape[0] == len(r.prompt_token_ids) + len(r.output_token_ids) - 1


def test_detokenizer_called_once_per_step_for_requests_with_stop_strings(make_engine, tokenizer):
    decode = batch_decoder(tokenizer)
    calls: list[int] = []
    engine = make_engine(detokenizer=lambda batch: calls.append(len(batch)) or decode(batch))
    prompts = _prompts(4)
    params = [SamplingParams(max_new_tokens=6, ignore_eos=True, stop=("\x00",)) if i % 2 else
              SamplingParams(max_new_tokens=6, ignore_eos=True) for i in range(4)]
    results = engine.generate(prompts, params)
    assert all(r.finish_reason == "length" for r in results)
    # Two requests with stop strings get a token each step: 6 checks of 2 requests each
    # (a window and the newest token alone per request).
    assert len(calls) == 6 and set(calls) == {4}


def test_stop_strings_across_preemption(make_engine, tokenizer):
    """A KV cache too small for the batch: preempted requests recompute and still stop on
    the token the unstopped run's whole-output decoding names."""
    prompts = _prompts()
    reference = _reference(make_engine, prompts)
    stops = [_stop_string_ending_at(tokenizer, ref.output_token_ids, 10 + i) for i, ref in enumerate(reference)]
    engine = make_engine(record_routing=True, num_kv_blocks=14, detokenizer=batch_decoder(tokenizer))
    results = engine.generate(prompts, [SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True, stop=(s,)) for s in stops])
    assert sum(r.num_preemptions for r in results) > 0
    for ref, result, stop in zip(reference, results, stops):
        index = _first_stop_index(tokenizer, ref.output_token_ids, stop)
        assert result.output_token_ids == ref.output_token_ids[: index + 1]
        assert (result.finish_reason, result.stop_string) == ("stop", stop)
        rows = len(result.prompt_token_ids) + len(result.output_token_ids) - 1
        np.testing.assert_array_equal(result.routing, ref.routing[:rows])
