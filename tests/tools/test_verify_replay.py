"""tools/verify_replay.py end to end: rollouts recorded by our engine, a training forward
with and without replay; with replay the routers agree exactly."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import torch

from tools.verify_replay import main

ROOT = Path(__file__).resolve().parents[2]
KEYS = ("router_disagreement_with_replay", "router_disagreement_without_replay",
        "token_disagreement_without_replay", "max_abs_logprob_diff_with_replay")
SMALL = ["--num-requests", "3", "--prompt-len", "10", "--output-len", "8"]


def _report(path: Path) -> dict:
    report = orjson.loads(path.read_bytes())
    assert all(isinstance(report[k], float) or report[k] == 0 for k in KEYS)
    return report


def test_reference_backend_as_a_script(tmp_path):
    out = tmp_path / "replay.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "verify_replay.py"), "--backend", "reference",
                           "--perturb", "0.05", "--output", str(out), *SMALL],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "router disagreement" in proc.stdout and "with replay" in proc.stdout
    report = _report(out)
    assert report["router_disagreement_with_replay"] == 0
    assert report["token_disagreement_with_replay"] == 0
    assert report["router_disagreement_without_replay"] > 0
    assert report["token_disagreement_without_replay"] >= report["router_disagreement_without_replay"]
    assert report["num_sequences"] == 3 and report["train_dtype"] == "bfloat16"


def test_same_weights_same_dtype_agree_even_without_replay(tmp_path):
    out = tmp_path / "r.json"
    assert main(["--backend", "reference", "--train-dtype", "float32", "--output", str(out), *SMALL]) == 0
    report = _report(out)
    assert report["router_disagreement_without_replay"] == 0
    assert report["max_abs_logprob_diff_with_replay"] < 1e-4


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")   # megatron's own
def test_megatron_backend(tmp_path):
    pytest.importorskip("megatron.core")
    out = tmp_path / "m.json"
    assert main(["--backend", "megatron", "--perturb", "0.05", "--output", str(out), *SMALL]) == 0
    report = _report(out)
    assert report["router_disagreement_with_replay"] == 0 and report["router_disagreement_without_replay"] > 0


def test_hf_backend(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    config = transformers.Qwen3MoeConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                                         moe_intermediate_size=16, intermediate_size=32, eos_token_id=1)
    model = transformers.Qwen3MoeForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    model.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "h.json"
    assert main(["--backend", "hf", "--hf-checkpoint", str(tmp_path / "ckpt"), "--perturb", "0.1",
                 "--output", str(out), *SMALL]) == 0
    report = _report(out)
    assert report["backend"] == "hf" and report["model"] == "qwen3_moe"
    assert report["router_disagreement_with_replay"] == 0 and report["router_disagreement_without_replay"] > 0


def test_hf_backend_needs_a_checkpoint(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--backend", "hf", *SMALL])
    assert exit_info.value.code == 2 and "--backend hf needs --hf-checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("content", [None, b"not json", b'{"model_type": "llama"}'], ids=["missing", "bad-json", "unsupported"])
def test_unusable_checkpoint_is_a_usage_error(tmp_path, capsys, content):
    ckpt = tmp_path / "ckpt"
    if content is not None:
        ckpt.mkdir()
        (ckpt / "config.json").write_bytes(content)
    assert main(["--backend", "reference", "--hf-checkpoint", str(ckpt), *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(ckpt) in err and "Traceback" not in err


@pytest.mark.parametrize("backend, module, extra", [("megatron", "megatron", "megatron"), ("hf", "transformers", "hf")])
def test_missing_backend_dependency_names_the_extra(tmp_path, capsys, monkeypatch, backend, module, extra):
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")] + [module]:
        monkeypatch.setitem(sys.modules, name, None)
    args = ["--backend", backend, *SMALL] + (["--hf-checkpoint", str(tmp_path)] if backend == "hf" else [])
    code = main(args)   # checked before the (empty) checkpoint directory is even read
    err = capsys.readouterr().err
    assert code == 2 and f'pip install -e ".[{extra}]"' in err and "Traceback" not in err, err


def test_hf_backend_on_gpt_oss(tmp_path):
    """GPT-OSS's MoE block names its router ``router`` (not ``gate``)."""
    pytest.importorskip("safetensors")
    from tests.inference.hf.families import make_hf_model
    make_hf_model("gpt_oss", vocab_size=128).save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "h.json"
    assert main(["--backend", "hf", "--hf-checkpoint", str(tmp_path / "ckpt"), "--perturb", "0.1",
                 "--output", str(out), *SMALL]) == 0
    report = _report(out)
    assert report["router_disagreement_with_replay"] == 0 and report["router_disagreement_without_replay"] > 0
