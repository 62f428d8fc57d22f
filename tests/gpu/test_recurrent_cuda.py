"""Recurrent layers on CUDA at the real shapes: the fast paths (slot-indexed Triton decode
kernels, fla-core chunked prefill) against the torch forms, CUDA-graph decode, no host sync
in decode steps. Skips without CUDA; the fla tests skip without ``fla``."""

from __future__ import annotations

import pytest
import torch

from inference.kernels import recurrent_fla
from inference.model.recurrent import RecurrentMetadata
from tests.inference.kernels.harness import forbid_host_sync
from tools.bench_recurrent import LAYERS, make_layer, slot_tensors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_fla = pytest.mark.skipif(not recurrent_fla.fla_available(), reason="fla (fla-core) not installed")
PRESETS = list(LAYERS.values())
TOL = {torch.float32: 2e-3, torch.bfloat16: 5e-2}


def close(a, b, tol):
    scale = b.float().abs().max().clamp(min=1.0)
    assert (a.float() - b.float()).abs().max() <= tol * scale, (a.float() - b.float()).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", PRESETS)
def test_decode_steps_match_torch_and_do_not_sync(preset, dtype):
    layer = make_layer(preset, dtype, "cuda")
    conv, rec = slot_tensors(layer, 8, dtype, "cuda")
    ref_conv, ref_rec = conv.clone(), rec.clone()
    slots = [5, 0, 7, 2, 3]
    meta = RecurrentMetadata.build([1] * 5, slots, [True, True, False, True, True], device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        layer(torch.randn(5, layer.in_proj.in_features, device="cuda", dtype=dtype, generator=gen),
              meta, conv.clone(), rec.clone())                              # compile outside the guard
        for step in range(4):
            x = torch.randn(5, layer.in_proj.in_features, device="cuda", dtype=dtype, generator=gen)
            ref = layer(x, meta, ref_conv, ref_rec, mode="recurrent")
            with forbid_host_sync():
                out = layer(x, meta, conv, rec, mode="auto")
            close(out, ref, TOL[dtype])
            close(rec, ref_rec, TOL[dtype])
            close(conv, ref_conv, TOL[dtype])


@pytest.mark.parametrize("preset", PRESETS)
def test_layer_decode_replays_as_a_cuda_graph(preset):
    dtype = torch.bfloat16
    layer = make_layer(preset, dtype, "cuda")
    conv, rec = slot_tensors(layer, 8, dtype, "cuda")
    x = torch.zeros(4, layer.in_proj.in_features, device="cuda", dtype=dtype)
    meta = RecurrentMetadata.build([1] * 4, [0, 1, 2, 8], [True, True, True, False], device="cuda")  # 8: dummy
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(x, meta, conv.clone(), rec.clone())
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x, meta, conv, rec)
        for seed, slots in ((1, [3, 4, 5, 8]), (2, [5, 3, 6, 8])):
            x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x))
            meta.state_slots.copy_(torch.tensor(slots))
            ref_conv, ref_rec = conv.clone(), rec.clone()
            ref = layer(x, RecurrentMetadata.build([1] * 4, slots, [True, True, True, False], device="cuda"),
                        ref_conv, ref_rec, mode="recurrent")
            graph.replay()
            close(out[:3], ref[:3], TOL[dtype])
            close(rec[:8], ref_rec[:8], TOL[dtype])


@needs_fla
@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("preset", PRESETS)
def test_fla_prefill_of_a_mixed_step_matches_torch_chunked(preset, dtype):
    """Half precision only: fp32 "auto" prefill runs the torch form (fla multiplies in tf32)."""
    layer = make_layer(preset, dtype, "cuda")
    conv, rec = slot_tensors(layer, 6, dtype, "cuda")
    ref_conv, ref_rec = conv.clone(), rec.clone()
    lens, slots, init = [300, 1, 77, 1, 129], [4, 0, 1, 5, 2], [False, True, True, True, False]
    meta = RecurrentMetadata.build(lens, slots, init, device="cuda")
    x = torch.randn(sum(lens), layer.in_proj.in_features, device="cuda", dtype=dtype,
                    generator=torch.Generator(device="cuda").manual_seed(3)) * 0.5
    with torch.no_grad():
        ref = layer(x, meta, ref_conv, ref_rec, mode="chunked")
        out = layer(x, meta, conv, rec, mode="auto")
    close(out, ref, TOL[dtype])
    close(rec, ref_rec, TOL[dtype])


@pytest.mark.parametrize("preset", PRESETS)
def test_prefill_chunks_then_graph_free_decode_equal_one_whole_sequence(preset):
    """fp32: auto prefill chunks (the torch form in fp32) + auto decode steps (Triton) give
    the torch chunked form of the whole sequence."""
    dtype = torch.float32
    layer = make_layer(preset, dtype, "cuda")
    x = torch.randn(150, layer.in_proj.in_features, device="cuda", generator=torch.Generator(device="cuda").manual_seed(4))
    conv, rec = slot_tensors(layer, 2, dtype, "cuda")
    with torch.no_grad():
        whole = layer(x, RecurrentMetadata.build([150], [1], [False], device="cuda"), conv.clone(), rec.clone(),
                      mode="chunked")
        outs, start = [], 0
        for i, n in enumerate([64, 70, 1, 1, 1, 13]):
            meta = RecurrentMetadata.build([n], [1], [i > 0], device="cuda")
            outs.append(layer(x[start:start + n], meta, conv, rec, mode="auto"))
            start += n
    close(torch.cat(outs), whole, TOL[dtype])
