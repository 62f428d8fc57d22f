"""``F.linear`` for a few rows: a bandwidth-bound skinny GEMM (decode-time projections).

At decode batch 1-16 a projection such as Qwen3-30B-A3B's ``qkv_proj`` ([2048 -> 5120],
bf16) reads a 21 MB weight to produce a handful of rows: its time is the weight's bytes over
the memory bandwidth. cuBLAS picks tiles made for larger problems there (64x8 tiles, about 80
CTAs on the H200's 132 SMs for that shape, docs/BENCHMARKS.md, issue 14). This kernel gives
every program a thin slab of output columns and all of the rows:

- one launch, grid ``(cdiv(N, block_n), cdiv(M, BLOCK_M))``; program ``(n, m)`` streams
  weight rows ``[n * block_n, (n + 1) * block_n)`` over all of K once and writes
  ``out[m-block, n-block]``. For M <= 16 there is one row block, so the weight is read once
  in all (more rows work, each further block of 16 reading it again); N = 2048 at
  ``block_n`` 16 gives 128 programs, 8 gives 256;
- no split-K: every output element is one program's fixed-order sum, so results are
  deterministic (no atomics, no workspace, no second launch);
- fp32 accumulation whatever the input dtype; the bias (in fp32) is added to the sum and
  the result rounded once to ``x.dtype``.

Two ways to multiply, chosen by the row count (``use_dot`` overrides):

- up to ``BROADCAST_MAX_ROWS`` (4) rows, *broadcast multiply + sum*: each K step adds
  ``sum_k x[:, None, k] * w[None, :, k]`` (fp32, ``BLOCK_M`` = M rounded up to a power of
  two) to an fp32 ``[BLOCK_M, block_n]`` accumulator, both operands loaded straight into
  the product's 3-D layout. No padding to 16 rows and exact fp32 products; it costs M fp32
  multiply-adds per weight element on the CUDA cores, cheap next to the weight's load at
  1-4 rows;
- above it, ``tl.dot`` on tensor cores with the rows padded to ``BLOCK_M`` = 16 (tl.dot's
  minimum; the padded rows load as zeros and are never stored): at 8-16 rows the CUDA-core
  FMAs would cost about as much time as the weight's load. fp32 inputs use
  ``input_precision="ieee"`` (exact fp32, not TF32). Triton pipelines this path's loads
  (cp.async, ``num_stages``), not the broadcast path's, where the tile is what a program
  has in flight: the tuner (tools/tune_skinny_linear.py) times both paths at every row
  count.

Invariants: ``out == F.linear(x, weight, bias)`` up to fp32 summation order, in ``x.dtype``;
grids and allocations depend on shapes only and nothing syncs with the host, so CUDA graphs
capture it; weight loads are unmasked along N (out-of-range columns wrap onto valid rows and
are dropped by the masked store) and along K when ``block_k`` divides K. ``skinny_linear``
runs the kernel on CUDA tensors (or anywhere under ``TRITON_INTERPRET=1``) and
``F.linear`` elsewhere, with the same checks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: skinny_linear falls back to F.linear
    triton = None
    tl = None

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BROADCAST_MAX_ROWS = 4      # rows up to which the default multiplies without tl.dot
DOT_BLOCK_M = 16            # tl.dot's smallest tile: the row block of the tl.dot path
# Elements of the broadcast path's default product tile ([BLOCK_M, block_n, block_k]): at
# 4 warps about 64 registers a thread on sm90, so several programs share an SM.
BROADCAST_TILE_ELEMENTS = 8192
MAX_BLOCK_N = 256
MAX_BLOCK_K = 1024


@dataclass(frozen=True)
class SkinnyLaunch:
    """One launch configuration (the tuner's unit). Invariant: validated by
    ``check_launch`` before any kernel sees it."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    use_dot: bool


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def skinny_linear_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``skinny_linear`` accepts these operands (the modules check before calling):
    2-D, one supported dtype, the weight in nn.Linear's row-major layout."""
    return (x.dim() == 2 and weight.dim() == 2 and x.dtype == weight.dtype and x.dtype in SUPPORTED_DTYPES
            and x.shape[1] == weight.shape[1] and weight.stride(1) == 1)


def default_launch(m: int, n: int, k: int, dtype: torch.dtype, use_dot: bool | None = None) -> SkinnyLaunch:
    """Defaults until tools/tune_skinny_linear.py has run on the target GPU (every one
    compiles spill-free for sm90, tests/inference/kernels/test_compile_sm90.py). tl.dot above
    ``BROADCAST_MAX_ROWS`` rows (unless ``use_dot`` says): 16 columns, 512 bytes of each
    weight row per K step, 3 stages (cp.async keeps two steps in flight). Broadcast: 8
    columns a program (a decode projection's N gives 256+ programs; each also re-reads x,
    ``m / block_n`` of the weight's bytes, from L2) and the widest K step the
    ``BROADCAST_TILE_ELEMENTS`` budget allows, up to 2 KB a row: its loads are not
    pipelined, so the tile is what a program has in flight. 4 warps. ``n`` is not used yet:
    a tuned table would key on it."""
    if use_dot is None:
        use_dot = m > BROADCAST_MAX_ROWS
    element = torch.empty((), dtype=dtype).element_size()
    widest = max(16, _pow2(k))
    if use_dot:
        return SkinnyLaunch(16, min(512 // element, widest), num_warps=4, num_stages=3, use_dot=True)
    rows = min(_pow2(m), DOT_BLOCK_M)
    block_n = 8
    block_k = max(16, min(2048 // element, widest, BROADCAST_TILE_ELEMENTS // (rows * block_n)))
    return SkinnyLaunch(block_n, block_k, num_warps=4, num_stages=3, use_dot=False)


def check_launch(block_n, block_k, num_warps, num_stages, use_dot) -> None:
    """ValueError naming the first bad knob."""
    if not (_is_int(block_n) and 1 <= block_n <= MAX_BLOCK_N and block_n == _pow2(block_n)):
        raise ValueError(f"block_n must be a power of two in [1, {MAX_BLOCK_N}], got {block_n!r}")
    if use_dot and block_n < DOT_BLOCK_M:
        raise ValueError(f"block_n must be >= {DOT_BLOCK_M} on the tl.dot path (use_dot), got {block_n}")
    if not (_is_int(block_k) and 16 <= block_k <= MAX_BLOCK_K and block_k == _pow2(block_k)):
        raise ValueError(f"block_k must be a power of two in [16, {MAX_BLOCK_K}], got {block_k!r}")
    if not (_is_int(num_warps) and num_warps in (1, 2, 4, 8, 16)):
        raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16, got {num_warps!r}")
    if not (_is_int(num_stages) and 1 <= num_stages <= 8):
        raise ValueError(f"num_stages must be an int in [1, 8], got {num_stages!r}")
    if not isinstance(use_dot, bool):
        raise ValueError(f"use_dot must be None or a bool, got {use_dot!r}")


def _check_operands(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"skinny_linear needs x [M, K] and weight [N, K], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x has K={x.shape[1]} columns but weight [N, K] has K={weight.shape[1]}")
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"x and weight must share one of {SUPPORTED_DTYPES}, got {x.dtype} and {weight.dtype}")
    if weight.stride(1) != 1:
        raise ValueError(f"weight must be row-major [N, K] (unit stride along K), got strides {weight.stride()}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but weight on {weight.device}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"bias must be [N={weight.shape[0]}] in {x.dtype} on {x.device}, got "
                         f"{tuple(bias.shape)} {bias.dtype} on {bias.device}")


def resolve_launch(m: int, n: int, k: int, dtype: torch.dtype, block_n=None, block_k=None, num_warps=None,
                   num_stages=None, use_dot=None) -> SkinnyLaunch:
    """The launch a call runs: the caller's knobs over ``default_launch``'s (a forced path
    takes that path's default tiles), validated."""
    if use_dot is not None and not isinstance(use_dot, bool):
        raise ValueError(f"use_dot must be None or a bool, got {use_dot!r}")
    base = default_launch(m, n, k, dtype, use_dot)
    launch = SkinnyLaunch(base.block_n if block_n is None else block_n, base.block_k if block_k is None else block_k,
                          base.num_warps if num_warps is None else num_warps,
                          base.num_stages if num_stages is None else num_stages, base.use_dot)
    check_launch(launch.block_n, launch.block_k, launch.num_warps, launch.num_stages, launch.use_dot)
    return launch


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, block_n=None,
                  block_k=None, num_warps=None, num_stages=None, use_dot=None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for x [M, K] with few rows, weight [N, K] (nn.Linear's
    layout), optional bias [N]; bf16 / fp16 / fp32, output in ``x.dtype``. The Triton kernel
    on CUDA (or under TRITON_INTERPRET=1), ``F.linear`` elsewhere; knobs (None: the
    defaults) are validated on either path."""
    _check_operands(x, weight, bias)
    launch = resolve_launch(x.shape[0], weight.shape[0], x.shape[1], x.dtype, block_n, block_k, num_warps,
                            num_stages, use_dot)
    if triton is None or not (x.is_cuda or _interpreting()):
        return F.linear(x, weight, bias)
    return _launch(x, weight, bias, launch)


def skinny_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                         block_n=None, block_k=None, num_warps=None, num_stages=None,
                         use_dot=None) -> torch.Tensor:
    """``skinny_linear`` that always launches the kernel (CUDA, or the interpreter)."""
    if triton is None:
        raise RuntimeError("skinny_linear_triton needs Triton")
    if not (x.is_cuda or _interpreting()):
        raise ValueError("skinny_linear_triton runs on CUDA tensors (or under TRITON_INTERPRET=1)")
    _check_operands(x, weight, bias)
    return _launch(x, weight, bias, resolve_launch(x.shape[0], weight.shape[0], x.shape[1], x.dtype, block_n,
                                                   block_k, num_warps, num_stages, use_dot))


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, launch: SkinnyLaunch) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    block_m = DOT_BLOCK_M if launch.use_dot else min(_pow2(m), DOT_BLOCK_M)
    grid = (triton.cdiv(n, launch.block_n), triton.cdiv(m, block_m))
    _skinny_linear_kernel[grid](
        x, weight, weight if bias is None else bias, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=launch.block_n, BLOCK_K=launch.block_k,
        USE_DOT=launch.use_dot, EVEN_K=k % launch.block_k == 0,
        num_warps=launch.num_warps, num_stages=launch.num_stages)
    return out


if triton is not None:

    # M only bounds masks: one compiled kernel for every row count (Triton would otherwise
    # specialise M == 1 and M % 16 == 0 apart, tripling the tuner's compiles).
    @triton.jit(do_not_specialize=["M"])
    def _skinny_linear_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        USE_DOT: tl.constexpr, EVEN_K: tl.constexpr,
    ):
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # Columns past N wrap onto valid weight rows, so weight loads need no N mask; the
        # store drops those columns.
        rows_n = (offs_n % N).to(tl.int64)
        x_rows = x_ptr + offs_m.to(tl.int64) * stride_xm
        w_rows = w_ptr + rows_n * stride_wn
        if USE_DOT:
            acc = _dot_rows(x_rows, w_rows, offs_m < M, offs_k, K, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K)
        else:
            acc = _broadcast_rows(x_rows, w_rows, offs_m < M, offs_k, K, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows_n).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])

    @triton.jit
    def _broadcast_rows(x_rows, w_rows, m_mask, offs_k, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        # Both operands load straight into the 3-D layout of their product ([BLOCK_M, 1,
        # BLOCK_K] rows of x, [1, BLOCK_N, BLOCK_K] weight rows): loaded as 2-D tiles, the
        # weight tile would be re-laid out through shared memory every K step.
        x_ptrs = x_rows[:, None, None] + offs_k[None, None, :]
        w_ptrs = w_rows[None, :, None] + offs_k[None, None, :]
        x_mask = m_mask[:, None, None]
        # Each K step's products are summed over the tile at once (within each warp: the
        # layout spreads K over lanes and N over warps): an fp32 [BLOCK_M, BLOCK_N, BLOCK_K]
        # accumulator reduced after the loop would take twice the registers (sm90 compile),
        # and registers bound the tile, that is the weight bytes in flight.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(x_ptrs, mask=x_mask, other=0.0)
                w = tl.load(w_ptrs)
            else:
                k_mask = (offs_k < K - k * BLOCK_K)[None, None, :]
                a = tl.load(x_ptrs, mask=x_mask & k_mask, other=0.0)
                w = tl.load(w_ptrs, mask=k_mask, other=0.0)
            acc += tl.sum(a.to(tl.float32) * w.to(tl.float32), axis=2)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        return acc

    @triton.jit
    def _dot_rows(x_rows, w_rows, m_mask, offs_k, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        x_ptrs = x_rows[:, None] + offs_k[None, :]
        w_ptrs = w_rows[:, None] + offs_k[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
                w = tl.load(w_ptrs)
            else:
                k_mask = offs_k < K - k * BLOCK_K
                a = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0)
            acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        return acc
