"""The decode benchmark's CPU-checkable parts: component labels on the real decode forward,
kernel-time attribution, the byte floors, and the command line."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.model import MoEGPT
from inference.presets import build_model, get_preset
from inference.request import SamplingParams
from tools import bench_decode
from tools import decode_profile as dp


@pytest.fixture(scope="module")
def decode_runner():
    """A CPU engine mid-decode whose padded decode path (what graphs capture) is eager."""
    model = build_model(get_preset("tiny-moe-sigmoid"), seed=0)
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=64, max_requests=4, max_step_tokens=64,
                                           padded_decode=True, record_routing=True))
    for i in range(3):
        engine.add_request([5, 6, 7, 8 + i], SamplingParams(max_new_tokens=8, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.step_log.entries[-1]["decode_requests"] == 3
    return engine.graph_runner


def test_every_component_is_labelled_and_everything_is_restored(decode_runner):
    model, recorder = decode_runner.model, decode_runner.recorder
    experts_fns = [layer.mlp.experts_fn for layer in model.layers if layer.moe_index is not None]
    with torch.inference_mode():
        reference = decode_runner._forward(4).clone()
        with dp.labelled_components(model, recorder) as wrapped:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                labelled = decode_runner._forward(4)
    assert wrapped > 10
    torch.testing.assert_close(labelled, reference)  # labels change no result
    seen = {e.name.removeprefix(dp.LABEL_PREFIX) for e in prof.events() if e.name.startswith(dp.LABEL_PREFIX)}
    assert seen == set(dp.COMPONENTS)   # tiny-moe-sigmoid has dense layers and a shared expert
    assert "forward" not in vars(model) and "gather" not in vars(recorder)
    assert [layer.mlp.experts_fn for layer in model.layers if layer.moe_index is not None] == experts_fns
    assert all("forward" not in vars(m) for m in model.modules())


def fake_event(name, parent=None, kernels=(), device=False, span=(0.0, 0.0)):
    return SimpleNamespace(name=name, cpu_parent=parent, kernels=[SimpleNamespace(duration=d) for d in kernels],
                           device_type=torch.autograd.DeviceType.CUDA if device else torch.autograd.DeviceType.CPU,
                           is_user_annotation=False, time_range=SimpleNamespace(start=span[0], end=span[1]))


def test_kernel_time_goes_to_the_innermost_label_and_orphans_are_unlabelled():
    outer = fake_event(dp.LABEL_PREFIX + "routing capture")
    inner = fake_event(dp.LABEL_PREFIX + "MoE experts", parent=outer)
    events = [
        outer, inner,
        fake_event("aten::copy_", parent=outer, kernels=[2.0]),
        fake_event("aten::mm", parent=fake_event("aten::linear", parent=inner), kernels=[10.0, 5.0]),
        fake_event(dp.LABEL_PREFIX + "logits", kernels=[7.0]),   # a Triton launch: its kernel sits on the label
        fake_event("aten::add", kernels=[1.0]),                                  # no label above it
        # device-side records of those kernels, plus one the profiler linked to nothing
        *(fake_event("k", device=True, span=(0.0, d)) for d in (2.0, 10.0, 5.0, 7.0, 1.0, 4.0)),
    ]
    totals = dp.attribute_kernel_time(events)
    assert totals["MoE experts"] == 15.0 and totals["routing capture"] == 2.0 and totals["logits"] == 7.0
    assert totals["unlabelled"] == 1.0 + 4.0
    assert sum(totals.values()) == 29.0


@pytest.mark.parametrize("name", ["olmoe-1b-7b-shape", "qwen3-30b-a3b-shape"])
@pytest.mark.parametrize("batch", [1, 64, 256])
def test_component_floors_add_up_to_the_step_floor(name, batch):
    """Two independent byte counts (parameters counted from a model vs per-component shape
    arithmetic) agree within the activations the step floor leaves out."""
    config = get_preset(name)
    with torch.device("meta"):
        model = MoEGPT(config)
    step = dp.bytes_per_decode_step(config, model, batch, 576, 2)["total"]
    parts = sum(dp.component_floor_bytes(config, batch, 576, 2).values())
    assert abs(parts - step) <= 0.03 * step


@pytest.mark.parametrize("name", ["qwen3.5-35b-a3b-shape", "nemotron-3-nano-30b-a3b-shape"])
def test_the_decode_floor_counts_recurrent_state_read_and_written(name):
    """Hybrids: KV of the attention layers only, plus each request's recurrent state twice
    (counted here from the layer shapes: conv states in bf16, recurrent / SSM states fp32)."""
    config = get_preset(name)
    with torch.device("meta"):
        model = MoEGPT(config).to(torch.bfloat16)
    batch, context = 64, 640
    need = dp.bytes_per_decode_step(config, model, batch, context, 2)
    per_seq = 0
    for kind in config.layer_types:
        if kind == "gated_deltanet":
            g = config.gated_deltanet
            per_seq += g.conv_dim * (g.conv_kernel - 1) * 2 + g.num_v_heads * g.head_k_dim * g.head_v_dim * 4
        elif kind == "mamba2":
            m = config.mamba2
            conv_dim = m.num_heads * m.head_dim + 2 * m.n_groups * m.state_size
            per_seq += conv_dim * (m.conv_kernel - 1) * 2 + m.num_heads * m.head_dim * m.state_size * 4
    assert need["state"] == 2 * batch * per_seq > 0
    attention = sum(k in ("full_attention", "sliding_attention") for k in config.layer_types)
    assert need["kv"] == batch * context * 2 * attention * config.num_kv_heads * config.head_dim * 2
    assert need["total"] == need["weights"] + need["kv"] + need["state"]


def test_breakdown_rows_and_gpu_names():
    profile = {"components_ms": {"MoE experts": 2.0, "logits": 0.5}, "graph_launch_gaps_ms": 0.3}
    rows = dp.breakdown_rows(profile, {"MoE experts": 1e9, "logits": 0.0}, bandwidth=1e12)
    by_name = {r["component"]: r for r in rows}
    assert by_name["MoE experts"]["floor_ms"] == pytest.approx(1.0) and by_name["MoE experts"]["ratio"] == 2.0
    assert by_name["logits"]["ratio"] is None and by_name["graph launch gaps"]["ms"] == 0.3
    assert dp.gpu_slug("NVIDIA H200") == "h200"
    assert dp.gpu_slug("NVIDIA H100 80GB HBM3") == "h100"


def test_command_line_quick_mode_and_bad_backend():
    args = bench_decode.parse_args(["--quick"])
    assert args.batches == [1, 64, 256] and args.profile_batches == [64, 256] and not args.hf
    assert bench_decode.parse_args(["--batches", "2,4"]).profile_batches == [2, 4]
    with pytest.raises(SystemExit):
        bench_decode.parse_args(["--compare-backends", "cutlass"])
    with pytest.raises(ValueError, match="unknown preset"):
        bench_decode.parse_args(["--models", "gpt-5"])
