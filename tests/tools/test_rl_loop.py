"""tools/rl_loop.py: rollouts -> GRPO step on the megatron (or transformers) trainer with
routing replay -> update_weights into the same engine, a few iterations on CPU."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import torch

from tools.rl_loop import main
from tools.rl_trainers import group_advantages, grpo_loss

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--num-prompts", "2", "--group-size", "2", "--prompt-len", "8", "--output-len", "8", "--device", "cpu"]


@pytest.fixture
def one_thread():
    """Tiny tensors: extra intra-op threads only contend (a shared 2-core runner)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check_report(report: dict, iterations: int) -> list[dict]:
    rows = report["iterations"]
    assert len(rows) == iterations
    versions = [row["weight_version"] for row in rows]
    assert versions == [report["initial_weight_version"] + k for k in range(iterations)]
    assert all(row["new_weight_version"] == row["weight_version"] + 1 for row in rows)
    assert len({row["engine_id"] for row in rows}) == 1          # one engine object throughout
    assert len({row["engine_bytes"] for row in rows}) == 1       # refit allocates nothing that stays
    assert all(row["router_disagreement_with_replay"] == 0 for row in rows)
    assert all(row["refit_s"] > 0 and row["num_generated_tokens"] > 0 for row in rows)
    for key in ("logprob_abs_diff_mean", "kl_k3"):
        with_replay = sum(row[f"{key}_with_replay"] for row in rows)
        without = sum(row[f"{key}_without_replay"] for row in rows)
        assert math.isfinite(with_replay) and with_replay < without, key
    return rows


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_megatron_loop(tmp_path, capsys, one_thread):
    pytest.importorskip("megatron.core")
    out = tmp_path / "rl.json"
    assert main(["--iterations", "3", "--output", str(out), *SMALL]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "disagree replay" in lines[0] and len(lines) == 4
    report = orjson.loads(out.read_bytes())
    assert report["backend"] == "megatron" and report["train_dtype"] == "bfloat16"
    rows = _check_report(report, 3)
    # bf16 training against fp32 rollouts: the routers disagree somewhere unless replayed
    assert any(row["router_disagreement_without_replay"] > 0 for row in rows)


def test_hf_backend(tmp_path, capsys, one_thread):
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3MoeConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                                         moe_intermediate_size=16, intermediate_size=32, eos_token_id=1)
    model = transformers.Qwen3MoeForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1 / math.sqrt(p.shape[-1])
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "h.json"
    assert main(["--backend", "hf", "--hf-checkpoint", str(tmp_path / "ckpt"), "--iterations", "2",
                 "--output", str(out), *SMALL, "--num-prompts", "4", "--output-len", "16"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3      # header + one row per iteration
    report = orjson.loads(out.read_bytes())
    assert report["backend"] == "hf" and report["model"] == "qwen3_moe"
    rows = _check_report(report, 2)
    assert any(row["router_disagreement_without_replay"] > 0 for row in rows)


@pytest.mark.parametrize("flags,message", [
    (["--backend", "hf"], "--backend hf needs --hf-checkpoint"),
    (["--group-size", "1"], "--group-size must be >= 2"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--iterations", "0"], "--iterations must be >= 1"),
    (["--train-dtype", "float16"], "loss scaling"),
])
def test_bad_flags(flags, message):
    with pytest.raises(SystemExit, match=message):
        main(flags)


def test_runs_as_a_script_from_the_checkout():
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "rl_loop.py"), "--iterations", "0"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 1 and "--iterations must be >= 1" in proc.stderr


def test_group_advantages_are_relative_to_the_group():
    adv = group_advantages([1.0, 0.0, 0.5, 0.5], 2)
    assert adv[0] == pytest.approx(1.0, abs=1e-5) and adv[1] == pytest.approx(-1.0, abs=1e-5)
    assert adv[2:] == [0.0, 0.0]            # a group without spread teaches nothing


def test_grpo_loss_clips_the_ratio_against_the_rollout_policy():
    rollout = [torch.log(torch.tensor([0.5, 0.5]))]
    up = [torch.log(torch.tensor([0.5, 1.0])).requires_grad_()]   # ratios 1 and 2
    loss = grpo_loss(up, rollout, [1.0], clip=0.2)
    # min(r * A, clip(r) * A) with A = 1: 1 and min(2, 1.2) = 1.2; mean of the negatives
    assert float(loss.detach()) == pytest.approx(-(1.0 + 1.2) / 2)
    loss.backward()
    assert up[0].grad[1] == 0 and up[0].grad[0] == pytest.approx(-0.5)   # the clipped token passes no gradient
    down = grpo_loss([torch.log(torch.tensor([0.5, 1.0]))], rollout, [-1.0], clip=0.2)
    assert float(down) == pytest.approx(-(-1.0 - 2.0) / 2)      # a negative advantage is not clipped above
