"""SamplingParams validation, Request bookkeeping and RequestResult snapshots."""

from __future__ import annotations

import math

import pytest

from inference.errors import InvalidRequestError
from inference.request import (
    Request,
    RequestResult,
    RequestStatus,
    SamplingParams,
)


def test_invalid_request_error_names_the_request_and_is_a_value_error():
    err = InvalidRequestError("token id 70000 is outside the vocabulary [0, 32000)", "r7")
    assert isinstance(err, ValueError)
    assert err.request_id == "r7"
    assert str(err) == "request 'r7': token id 70000 is outside the vocabulary [0, 32000)"


def test_invalid_request_error_for_a_flag_has_no_request_id():
    err = InvalidRequestError("--block-size must be >= 1, got 0")
    assert err.request_id is None
    assert str(err) == "--block-size must be >= 1, got 0"


def test_default_and_typical_sampling_params_are_valid():
    SamplingParams().validate("r0")
    SamplingParams(
        max_new_tokens=1, temperature=0.7, top_k=50, top_p=0.9, seed=0, stop_token_ids=(2, 3)
    ).validate("r0")
    SamplingParams(temperature=1, top_p=1).validate()  # ints where floats are expected


@pytest.mark.parametrize(
    "field_name, value",
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", -3),
        ("max_new_tokens", 2.0),
        ("max_new_tokens", True),
        ("temperature", -0.1),
        ("temperature", math.inf),
        ("temperature", math.nan),
        ("temperature", "hot"),
        ("top_k", -1),
        ("top_k", 1.5),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", math.nan),
        ("seed", -1),
        ("seed", 1.0),
        ("ignore_eos", 1),
        ("stop_token_ids", (1, "2")),
        ("stop_token_ids", (-1,)),
        ("stop_token_ids", (True,)),
    ],
)
def test_bad_sampling_field_is_named_with_its_value(field_name, value):
    params = SamplingParams(**{field_name: value})
    with pytest.raises(InvalidRequestError) as info:
        params.validate("req-9")
    message = str(info.value)
    assert info.value.request_id == "req-9"
    assert message.startswith("request 'req-9': ")
    assert field_name in message
    assert repr(value) in message


def test_stop_token_ids_given_as_list_become_a_tuple_and_params_stay_hashable():
    params = SamplingParams(stop_token_ids=[5, 6])
    assert params.stop_token_ids == (5, 6)
    assert hash(params) == hash(SamplingParams(stop_token_ids=(5, 6)))
    params.validate()


def _request(prompt, outputs=()):
    req = Request("r", list(prompt), SamplingParams())
    req.output_token_ids.extend(outputs)
    return req


def test_fresh_request_state():
    req = _request([4, 5, 6])
    assert req.status is RequestStatus.WAITING
    assert not req.is_finished
    assert (req.num_prompt_tokens, req.num_tokens, req.num_computed_tokens) == (3, 3, 0)
    assert req.block_ids == [] and req.output_token_ids == []
    other = _request([4, 5, 6])
    assert req != other  # identity equality: a queue never confuses two requests
    assert other.block_ids is not req.block_ids


def test_all_token_ids_is_prompt_then_outputs_and_a_copy():
    req = _request([1, 2, 3], outputs=[7, 8])
    tokens = req.all_token_ids
    assert tokens == [1, 2, 3, 7, 8]
    assert req.num_tokens == 5
    tokens.append(99)
    assert req.num_tokens == 5 and req.all_token_ids == [1, 2, 3, 7, 8]


def test_token_slice_agrees_with_all_token_ids_everywhere():
    req = _request([10, 11, 12, 13], outputs=[20, 21, 22])
    everything = req.all_token_ids
    for start in range(len(everything) + 1):
        for stop in range(start, len(everything) + 1):
            assert req.token_slice(start, stop) == everything[start:stop], (start, stop)


def test_result_from_finished_request_is_an_independent_snapshot():
    req = _request([1, 2], outputs=[3, 4])
    req.status, req.finish_reason = RequestStatus.FINISHED, "length"
    req.num_cached_tokens, req.num_preemptions = 16, 2
    result = RequestResult.from_request(req)
    assert result.request_id == "r"
    assert (result.prompt_token_ids, result.output_token_ids) == ([1, 2], [3, 4])
    assert (result.finish_reason, result.error, result.routing) == ("length", None, None)
    assert (result.num_cached_tokens, result.num_preemptions) == (16, 2)
    req.output_token_ids.append(5)
    req.prompt_token_ids.append(6)
    assert result.output_token_ids == [3, 4] and result.prompt_token_ids == [1, 2]


def test_result_refuses_an_unfinished_request():
    with pytest.raises(ValueError, match="'r'"):
        RequestResult.from_request(_request([1]))


def test_failed_result_carries_the_message():
    prompt = [1, 2, 3]
    result = RequestResult.failed("bad", prompt, "token id 9 is outside the vocabulary [0, 8)")
    assert result.finish_reason == "error"
    assert result.error == "token id 9 is outside the vocabulary [0, 8)"
    assert result.output_token_ids == [] and result.routing is None
    prompt.append(4)
    assert result.prompt_token_ids == [1, 2, 3]
