"""The decode benchmark's CPU-checkable parts: component labels on the real decode forward,
kernel-time attribution, the byte floors, and the command line."""

from __future__ import annotations

import dataclasses
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
from tools.decode_tables import format_host_stages
from tools.profile_attribution import KernelRecord, LabelRange, Launch, attribute_kernels, short_kernel_name


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


def _linear_labels(runner) -> dict[str, int]:
    """Innermost component label around every ``aten::linear`` of one labelled forward."""
    with torch.inference_mode(), dp.labelled_components(runner.model, runner.recorder):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            runner._forward(4)
    labels: dict[str, int] = {}
    for event in prof.events():
        if event.name == "aten::linear":
            parent = event.cpu_parent
            while parent is not None and not parent.name.startswith(dp.LABEL_PREFIX):
                parent = parent.cpu_parent
            name = parent.name.removeprefix(dp.LABEL_PREFIX) if parent is not None else None
            labels[name] = labels.get(name, 0) + 1
    return labels


def test_skinny_linear_projections_stay_attention_projections(decode_runner):
    """With ``skinny_linear_max_tokens`` on, qkv_proj / o_proj bypass ``nn.Linear.forward``
    (the kernel on CUDA, its F.linear fallback here): still charged to the projections."""
    model = decode_runner.model
    off = _linear_labels(decode_runner)
    try:
        assert model.set_skinny_linear(16)["projections"] == 2 * model.config.num_layers
        on = _linear_labels(decode_runner)
    finally:
        model.set_skinny_linear(0)
    assert on == off and off["attention projections"] >= 2 * model.config.num_layers
    assert all("_linear" not in vars(m) for m in model.modules())


def test_kernels_go_to_the_innermost_label_around_their_launch():
    """Synthetic records: nested labels, an aten-launched kernel, a Triton-style launch
    straight under a label (no op above it), a launch between labels, a kernel with no
    launch record, and a second thread whose ranges do not contain the first's launches."""
    labels = [LabelRange("routing capture", 0, 0.0, 100.0), LabelRange("MoE experts", 0, 10.0, 50.0),
              LabelRange("logits", 0, 120.0, 130.0), LabelRange("logits", 1, 0.0, 1000.0)]
    launches = [Launch(1, 0, 5.0),      # in routing capture, before the experts start
                Launch(2, 0, 20.0),     # aten op inside MoE experts
                Launch(3, 0, 49.0),     # Triton launch inside MoE experts
                Launch(4, 0, 60.0),     # back in routing capture after experts ended
                Launch(5, 0, 110.0),    # between labels
                Launch(6, 0, 125.0)]    # logits
    kernels = [KernelRecord("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>,"
                            " at::detail::Array<char*, 3> >(int, at::native::CUDAFunctor_add<float>)", 1, 2.0),
               KernelRecord("sm90_xmma_gemm_bf16bf16_bf16f32", 2, 10.0),
               KernelRecord("_fused_moe_kernel", 3, 5.0), KernelRecord("_fused_moe_kernel", 3, 1.0),
               KernelRecord("copy", 4, 3.0), KernelRecord("add", 5, 1.0), KernelRecord("gemv", 6, 7.0),
               KernelRecord("orphan", 99, 4.0)]
    result = attribute_kernels(labels, launches, kernels)
    assert result.totals == {"routing capture": 5.0, "MoE experts": 16.0, "logits": 7.0, "unlabelled": 5.0}
    assert sum(result.totals.values()) == sum(k.duration for k in kernels)
    top = result.top_kernels(steps=2)
    assert top[0] == {"kernel": "sm90_xmma_gemm_bf16bf16_bf16f32", "calls_per_step": 0.5, "ms_per_step": 0.005,
                      "component": "MoE experts"}
    by_name = {(r["kernel"], r["component"]): r for r in top}
    assert by_name[("_fused_moe_kernel", "MoE experts")]["calls_per_step"] == 1.0
    assert ("vectorized_elementwise_kernel<CUDAFunctor_add>", "routing capture") in by_name
    # the other thread's wide range must not capture thread 0's launches
    assert attribute_kernels(labels[3:], launches, kernels).totals == {"unlabelled": 33.0}
    # by kernel name, whatever the label: one "_fused_moe_kernel" row of both its calls
    names = result.by_kernel(steps=2)
    assert list(names)[0] == "sm90_xmma_gemm_bf16bf16_bf16f32"
    assert names["_fused_moe_kernel"] == {"calls_per_step": 1.0, "ms_per_step": 0.003}
    assert sum(r["ms_per_step"] for r in names.values()) * 2e3 == pytest.approx(sum(k.duration for k in kernels))


def test_records_from_profiler_events_use_launch_correlation_and_fall_back_to_the_op():
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def ev(name, id_, span, device=cpu, linked=0):
        return SimpleNamespace(name=name, id=id_, device_type=device, is_user_annotation=False,
                               linked_correlation_id=linked, time_range=SimpleNamespace(start=span[0], end=span[1]))

    events = [ev(dp.LABEL_PREFIX + "router + top-k", 7, (0, 100)),
              ev("cuLaunchKernelEx", 501, (10, 12)),                  # Triton: no op, linked to nothing
              ev("_router_topk_kernel", 501, (200, 203), cuda),
              ev("aten::mm", 8, (20, 40)),                            # kernel without a runtime record
              ev("gemm", 502, (210, 220), cuda, linked=8),
              ev("aten::add", 9, (150, 160)),
              ev("cudaLaunchKernel", 503, (151, 152), linked=9),
              ev("add_kernel", 503, (230, 231), cuda, linked=9)]
    totals, attribution = dp.attribute_kernel_time(events)
    top = attribution.top_kernels()
    assert totals["router + top-k"] == 13.0 and totals["unlabelled"] == 1.0
    assert set(totals) == {*dp.COMPONENTS, "unlabelled"}
    assert {r["kernel"] for r in top} == {"_router_topk_kernel", "gemm", "add_kernel"}


def test_short_kernel_names():
    cutlass = "cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8"
    assert short_kernel_name(f"void cutlass::Kernel2<{cutlass}>(Params)") == f"Kernel2<{cutlass}>"
    assert short_kernel_name("_fused_moe_gate_up_kernel") == "_fused_moe_gate_up_kernel"
    assert short_kernel_name("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda("
                             "at::TensorIteratorBase&)::{lambda()#3}>(int)") == (
        "unrolled_elementwise_kernel<direct_copy_kernel_cuda>")
    assert short_kernel_name("Memcpy DtoD (Device -> Device)") == "Memcpy DtoD"
    assert len(short_kernel_name("k" * 200)) == 80


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
    assert bench_decode.parse_args([]).timeline_batches == []
    assert bench_decode.parse_args(["--timeline-batches", "1,64"]).timeline_batches == [1, 64]
    with pytest.raises(SystemExit):
        bench_decode.parse_args(["--compare-backends", "cutlass"])
    with pytest.raises(ValueError, match="unknown preset"):
        bench_decode.parse_args(["--models", "gpt-5"])
    args = bench_decode.parse_args(["--quick", "--compare-small-ops", "off", "--compare-backends", ""])
    assert args.compare_small_ops == ["off"] and args.compare_backends == [] and args.fused_small_ops == "auto"
    with pytest.raises(SystemExit):
        bench_decode.parse_args(["--compare-small-ops", "fast"])


def test_no_kv_write_comparison_keeps_the_other_small_ops():
    compare = f"off,{bench_decode.NO_KV_WRITE}"
    args = bench_decode.parse_args(["--compare-small-ops", compare, "--fused-small-ops", "on"])
    assert args.compare_small_ops == ["off", "no-kv-write"]
    main, off = bench_decode.engine_config(args, 4, "auto"), bench_decode.engine_config(args, 4, "auto", "off")
    no_kv = bench_decode.engine_config(args, 4, "auto", bench_decode.NO_KV_WRITE)
    assert (main.fused_small_ops, main.fused_kv_write) == ("on", True)
    assert (off.fused_small_ops, off.fused_kv_write) == ("off", True)
    assert (no_kv.fused_small_ops, no_kv.fused_kv_write) == ("on", False)


def test_torch_sampler_comparison_changes_only_the_sampler():
    args = bench_decode.parse_args(["--compare-small-ops", bench_decode.TORCH_SAMPLER])
    main = bench_decode.engine_config(args, 4, "auto")
    torch_sampler = bench_decode.engine_config(args, 4, "auto", bench_decode.TORCH_SAMPLER)
    assert main.sampler_kernel is None
    assert torch_sampler == dataclasses.replace(main, sampler_kernel=False)


def test_small_moe_flag_reaches_every_engine_config():
    default = bench_decode.parse_args(["--quick"])
    assert default.small_moe_max_tokens is None
    assert bench_decode.engine_config(default, 64, "auto").fused_moe_small_batch_max_tokens is None
    off = bench_decode.parse_args(["--quick", "--small-moe-max-tokens", "0"])
    for backend, small_ops in (("auto", None), ("grouped_mm", None), ("auto", "off")):
        cfg = bench_decode.engine_config(off, 64, backend, small_ops)
        assert cfg.fused_moe_small_batch_max_tokens == 0 and cfg.moe_backend == backend
    assert bench_decode.engine_config(off, 64, "auto") == dataclasses.replace(   # nothing else differs
        bench_decode.engine_config(default, 64, "auto"), fused_moe_small_batch_max_tokens=0)
    with pytest.raises(SystemExit):
        bench_decode.parse_args(["--small-moe-max-tokens", "-1"])


def test_skinny_linear_flag_reaches_every_engine_config():
    default = bench_decode.parse_args(["--quick"])
    assert default.skinny_linear_max_tokens == 0
    assert bench_decode.engine_config(default, 64, "auto").skinny_linear_max_tokens == 0
    on = bench_decode.parse_args(["--quick", "--skinny-linear-max-tokens", "16"])
    for backend, small_ops in (("auto", None), ("grouped_mm", None), ("auto", "off"),
                               ("auto", bench_decode.NO_KV_WRITE)):
        cfg = bench_decode.engine_config(on, 64, backend, small_ops)
        assert cfg.skinny_linear_max_tokens == 16 and cfg.moe_backend == backend
    assert bench_decode.engine_config(on, 64, "auto") == dataclasses.replace(   # nothing else differs
        bench_decode.engine_config(default, 64, "auto"), skinny_linear_max_tokens=16)
    with pytest.raises(SystemExit):
        bench_decode.parse_args(["--skinny-linear-max-tokens", "-1"])


def test_tables_show_the_small_ops_comparison_side_by_side():
    breakdown = {"graph_replay_ms": 1.0, "eager_ms": 2.0, "kernel_ms": 0.8,
                 "rows": [{"component": "router + top-k", "ms": 0.1, "floor_ms": 0.01, "ratio": 10.0}],
                 "top_kernels": [{"kernel": "_router_topk_kernel", "calls_per_step": 48.0, "ms_per_step": 0.1,
                                  "component": "router + top-k"}]}
    report = {"model": "m", "device": "d", "dtype": "bfloat16", "moe_backend": "auto", "fused_small_ops": "auto",
              "copy_bandwidth_gb_s": 4000.0, "matmul_tflops": 800.0, "prompt_len": 512, "output_len": 32,
              "skipped": [], "batches": {"64": {"step_ms": 1.0, "ratio_to_floor": 1.5, "breakdown": breakdown}},
              "compare_small_ops": {"off": {"ratio_to_floor": {"64": 1.75},
                                            "batches": {"64": {"breakdown": {"error": "boom"}}}}}}
    text = bench_decode.format_tables(report)
    assert "x small-ops off" in text and "1.75" in text
    assert "small-batch MoE" not in text
    off = bench_decode.format_tables({**report, "fused_moe_small_batch_max_tokens": 0})
    assert "small-batch MoE <= 0 tokens" in off
    assert "skinny" not in text and "skinny attention projections <= 16 tokens" in bench_decode.format_tables(
        {**report, "skinny_linear_max_tokens": 16})
    assert "_router_topk_kernel" in text and "breakdown at batch 64, small ops off failed: boom" in text


def test_prefill_profile_serves_under_the_labels_and_restores_the_model():
    """CPU: the profiled serve runs (its prompt tokens are counted per 1k), every component
    is reported, and the model's methods are its own again afterwards."""
    model = build_model(get_preset("tiny-moe"), seed=0)
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=64, max_requests=4, max_step_tokens=64, record_routing=True))
    forward = model.forward

    def once() -> int:
        before = len(engine.step_log.entries)
        engine.generate([[5, 6, 7, 8, 9], [3, 4, 5]], SamplingParams(max_new_tokens=1, ignore_eos=True))
        return sum(e["prefill_tokens"] for e in engine.step_log.entries[before:])

    prof = dp.profile_prefill(model, once, engine.recorder)
    assert prof["prompt_tokens"] == 8
    assert set(dp.COMPONENTS) <= set(prof["components_ms_per_1k_tokens"])
    assert isinstance(prof["kernels_by_name"], dict)   # CPU: no device kernels to name
    assert "forward" not in vars(model) and model.forward == forward


def test_prefill_flop_floors_count_every_matmul_once():
    c = get_preset("qwen3-30b-a3b-shape")
    floors = dp.prefill_flop_floors(c, context=2048)
    h, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    assert floors["MoE experts"] == c.num_moe_layers * 2 * 3 * h * c.topk * c.moe_intermediate_size
    assert floors["attention projections"] == c.num_layers * 2 * h * (q + 2 * kv + q)
    assert floors["attention kernel + KV write"] == c.num_layers * 4 * q * 1024


def test_prefill_breakdown_table_lists_components_by_time():
    from tools.decode_tables import format_prefill_breakdown
    rows = [{"component": "norms and rotary", "ms": 1.0, "floor_ms": None, "ratio": None},
            {"component": "MoE experts", "ms": 60.0, "floor_ms": 20.0, "ratio": 3.0}]
    lines = format_prefill_breakdown({"step_tokens": 8192, "prompt_tokens": 4096, "rows": rows,
                                      "kernels_by_name": {"_gate_up_kernel": {"calls_per_step": 48, "ms_per_step": 20.0}}})
    assert "MoE experts" in lines[1] and "x3.00" in lines[1] and "norms and rotary" in lines[2]
    assert "_gate_up_kernel" in lines[4] and "40.000 ms" in lines[4]   # scaled to an 8192-token step
    assert format_prefill_breakdown(None) == []
    assert "failed" in format_prefill_breakdown({"error": "boom"})[0]


def test_host_stage_medians_of_real_decode_steps_and_their_line():
    """CPU engine steps carry every stage and the sub-stages the line quotes; the table line
    names them."""
    model = build_model(get_preset("tiny-moe"), seed=0)
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=64, max_requests=4, max_step_tokens=64))
    engine.generate([[5, 6, 7, 8, 9], [3, 4, 5]], SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=1.0))
    decode = [e for e in engine.step_log.entries if e["prefill_requests"] == 0]
    host = bench_decode.host_stage_medians(decode)
    for stage in ("schedule", "prepare", "launch", "complete"):
        assert host[f"stage_{stage}_ms"] > 0
    assert {"stage_complete_wait_ms", "stage_launch_sample_ms"} <= set(host)
    assert "gpu_idle_before_ms" not in host          # CPU steps have no CUDA events
    line = format_host_stages(4, host)
    assert line.startswith("host ms at batch 4: schedule ") and "of which wait" in line
