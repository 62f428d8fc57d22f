"""Text prompts through the CLI: a tiny HF checkpoint with its own local tokenizer (built
in-process, nothing downloaded) serves a prompts file mixing text and token ids."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

from routing_replay import load_routing  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "run_inference.py"
SENTENCES = ["the router picks two experts for every token",
             "replay the same routing in training", "hello world"]
MODEL_VOCAB = 64   # >= the tokenizer's vocabulary, so every encoded id is servable
NUM_MOE_LAYERS, TOPK = 2, 2


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SCRIPT)] + args, capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)


def _save_tokenizer(path: Path) -> None:
    """A word-level tokenizer trained on SENTENCES whose default encoding prepends [BOS]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[EOS]", "[BOS]", "[UNK]"]))
    raw.post_processor = processors.TemplateProcessing(single="[BOS] $A",
                                                       special_tokens=[("[BOS]", raw.token_to_id("[BOS]"))])
    assert raw.get_vocab_size() <= MODEL_VOCAB
    transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", bos_token="[BOS]",
                                         eos_token="[EOS]", pad_token="[PAD]").save_pretrained(path)


def _save_model(path: Path) -> None:
    config = transformers.Qwen3MoeConfig(
        vocab_size=MODEL_VOCAB, hidden_size=32, num_hidden_layers=NUM_MOE_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=48, moe_intermediate_size=24, num_experts=4,
        num_experts_per_tok=TOPK, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=128,
        pad_token_id=0, eos_token_id=1, bos_token_id=2)
    transformers.Qwen3MoeForCausalLM(config).save_pretrained(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(with a tokenizer, without one): the same weights in two directories."""
    with_tok, bare = tmp_path_factory.mktemp("with_tok"), tmp_path_factory.mktemp("bare")
    _save_model(with_tok)
    _save_model(bare)
    _save_tokenizer(with_tok)
    return with_tok, bare


def _prompts(tmp_path: Path, lines: list[dict]) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(line) for line in lines) + b"\n")
    return path


def test_mixed_text_and_token_id_prompts(checkpoints, tmp_path):
    ckpt, _ = checkpoints
    prompts = _prompts(tmp_path, [{"id": "text", "prompt": SENTENCES[0]},
                                  {"id": "ids", "prompt_token_ids": [5, 6, 7, 8]},
                                  {"id": "short", "prompt": "hello unseen world", "max_new_tokens": 1}])
    out = tmp_path / "out"
    proc = _run(["--hf-checkpoint", str(ckpt), "--prompts-file", str(prompts), "--max-new-tokens", "3",
                 "--record-routing", "--output-dir", str(out)])
    assert proc.returncode == 0, proc.stderr
    by_id = {r["id"]: r for r in map(orjson.loads, (out / "results.jsonl").read_bytes().splitlines())}
    assert list(by_id) == ["text", "ids", "short"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(ckpt), local_files_only=True)
    bos = tokenizer.convert_tokens_to_ids("[BOS]")
    for rid, text in (("text", SENTENCES[0]), ("short", "hello unseen world")):
        ids = by_id[rid]["prompt_token_ids"]
        # the tokenizer's default encoding, special tokens included: [BOS] then one id per word
        assert ids == tokenizer.encode(text) and ids[0] == bos and len(ids) == 1 + len(text.split())
    assert by_id["ids"]["prompt_token_ids"] == [5, 6, 7, 8]
    assert 1 <= len(by_id["text"]["output_token_ids"]) <= 3 and len(by_id["short"]["output_token_ids"]) == 1
    routings, meta = load_routing(out)
    assert set(routings) == set(by_id) and len(meta.moe_layer_indices) == NUM_MOE_LAYERS
    for rid, r in by_id.items():
        assert r["finish_reason"] in ("stop", "length")
        rows = len(r["prompt_token_ids"]) + len(r["output_token_ids"]) - 1
        assert r["routing_shape"] == [rows, NUM_MOE_LAYERS, TOPK] and routings[rid].shape == (rows, NUM_MOE_LAYERS, TOPK)


def test_text_prompt_without_hf_checkpoint_is_refused(tmp_path):
    prompts = _prompts(tmp_path, [{"id": 1, "prompt_token_ids": [3, 4]}, {"id": 2, "prompt": "hello world"}])
    proc = _run(["--prompts-file", str(prompts), "--dry-run"])
    assert proc.returncode == 2
    assert f"--prompts-file {prompts}, line 2: text prompts need --hf-checkpoint with a tokenizer" in proc.stderr


def test_line_with_both_prompt_keys_is_refused(checkpoints, tmp_path):
    prompts = _prompts(tmp_path, [{"id": 1, "prompt": "hello", "prompt_token_ids": [3, 4]}])
    proc = _run(["--hf-checkpoint", str(checkpoints[0]), "--prompts-file", str(prompts), "--dry-run"])
    assert proc.returncode == 2
    assert f"--prompts-file {prompts}, line 1: give exactly one of 'prompt_token_ids' and 'prompt'" in proc.stderr


def test_checkpoint_without_tokenizer(checkpoints, tmp_path):
    """Token ids need no tokenizer (it is loaded only for a text line); text names the
    flag and the directory that lacks one."""
    _, bare = checkpoints
    ids_only = _prompts(tmp_path, [{"id": 1, "prompt_token_ids": [3, 4]}])
    proc = _run(["--hf-checkpoint", str(bare), "--prompts-file", str(ids_only), "--dry-run"])
    assert proc.returncode == 0, proc.stderr
    assert "1 requests" in proc.stdout
    text = tmp_path / "text.jsonl"
    text.write_text('{"id": 1, "prompt_token_ids": [3]}\n{"id": 2, "prompt": "hello"}\n')
    proc = _run(["--hf-checkpoint", str(bare), "--prompts-file", str(text), "--dry-run"])
    assert proc.returncode == 2
    assert f"line 2: text prompts need a tokenizer, but --hf-checkpoint {bare} has none" in proc.stderr
    assert "no tokenizer files" in proc.stderr
