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
# Roles become words the tokenizer knows; the assistant's turn is opened with "router".
CHAT_TEMPLATE = ("[BOS]{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool turns') }}"
                 "{% endif %}{{ 'the' if m['role'] == 'user' else 'hello' }} {{ m['content'] }} "
                 "{% endfor %}{% if add_generation_prompt %}router{% endif %}")
MODEL_VOCAB = 64   # >= the tokenizer's vocabulary, so every encoded id is servable
NUM_MOE_LAYERS, TOPK = 2, 2


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SCRIPT)] + args, capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)


def _save_tokenizer(path: Path, chat: bool = True) -> None:
    """A word-level tokenizer trained on SENTENCES whose default encoding prepends [BOS]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[EOS]", "[BOS]", "[UNK]"]))
    raw.post_processor = processors.TemplateProcessing(single="[BOS] $A",
                                                       special_tokens=[("[BOS]", raw.token_to_id("[BOS]"))])
    assert raw.get_vocab_size() <= MODEL_VOCAB
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", bos_token="[BOS]",
                                                     eos_token="[EOS]", pad_token="[PAD]")
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)


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
    assert f"--prompts-file {prompts}, line 1: give exactly one of 'prompt_token_ids', 'prompt' and 'messages'" in proc.stderr


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


def test_chat_prompts_and_output_text(checkpoints, tmp_path):
    """A chat line is rendered by the tokenizer's chat template (the assistant's turn
    opened) and encoded as transformers does; with text or chat prompts every result
    carries its generated text, decoded by the same tokenizer without special tokens."""
    ckpt, _ = checkpoints
    chat = [{"role": "system", "content": "replay the same routing"}, {"role": "user", "content": "hello world"}]
    prompts = _prompts(tmp_path, [{"id": "chat", "messages": chat}, {"id": "ids", "prompt_token_ids": [5, 6, 7]},
                                  {"id": "refused", "messages": [{"role": "tool", "content": "hello"}]},
                                  {"id": "text", "prompt": SENTENCES[1]}])
    out = tmp_path / "out"
    proc = _run(["--hf-checkpoint", str(ckpt), "--prompts-file", str(prompts), "--max-new-tokens", "4",
                 "--ignore-eos", "--output-dir", str(out)])
    assert proc.returncode == 3, proc.stderr          # some request failed, the others were served
    results = {r["id"]: r for r in map(orjson.loads, (out / "results.jsonl").read_bytes().splitlines())}
    refused = results.pop("refused")
    assert refused["finish_reason"] == "error" and "line 3" in refused["error"] and "no tool turns" in refused["error"]
    assert "output_text" not in refused
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(ckpt), local_files_only=True)
    rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert rendered == "[BOS]hello replay the same routing the hello world router"
    assert results["chat"]["prompt_token_ids"] == tokenizer.encode(rendered, add_special_tokens=False)
    for r in results.values():
        assert len(r["output_token_ids"]) == 4
        assert r["output_text"] == tokenizer.decode(r["output_token_ids"], skip_special_tokens=True)
    from routing_replay.run_dir_schema import validate_run_dir
    assert validate_run_dir(out) == []
    proc = _run(["--hf-checkpoint", str(ckpt), "--prompts-file", str(prompts), "--max-new-tokens", "2",
                 "--no-output-text", "--output-dir", str(tmp_path / "no_text")])
    assert proc.returncode == 3, proc.stderr
    assert not any("output_text" in orjson.loads(line)
                   for line in (tmp_path / "no_text" / "results.jsonl").read_bytes().splitlines())


def test_output_text_and_chat_need_a_tokenizer_and_a_template(checkpoints, tmp_path):
    ckpt, bare = checkpoints
    ids_only = _prompts(tmp_path, [{"id": 1, "prompt_token_ids": [3, 4]}])
    proc = _run(["--hf-checkpoint", str(bare), "--prompts-file", str(ids_only), "--output-text", "--dry-run"])
    assert proc.returncode == 2 and f"--output-text needs a tokenizer, but --hf-checkpoint {bare}" in proc.stderr
    proc = _run(["--prompts-file", str(ids_only), "--output-text", "--dry-run"])
    assert proc.returncode == 2 and "--output-text needs --hf-checkpoint with a tokenizer" in proc.stderr
    no_template = tmp_path / "no_template"
    no_template.mkdir()
    for f in ckpt.iterdir():           # the weights, not the tokenizer files (the template may be one)
        if f.name.endswith((".safetensors", "config.json")) and not f.name.startswith("tokenizer"):
            (no_template / f.name).write_bytes(f.read_bytes())
    _save_tokenizer(no_template, chat=False)
    chat = _prompts(tmp_path, [{"id": 1, "messages": [{"role": "user", "content": "hello"}]}])
    proc = _run(["--hf-checkpoint", str(no_template), "--prompts-file", str(chat), "--dry-run"])
    assert proc.returncode == 2 and "line 1: chat prompts need a chat template" in proc.stderr
