"""Memory of recurrent state for the hybrid presets: per pool slot / checkpoint, against KV.

For each hybrid preset: bytes of one request's recurrent state (one state-pool slot, and one
prefix-cache checkpoint), with fp32 and bf16 recurrent states; bf16 KV bytes of one block;
how many KV blocks one checkpoint weighs (``blocks_per_checkpoint``: checkpointing every N
blocks costs as much memory as the KV it covers once N reaches it); the state pool at a
given batch; and the state bytes a decode step streams per request (read + write).
CPU only, no weights are built. Prints a table; ``--json PATH`` also writes the rows.

    python -m tools.recurrent_state_bytes [--block-size 16] [--batch 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

from inference.config import ModelConfig
from inference.cache.kv_cache import KVCache
from inference.presets import PRESETS
from inference.cache.state_pool import state_bytes_per_sequence

MIB = 1 << 20


def state_rows(configs: list[ModelConfig], block_size: int, batch: int) -> list[dict]:
    rows = []
    for config in configs:
        fp32 = state_bytes_per_sequence(dataclasses.replace(config, recurrent_state_dtype="float32"), torch.bfloat16)
        bf16 = state_bytes_per_sequence(dataclasses.replace(config, recurrent_state_dtype="bfloat16"), torch.bfloat16)
        kv_block = KVCache.bytes_per_block(config, block_size, torch.bfloat16)
        rows.append({
            "model": config.name,
            "recurrent_layers": len(config.recurrent_layer_indices),
            "attention_layers": len(config.attention_layer_indices),
            "checkpoint_bytes_fp32_state": fp32,
            "checkpoint_bytes_bf16_state": bf16,
            "kv_bytes_per_block_bf16": kv_block,
            "block_size": block_size,
            "blocks_per_checkpoint": fp32 / kv_block,
            "tokens_per_checkpoint": fp32 / kv_block * block_size,
            "state_pool_bytes_at_batch": fp32 * batch,
            "batch": batch,
            "decode_state_traffic_bytes_per_request": 2 * fp32,
        })
    return rows


def format_table(rows: list[dict]) -> str:
    header = (f"{'model':32} {'rec/attn':>8} {'ckpt fp32':>10} {'ckpt bf16':>10} {'KV/block':>9} "
              f"{'blocks/ckpt':>11} {'tokens/ckpt':>11} {'pool@batch':>11}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['model']:32} {r['recurrent_layers']:>3}/{r['attention_layers']:<4} "
            f"{r['checkpoint_bytes_fp32_state'] / MIB:>8.1f}Mi {r['checkpoint_bytes_bf16_state'] / MIB:>8.1f}Mi "
            f"{r['kv_bytes_per_block_bf16'] / 1024:>7.0f}Ki {r['blocks_per_checkpoint']:>11.0f} "
            f"{r['tokens_per_checkpoint']:>11.0f} {r['state_pool_bytes_at_batch'] / MIB:>9.0f}Mi")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--batch", type=int, default=64, help="requests for the state-pool size column")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.block_size < 1 or args.batch < 1:
        p.error("--block-size and --batch must be >= 1")
    configs = [c for c in PRESETS.values() if c.is_hybrid]
    rows = state_rows(configs, args.block_size, args.batch)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
