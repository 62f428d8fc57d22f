"""The CLI serves hybrid models: a hybrid preset and an HF hybrid checkpoint with
--record-routing (tokens and routing checked against independent forwards), the state
flags validated up front, the dry run's separate state lines."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
import torch

from routing_replay import load_routing
from tests.tools.test_run_inference import _results, _run


def test_hybrid_preset_with_recording_and_shared_prefixes(tmp_path):
    proc = _run(["--model", "tiny-hybrid-mamba", "--record-routing", "--output-dir", str(tmp_path), "--num-requests",
                 "6", "--prompt-len", "20", "--shared-prefix-len", "14", "--output-len", "5", "--block-size", "4",
                 "--max-step-tokens", "16", "--ignore-eos", "--checkpoint-interval-blocks", "2"])
    assert proc.returncode == 0, proc.stderr
    from inference.presets import build_model, get_preset
    model = build_model(get_preset("tiny-hybrid-mamba"), seed=0, dtype=torch.float32)
    results = _results(tmp_path)
    routings, meta = load_routing(tmp_path)
    assert meta.moe_layer_indices == list(model.config.moe_layer_indices) and len(results) == 6
    assert sum(r["num_cached_tokens"] for r in results) > 0, "the shared prefix restores a state checkpoint"
    summary = next(line for line in proc.stdout.splitlines() + proc.stderr.splitlines() if "state cache" in line)
    restores = int(summary.split("state cache")[1].split()[0])
    assert restores > 0, summary
    for r in results:
        seq = r["prompt_token_ids"] + r["output_token_ids"]
        logits, routing = model.forward_reference(torch.tensor(seq))
        assert logits[len(r["prompt_token_ids"]) - 1:-1].argmax(-1).tolist() == r["output_token_ids"]
        assert np.array_equal(routings[r["id"]].astype(np.int64), routing[:-1].numpy())


def test_hf_hybrid_checkpoint_with_recording(tmp_path):
    pytest.importorskip("safetensors")
    from tests.inference.hf.families import assert_routing_matches
    from tests.inference.hf.hybrid_families import hf_hybrid_routing, make_hybrid_model
    hf = make_hybrid_model("nemotron_h")
    hf.save_pretrained(tmp_path / "ckpt")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b"".join(orjson.dumps({"id": f"p{i}", "prompt_token_ids": [5 + i, 17, 99, 23, 42, 8, 150, 3, 77]})
                                 + b"\n" for i in range(3)))
    out = tmp_path / "out"
    proc = _run(["--hf-checkpoint", str(tmp_path / "ckpt"), "--prompts-file", str(prompts), "--max-new-tokens", "4",
                 "--ignore-eos", "--record-routing", "--block-size", "4", "--output-dir", str(out)])
    assert proc.returncode == 0, proc.stderr
    routings, _ = load_routing(out)
    for r in _results(out):
        seq = r["prompt_token_ids"] + r["output_token_ids"]
        logits, ids, scores = hf_hybrid_routing(hf, seq)
        assert logits[len(r["prompt_token_ids"]) - 1:-1].argmax(-1).tolist() == r["output_token_ids"]
        assert assert_routing_matches(routings[r["id"]], ids, scores) == 0


@pytest.mark.parametrize("args, message", [
    (["--state-checkpoints", "-1"], "--state-checkpoints must be >= 0"),
    (["--checkpoint-interval-blocks", "-2"], "--checkpoint-interval-blocks must be >= 0"),
])
def test_bad_state_flags_name_the_flag(args, message):
    proc = _run(["--model", "tiny-hybrid-gdn", "--dry-run"] + args)
    assert proc.returncode == 2 and message in proc.stderr


def test_dry_run_lists_state_pool_and_checkpoints():
    proc = _run(["--model", "tiny-hybrid-gdn", "--dry-run", "--max-requests", "8", "--state-checkpoints", "3"])
    assert proc.returncode == 0, proc.stderr
    assert "8 slots (+1 dummy)" in proc.stdout and "3 prefix-cache checkpoints" in proc.stdout
    assert "1 attention layers of 4" in proc.stdout


def test_rl_groups_of_a_hybrid_are_warned_that_each_sample_computes_the_prompt(cli, tmp_path):
    """A hybrid's prefix hit needs the recurrent-state checkpoint, committed when the chunk
    lands: samples admitted in the same step each compute the prompt (no hit at all here),
    which the run says up front instead of promising one computation per group."""
    run = cli.run(["--model", "tiny-hybrid-gdn", "--num-requests", "2", "--samples-per-prompt", "3",
                   "--prompt-len", "20", "--output-len", "2", "--temperature", "1.0", "--block-size", "4",
                   "--output-dir", tmp_path])
    assert run.status == 0, run.stderr
    assert "hybrid model" in run.stderr and "each compute the prompt" in run.stderr, run.stderr
    results = [orjson.loads(line) for line in (tmp_path / "results.jsonl").read_bytes().splitlines()]
    assert len(results) == 6 and all(r["num_cached_tokens"] == 0 for r in results)
    plain = cli.run(["--num-requests", "1", "--samples-per-prompt", "2", "--temperature", "1.0", "--dry-run"])
    assert plain.status == 0 and "hybrid model" not in plain.stderr + plain.stdout
