"""The Triton kernels of the newer families compile ahead of time for sm90 (H100/H200) on a
machine without a GPU: the interpreter checks their numbers but not that Triton can lower
them (constexpr branches, dot shapes, register budget). Where Triton ships cuobjdump, the
cubin must not spill to local memory.

Pointers and strides (all but the block table's row stride, a table width) are compiled
as multiples of 16, as the JIT specializes them at run time for the shapes named here:
without the hint the K/V gathers lose their vector loads and the register budget measured
is not the one that runs."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import tempfile

import pytest
import torch

from tests.inference.kernels.harness import needs_triton

pytestmark = [needs_triton, pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION:UserWarning")]


def _compile(fn, types: dict[str, str], consts: dict, num_warps: int = 4, num_stages: int = 2):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    signature = {name: types.get(name, "i32") for name in fn.arg_names}
    signature.update({name: "constexpr" for name in consts})
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name not in consts
               and (name.endswith("_ptr") or (name.startswith("stride_") and name != "stride_bt"))}
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=aligned)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    except (ImportError, RuntimeError) as exc:
        if "backend" in str(exc).lower() and "cuda" in str(exc).lower():
            pytest.skip(f"no CUDA backend in this Triton: {exc}")
        raise


def _spill_bytes(kernel) -> int | None:
    """Bytes of local memory (static) or stack frame (where ptxas puts spilled registers)."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, timeout=60).stdout
    finally:
        os.unlink(f.name)
    found = re.findall(r"(?:LOCAL|STACK):(\d+)", out)
    return max(map(int, found)) if found else None


def _packed_prefill(pf, types: dict, head_dim: int, group: int, window_and_sinks: bool) -> tuple:
    """The packed prefill kernel at ``default_prefill_launch`` for a long bf16 chunk."""
    launch = pf.default_prefill_launch(head_dim, 2, 2048, packed=True, group=group)
    consts = dict(GROUP=group, HEAD_DIM=head_dim, KV_BLOCK_SIZE=16, BLOCK_M=launch["block_m"],
                  BLOCK_Q=launch["block_m"] // group, BLOCK_N=launch["block_n"], BLOCK_D=head_dim,
                  HAS_SINKS=window_and_sinks, HAS_WINDOW=window_and_sinks)
    return pf._prefill_packed_kernel, types, consts, launch["num_warps"], launch["num_stages"] or 2


def _kernels():
    pd = importlib.import_module("inference.kernels.paged_decode_triton")
    pf = importlib.import_module("inference.kernels.prefill_attention")
    ml = importlib.import_module("inference.kernels.mla_decode_triton")
    sk = importlib.import_module("inference.kernels.skinny_linear")
    bf = "*bf16"
    skinny = {"x_ptr": bf, "w_ptr": bf, "b_ptr": bf, "out_ptr": bf}
    attn = {"q_ptr": bf, "k_ptr": bf, "v_ptr": bf, "out_ptr": bf, "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32",
            "query_start_loc_ptr": "*i32", "sinks_ptr": "*fp32", "qk_scale": "fp32"}
    return {
        "decode, window + sinks, GPT-OSS heads": (pd._decode_split_kernel, {**attn, "lse_ptr": bf}, dict(
            GROUP=8, HEAD_DIM=64, KV_BLOCK_SIZE=16, BLOCK_G=16, BLOCK_N=64, BLOCK_D=64, NUM_SPLITS=1, USE_DOT=True,
            HAS_SINKS=True)),
        "split merge with sinks": (pd._decode_merge_kernel,
                                   {"partial_out_ptr": "*fp32", "partial_lse_ptr": "*fp32", "sinks_ptr": "*fp32",
                                    "out_ptr": bf}, dict(HEAD_DIM=64, NUM_SPLITS=4, BLOCK_S=4, BLOCK_D=64, HAS_SINKS=True)),
        "prefill, window + sinks": (pf._prefill_kernel, attn, dict(
            GROUP=8, HEAD_DIM=64, KV_BLOCK_SIZE=16, BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, HAS_SINKS=True,
            HAS_WINDOW=True)),
        "prefill, causal, the tuned 128 x 128 tiles at head_dim 128, 8 warps": (pf._prefill_kernel, attn, dict(
            GROUP=8, HEAD_DIM=128, KV_BLOCK_SIZE=16, BLOCK_M=128, BLOCK_N=128, BLOCK_D=128, HAS_SINKS=False,
            HAS_WINDOW=False), 8),
        "packed GQA prefill, causal, the default launch at head_dim 128 / group 8 (Qwen3-30B-A3B)":
            _packed_prefill(pf, attn, head_dim=128, group=8, window_and_sinks=False),
        "packed GQA prefill, window + sinks, the default launch at GPT-OSS heads":
            _packed_prefill(pf, attn, head_dim=64, group=8, window_and_sinks=True),
        "MLA decode, Moonlight latent 512 + 64": (ml._mla_decode_kernel, {
            "q_lat_ptr": bf, "q_rope_ptr": bf, "cache_ptr": bf, "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32",
            "out_ptr": "*fp32", "lse_ptr": "*fp32", "qk_scale": "fp32"}, dict(
            LATENT=512, ROPE=64, KV_BLOCK_SIZE=16, BLOCK_H=16, BLOCK_N=16, BLOCK_L=512, BLOCK_R=64, NUM_SPLITS=4)),
        **{f"skinny linear, default tiles at {m} rows": (sk._skinny_linear_kernel, skinny, dict(
            HAS_BIAS=True, BLOCK_M=min(sk._pow2(m), 16) if not launch.use_dot else sk.DOT_BLOCK_M,
            BLOCK_N=launch.block_n, BLOCK_K=launch.block_k, USE_DOT=launch.use_dot, EVEN_K=True), launch.num_warps)
           for m, launch in ((m, sk.default_launch(m, 2048, 2048, torch.bfloat16)) for m in (1, 2, 4, 16))},
    }


@pytest.mark.parametrize("name", list(_kernels()))
def test_kernel_compiles_for_sm90_without_spills(name):
    fn, types, consts, *warps = _kernels()[name]
    kernel = _compile(fn, types, consts, *warps)
    assert kernel.asm["cubin"], name
    spilled = _spill_bytes(kernel)
    assert spilled in (None, 0), f"{name} spills {spilled} bytes to local memory"
