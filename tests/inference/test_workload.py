"""read_prompts_file: token-id and text prompts, and the errors that name file and line."""

from __future__ import annotations

import numpy as np
import pytest

from inference.workload import ChatRefused, PromptsFileError, read_prompts_file


class FakeTokenizer:
    """Encodes each word as its length plus 100 after a BOS of 7; numpy ints, as some
    tokenizers return, so the caller's conversion to plain ints is exercised."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def encode(self, text: str) -> list[int]:
        self.calls.append(text)
        return [np.int64(7)] + [np.int64(100 + len(w)) for w in text.split()]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """A stand-in chat template: each turn's role length, then its words; 9 opens the reply."""
        self.calls.append(messages)
        if any(m["role"] == "tool" for m in messages):
            raise ChatRefused("the chat template refuses this chat")
        if any(m["role"] == "nochat" for m in messages):
            raise ValueError("this tokenizer has no chat template")
        return [t for m in messages for t in [len(m["role"]), *self.encode(m["content"])[1:]]] + [np.int64(9)]


def _write(tmp_path, text: str):
    path = tmp_path / "prompts.jsonl"
    path.write_text(text)
    return path


def test_text_and_token_id_lines_mix(tmp_path):
    path = _write(tmp_path, '{"id": "t", "prompt": "ab cde", "max_new_tokens": 5}\n'
                            '\n{"id": 2, "prompt_token_ids": [4, 5]}\n')
    tok = FakeTokenizer()
    text_spec, ids_spec = read_prompts_file(path, tok)
    assert tok.calls == ["ab cde"]
    assert text_spec.request_id == "t" and text_spec.prompt_text == "ab cde" and text_spec.max_new_tokens == 5
    assert text_spec.prompt_token_ids == [7, 102, 103]
    assert all(type(t) is int for t in text_spec.prompt_token_ids)
    assert ids_spec.request_id == "2" and ids_spec.prompt_token_ids == [4, 5] and ids_spec.prompt_text is None


def test_token_id_file_never_asks_the_tokenizer(tmp_path):
    path = _write(tmp_path, '{"id": 1, "prompt_token_ids": [3]}\n{"id": 2, "prompt_token_ids": [4, 5]}\n')
    tok = FakeTokenizer()
    assert [s.prompt_token_ids for s in read_prompts_file(path, tok)] == [[3], [4, 5]]
    assert tok.calls == []


@pytest.mark.parametrize("content, message", [
    ('{"id": 1, "prompt_token_ids": [1]}\n{"id": 2, "prompt": "x", "prompt_token_ids": [1]}\n',
     "line 2: give exactly one of 'prompt_token_ids', 'prompt' and 'messages' (found 'prompt_token_ids' and 'prompt')"),
    ('{"id": 1}\n', "line 1: give exactly one of 'prompt_token_ids', 'prompt' and 'messages' (found none)"),
    ('{"id": 1, "prompt": ""}\n', "line 1: prompt must be a non-empty string"),
    ('{"id": 1, "prompt": [1, 2]}\n', "line 1: prompt must be a non-empty string"),
    ('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', "line 2: duplicate id '1'"),
])
def test_malformed_text_lines(tmp_path, content, message):
    path = _write(tmp_path, content)
    with pytest.raises(PromptsFileError) as info:
        read_prompts_file(path, FakeTokenizer())
    assert str(info.value) == f"--prompts-file {path}, {message}"


def test_text_without_tokenizer_names_the_flag(tmp_path):
    path = _write(tmp_path, '{"id": 1, "prompt_token_ids": [1]}\n{"id": 2, "prompt": "hello"}\n')
    with pytest.raises(PromptsFileError) as info:
        read_prompts_file(path)
    assert str(info.value) == f"--prompts-file {path}, line 2: text prompts need --hf-checkpoint with a tokenizer"


def test_tokenizer_failure_is_reported_with_its_line(tmp_path):
    class Broken:
        def encode(self, text: str) -> list[int]:
            raise ValueError("no tokenizer files in /ckpt")

    path = _write(tmp_path, '{"id": 1, "prompt": "hello"}\n')
    with pytest.raises(PromptsFileError, match=r"line 1: no tokenizer files in /ckpt"):
        read_prompts_file(path, Broken())


@pytest.mark.parametrize("raw_id, message", [
    ("null", "line 2: 'id' is null"),
    ('""', "line 2: id '' must not be empty"),
    ('"a\\u0000b"', "line 2: id 'a\\x00b' contains the control character"),
    ('"' + "y" * 300 + '"', "has 300 characters; at most 256"),
    ("false", "'id' must be a string or an integer, got bool"),
    ('{"k": 1}', "'id' must be a string or an integer, got dict"),
])
def test_bad_ids_fail_the_file_with_the_line(tmp_path, raw_id, message):
    path = _write(tmp_path, '{"id": "ok", "prompt_token_ids": [1]}\n{"id": ' + raw_id + ', "prompt_token_ids": [2]}\n')
    with pytest.raises(PromptsFileError) as info:
        read_prompts_file(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_integer_and_unusual_string_ids_are_kept(tmp_path):
    path = _write(tmp_path, '{"id": 0, "prompt_token_ids": [1]}\n{"id": "../x y", "prompt_token_ids": [2]}\n'
                            '{"id": "' + "z" * 256 + '", "prompt_token_ids": [3]}\n')
    assert [s.request_id for s in read_prompts_file(path)] == ["0", "../x y", "z" * 256]


def test_chat_lines_go_through_the_chat_template(tmp_path):
    path = _write(tmp_path, '{"id": "c", "messages": [{"role": "system", "content": "be brief"}, '
                            '{"role": "user", "content": "hi there"}], "max_new_tokens": 3}\n'
                            '{"id": "t", "prompt": "ab"}\n{"id": "i", "prompt_token_ids": [4]}\n')
    chat, text, ids = read_prompts_file(path, FakeTokenizer())
    assert chat.prompt_token_ids == [6, 102, 105, 4, 102, 105, 9] and chat.max_new_tokens == 3
    assert all(isinstance(t, int) for t in chat.prompt_token_ids)
    assert (chat.from_text, text.from_text, ids.from_text) == (True, True, False)
    assert chat.prompt_text is None


@pytest.mark.parametrize("messages, message", [
    ("[]", "messages must be a non-empty list"),
    ('"hi"', "messages must be a non-empty list"),
    ('[{"content": "no role"}]', "messages must be a non-empty list"),
    ('[{"role": "user"}]', "messages must be a non-empty list"),
    ('[{"role": "nochat", "content": "x"}]', "this tokenizer has no chat template"),
])
def test_malformed_chat_lines(tmp_path, messages, message):
    path = _write(tmp_path, f'{{"id": 1, "messages": {messages}}}\n')
    with pytest.raises(PromptsFileError, match=message) as info:
        read_prompts_file(path, FakeTokenizer())
    assert "line 1" in str(info.value)


def test_chat_without_tokenizer_names_the_flag(tmp_path):
    path = _write(tmp_path, '{"id": 1, "messages": [{"role": "user", "content": "x"}]}\n')
    with pytest.raises(PromptsFileError, match="chat prompts need --hf-checkpoint with a tokenizer"):
        read_prompts_file(path)


def test_a_chat_its_template_refuses_fails_alone(tmp_path):
    path = _write(tmp_path, '{"id": 1, "messages": [{"role": "tool", "content": "x"}]}\n'
                            '{"id": 2, "messages": [{"role": "user", "content": "x"}]}\n')
    refused, served = read_prompts_file(path, FakeTokenizer())
    assert refused.prompt_token_ids == [] and refused.problem == (
        f"--prompts-file {path}, line 1: the chat template refuses this chat")
    assert served.problem is None and served.prompt_token_ids == [4, 101, 9]
