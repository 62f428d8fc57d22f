"""End-of-sequence ids of HF checkpoints: every id of config.json's and
generation_config.json's ``eos_token_id`` lists stops a request (chat checkpoints list
several), as transformers' ``generate`` stops on the same files."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import torch  # noqa: E402
import transformers  # noqa: E402

from inference.config import EngineConfig, ModelConfig  # noqa: E402
from inference.engine import LLMEngine  # noqa: E402
from inference.hf.common import eos_token_ids  # noqa: E402
from inference.hf_loader import HFCheckpointError, load_hf_config, load_hf_model  # noqa: E402
from inference.request import SamplingParams  # noqa: E402
from tests.inference.test_hf_loader import make_hf_model  # noqa: E402

PROMPT = [3, 50, 7, 99, 120]
NEW = 10


def _greedy(path, **params) -> tuple[list[int], str]:
    engine = LLMEngine(load_hf_model(path), EngineConfig(block_size=4, num_kv_blocks=64, max_step_tokens=16))
    result = engine.generate([PROMPT], SamplingParams(max_new_tokens=NEW, **params))[0]
    return result.output_token_ids, result.finish_reason


def _first_new(tokens: list[int], start: int) -> int:
    """Index of the first token at or after ``start`` that did not occur before it."""
    return next(k for k in range(start, len(tokens)) if tokens[k] not in tokens[:k])


def _edit_json(path, name: str, **fields) -> None:
    data = json.loads((path / name).read_text())
    data.update(fields)
    (path / name).write_text(json.dumps(data))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny Qwen3-MoE checkpoint and its greedy continuation of PROMPT with EOS ignored."""
    path = tmp_path_factory.mktemp("qwen3_moe")
    make_hf_model("qwen3_moe").save_pretrained(path)
    tokens, _ = _greedy(path, ignore_eos=True)
    assert len(tokens) == NEW
    return path, tokens


@pytest.mark.parametrize("source", ["config.json", "generation_config.json"])
def test_a_listed_eos_id_stops_like_transformers_generate(run, tmp_path, source):
    path, free = run
    stop_at = _first_new(free, 2)
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    if source == "config.json":      # without generation_config.json transformers reads config.json's list
        (tmp_path / "generation_config.json").unlink()
    _edit_json(tmp_path, source, eos_token_id=[1, free[stop_at]])
    assert free[stop_at] in load_hf_config(tmp_path).eos_token_ids
    tokens, reason = _greedy(tmp_path)
    assert (tokens, reason) == (free[:stop_at + 1], "stop")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    out = hf.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert out[0, len(PROMPT):].tolist() == tokens, "transformers stops on the same token"
    assert _greedy(tmp_path, ignore_eos=True) == (free, "length"), "ignore_eos ignores every eos id"


def test_both_files_add_up_in_order(run, tmp_path):
    path, _ = run
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    _edit_json(tmp_path, "config.json", eos_token_id=[5, 9])
    _edit_json(tmp_path, "generation_config.json", eos_token_id=[9, 1, 7])
    config = load_hf_config(tmp_path)
    assert (config.eos_token_id, config.extra_eos_token_ids, config.eos_token_ids) == (5, (9, 1, 7), (5, 9, 1, 7))
    assert ModelConfig.from_dict(config.to_dict()) == config
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(HFCheckpointError, match="generation_config.json"):
        load_hf_config(tmp_path)


def test_eos_lists_keep_valid_ids_once():
    assert eos_token_ids({"eos_token_id": [4, True, 4, -1, 160, 2]}, vocab_size=160) == [4, 2]
    assert eos_token_ids({"eos_token_id": 7}, vocab_size=160) == [7]
    assert eos_token_ids({"eos_token_id": None}, vocab_size=160) == []
    assert eos_token_ids({}, vocab_size=160) == []


def test_extra_eos_ids_are_checked():
    with pytest.raises(ValueError, match="extra_eos_token_ids"):
        ModelConfig(eos_token_id=1, extra_eos_token_ids=(512,))
    with pytest.raises(ValueError, match="need an eos_token_id"):
        ModelConfig(extra_eos_token_ids=(3,))
    assert ModelConfig(eos_token_id=1, extra_eos_token_ids=[3]).eos_token_ids == (1, 3)
