"""Text tables of a ``tools/bench_decode.py`` report: decode steps vs the floor per batch
(with a column per comparison run), component breakdowns with their top kernels, engine-step
timelines, prefill and the HF comparison."""

from __future__ import annotations

import itertools

from tools.decode_timeline import format_timeline

TOP_KERNELS_SHOWN = 10       # of the breakdown's "top_kernels" (the JSON keeps 30)


def format_host_stages(batch, host: dict) -> str:
    """One line: a decode step's median host ms per stage, and the GPU's idle time before it."""
    parts = [f"{name} {host[f'stage_{name}_ms']:.3f}" for name in ("schedule", "prepare", "launch", "complete")
             if f"stage_{name}_ms" in host]
    extra = [f"{label} {host[key]:.3f}" for label, key in (("of which wait", "stage_complete_wait_ms"),
                                                          ("sample", "stage_launch_sample_ms"),
                                                          ("GPU idle before", "gpu_idle_before_ms"),
                                                          ("GPU step", "gpu_step_ms")) if key in host]
    return f"host ms at batch {batch}: " + ", ".join(parts) + (f" ({', '.join(extra)})" if extra else "")


def fmt(value, spec: str) -> str:
    width = "".join(itertools.takewhile(str.isdigit, spec))
    return "-".rjust(int(width or 0)) if value is None else format(value, spec)


def comparisons(r: dict) -> dict[str, dict]:
    """Column title -> comparison run: other MoE backends, other fused small-op modes."""
    out = {f"x floor {b}": c for b, c in r.get("compare", {}).items()}
    out.update({f"x small-ops {m}": c for m, c in r.get("compare_small_ops", {}).items()})
    return out


def format_breakdown(batch: str, bd: dict, tag: str = "") -> list[str]:
    if "error" in bd:
        return [f"breakdown at batch {batch}{tag} failed: {bd['error']}"]
    lines = [f"breakdown at batch {batch}{tag} (graph replay {bd['graph_replay_ms']:.2f} ms, eager "
             f"{bd['eager_ms']:.2f} ms, kernels {bd['kernel_ms']:.2f} ms)"]
    for row in bd["rows"]:
        lines.append(f"  {row['component']:<30} {row['ms']:>8.3f} ms  floor {row['floor_ms']:>7.3f} ms  "
                     f"x{fmt(row['ratio'], '.2f')}")
    for k in bd.get("top_kernels", [])[:TOP_KERNELS_SHOWN]:
        lines.append(f"    {k['ms_per_step']:>7.3f} ms {k['calls_per_step']:>6.0f}x  {k['kernel'][:60]:<60} "
                     f"[{k['component']}]")
    return lines


def format_tables(r: dict) -> str:
    cmp = comparisons(r)
    small_moe = r.get("fused_moe_small_batch_max_tokens")
    small_moe = "" if small_moe is None else f", small-batch MoE <= {small_moe} tokens"
    if r.get("skinny_linear_max_tokens"):
        small_moe += f", skinny attention projections <= {r['skinny_linear_max_tokens']} tokens"
    lines = [f"\n{r['model']} on {r['device']} ({r['dtype']}, moe {r['moe_backend']}, small ops "
             f"{r.get('fused_small_ops', 'auto')}{small_moe}): copy {r['copy_bandwidth_gb_s']:,.0f}"
             f" GB/s, bf16 matmul {r['matmul_tflops']:.0f} TFLOP/s, context {r['prompt_len']}+{r['output_len']}",
             f"{'batch':>6} {'step ms':>9} {'graph ms':>9} {'floor ms':>9} {'x floor':>8} {'GPU x floor':>11} "
             f"{'tok/s':>10} {'moe path':>12}" + "".join(f" {title:>18}" for title in cmp)]
    for batch, b in r["batches"].items():
        lines.append(f"{batch:>6} {fmt(b.get('step_ms'), '9.2f')} {fmt(b.get('gpu_forward_ms'), '9.2f')} "
                     f"{fmt(b.get('floor_ms'), '9.2f')} {fmt(b.get('ratio_to_floor'), '8.2f')} "
                     f"{fmt(b.get('gpu_ratio_to_floor'), '11.2f')} {fmt(b.get('decode_tokens_per_s'), '10,.0f')} "
                     f"{b.get('moe_path', '-'):>12}"
                     + "".join(f" {fmt(c.get('ratio_to_floor', {}).get(batch), '18.2f')}" for c in cmp.values()))
    for batch, b in r["batches"].items():
        need = b.get("bytes_per_step", {})
        if need.get("state"):
            lines.append(f"floor bytes at batch {batch}: weights {need['weights'] / 2**30:.2f} GiB + KV "
                         f"{need['kv'] / 2**30:.2f} GiB + recurrent state read+written {need['state'] / 2**30:.2f} GiB")
    for batch, b in r["batches"].items():
        if b.get("host"):
            lines.append(format_host_stages(batch, b["host"]))
    for batch, b in r["batches"].items():
        if b.get("breakdown"):
            lines += format_breakdown(batch, b["breakdown"])
    for batch, b in r["batches"].items():
        if b.get("timeline"):
            lines += format_timeline(batch, b["timeline"])
    for mode, c in r.get("compare_small_ops", {}).items():
        for batch, b in c.get("batches", {}).items():
            if b.get("breakdown"):
                lines += format_breakdown(batch, b["breakdown"], f", small ops {mode}")
    pf = r.get("prefill")
    if pf and "error" not in pf:
        lines.append(f"prefill: {pf['tokens_per_s']:,.0f} tok/s on {pf['step_tokens']}-token steps; FLOP floor "
                     f"{pf['floor_tokens_per_s']:,.0f} tok/s; {pf['fraction_of_matmul_rate']:.0%} of the matmul rate")
        if "idle_serve_ms" in pf:
            gpu = f"GPU events {pf['gpu_step_ms']:.1f} ms, " if pf.get("gpu_step_ms") else ""
            lines.append(f"  step {pf['step_ms']:.1f} ms ({gpu}one step served from idle {pf['idle_serve_ms']:.1f} ms = "
                         f"{pf['idle_serve_fraction_of_matmul_rate']:.0%}); FLOP floor {pf['flop_floor_ms']:.1f} ms")
        lines += format_prefill_breakdown(pf.get("breakdown"))
    elif pf:
        lines.append(f"prefill failed: {pf['error']}")
    hf = r.get("hf")
    if hf and "error" not in hf:
        lines.append(f"HF generate batch {hf['batch']}: {hf['hf_generated_tokens_per_s']:,.0f} tok/s; engine "
                     f"{hf['engine_generated_tokens_per_s']:,.0f} tok/s ({hf['speedup_vs_hf']:.1f}x), greedy "
                     f"agreement {hf['greedy_token_agreement']:.3f}")
    elif hf:
        lines.append(f"HF comparison failed: {hf['error']}")
    if r["skipped"]:
        lines.append(f"skipped (time budget / not applicable): {', '.join(r['skipped'])}")
    return "\n".join(lines)




def format_prefill_breakdown(breakdown: dict | None) -> list[str]:
    """The prefill step's components (ms per 8k-token step, x their FLOP floor where one is defined)."""
    if not breakdown:
        return []
    if "error" in breakdown:
        return [f"prefill breakdown failed: {breakdown['error']}"]
    lines = [f"prefill breakdown per {breakdown['step_tokens']}-token step ({breakdown['prompt_tokens']} tokens profiled)"]
    for row in sorted(breakdown["rows"], key=lambda r: -r["ms"]):
        floor = "" if row["floor_ms"] is None else f"  FLOP floor {row['floor_ms']:8.3f} ms  x{row['ratio']:.2f}"
        lines.append(f"  {row['component']:<30} {row['ms']:8.3f} ms{floor}")
    tokens = breakdown["prompt_tokens"]
    if tokens and breakdown.get("kernels_by_name"):
        lines.append(f"  top kernels by name, ms per {breakdown['step_tokens']}-token step (whatever their label)")
        for name, entry in list(breakdown["kernels_by_name"].items())[:10]:
            ms = entry["ms_per_step"] * breakdown["step_tokens"] / tokens
            lines.append(f"    {name:<60} {ms:8.3f} ms  {entry['calls_per_step']:5.0f} calls")
    return lines
