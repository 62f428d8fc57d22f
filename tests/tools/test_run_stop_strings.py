"""Stop strings through the CLI: --stop and a prompts file's "stop" on a tiny HF checkpoint
with a local byte-level tokenizer; tokens, routing rows, stop_string and output_text are
checked against an unstopped run decoded whole."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

from routing_replay.schema import validate_results_line  # noqa: E402
from tests.inference.tiny_tokenizer import VOCAB_SIZE, tiny_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "run_inference.py"
PROMPTS = [[5, 9, 77, 300], [400, 12, 250], [33, 34, 35, 36, 37]]
MAX_NEW = 16


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SCRIPT)] + args, capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, intermediate_size=48, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
        decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=128, eos_token_id=0)
    transformers.Qwen3MoeForCausalLM(config).save_pretrained(path)
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(path)
    return path, tokenizer


@pytest.fixture(scope="module")
def reference(checkpoint, tmp_path_factory):
    """The unstopped run's results by id."""
    ckpt, _ = checkpoint
    tmp = tmp_path_factory.mktemp("ref")
    prompts = _prompts(tmp, [{"id": str(i), "prompt_token_ids": p} for i, p in enumerate(PROMPTS)])
    proc = _run(["--hf-checkpoint", str(ckpt), "--prompts-file", str(prompts), "--max-new-tokens", str(MAX_NEW),
                 "--ignore-eos", "--record-routing", "--output-dir", str(tmp / "out")])
    assert proc.returncode == 0, proc.stderr
    return _results(tmp / "out")


def _prompts(tmp_path: Path, lines: list[dict]) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(line) for line in lines) + b"\n")
    return path


def _results(out: Path) -> dict[str, dict]:
    records = [orjson.loads(line) for line in (out / "results.jsonl").read_bytes().splitlines()]
    assert all(validate_results_line(r) == [] for r in records)
    return {r["id"]: r for r in records}


def _expected(tokenizer, outputs: list[int], stop: list[str]) -> tuple[int, str] | None:
    """First token after which the whole decoded output holds a stop string; the string
    whose first occurrence ends first."""
    for i in range(len(outputs)):
        text = tokenizer.decode(outputs[: i + 1], skip_special_tokens=True)
        found = sorted((text.find(s) + len(s), n, s) for n, s in enumerate(stop) if s in text)
        if found:
            return i, found[0][2]
    return None


def _tail(tokenizer, outputs: list[int], k: int) -> str:
    text = tokenizer.decode(outputs[: k + 1], skip_special_tokens=True).rstrip("\ufffd")
    assert text.strip(), "the reference output decodes to nothing printable"
    return text[-3:]


@pytest.mark.parametrize("include", [False, True], ids=["cut", "include"])
def test_stop_flag_and_per_line_stop(checkpoint, reference, tmp_path, include):
    ckpt, tokenizer = checkpoint
    outs = {rid: r["output_token_ids"] for rid, r in reference.items()}
    global_stop = _tail(tokenizer, outs["0"], 5)
    line_stop = _tail(tokenizer, outs["1"], 8)
    stops = {"0": [global_stop, "@@never@@"], "1": [line_stop], "2": []}
    lines = [{"id": "0", "prompt_token_ids": PROMPTS[0]}, {"id": "1", "prompt_token_ids": PROMPTS[1], "stop": line_stop},
             {"id": "2", "prompt_token_ids": PROMPTS[2], "stop": []}]
    out = tmp_path / "out"
    args = ["--hf-checkpoint", str(ckpt), "--prompts-file", str(_prompts(tmp_path, lines)), "--max-new-tokens",
            str(MAX_NEW), "--ignore-eos", "--record-routing", "--output-text", "--output-dir", str(out),
            "--stop", global_stop, "--stop", "@@never@@"] + (["--include-stop-str-in-output"] if include else [])
    proc = _run(args)
    assert proc.returncode == 0, proc.stderr
    results = _results(out)
    for rid, result in results.items():
        ref_out, expected = outs[rid], _expected(tokenizer, outs[rid], stops[rid])
        text = tokenizer.decode(result["output_token_ids"], skip_special_tokens=True)
        if expected is None:
            assert result["output_token_ids"] == ref_out
            assert (result["finish_reason"], result["stop_string"]) == ("length", None)
            assert result["output_text"] == text
        else:
            index, stop = expected
            assert result["output_token_ids"] == ref_out[: index + 1]
            assert (result["finish_reason"], result["stop_string"]) == ("stop", stop)
            cut = text.find(stop) + (len(stop) if include else 0)
            assert result["output_text"] == text[:cut]
        rows = len(result["prompt_token_ids"]) + len(result["output_token_ids"]) - 1
        assert result["routing_shape"][0] == rows
    assert results["0"]["finish_reason"] == "stop" and results["1"]["finish_reason"] == "stop"
    # --resume refuses a changed --stop, naming it
    proc = _run([a if a != global_stop else global_stop + "x" for a in args[:-1]] + [args[-1], "--resume"])
    assert proc.returncode == 2 and "sampling.stop" in proc.stderr, proc.stderr


def test_stop_needs_a_tokenizer(tmp_path):
    proc = _run(["--model", "tiny-moe", "--stop", "</answer>", "--dry-run"])
    assert proc.returncode == 2 and "--stop needs --hf-checkpoint" in proc.stderr
    prompts = _prompts(tmp_path, [{"id": 1, "prompt_token_ids": [3, 4], "stop": ["</answer>"]}])
    proc = _run(["--model", "tiny-moe", "--prompts-file", str(prompts), "--dry-run"])
    assert proc.returncode == 2 and "stop strings (--stop or a prompts file's \"stop\") need --hf-checkpoint" in proc.stderr
    prompts = _prompts(tmp_path, [{"id": 1, "prompt_token_ids": [3, 4], "stop": [""]}])
    proc = _run(["--model", "tiny-moe", "--prompts-file", str(prompts), "--dry-run"])
    assert proc.returncode == 2 and "line 1: stop must be a non-empty string or a list of them" in proc.stderr
