"""Load a local Hugging Face MoE checkpoint (config.json + safetensors) into MoEGPT.

Only safetensors are read (never pickle). A checkpoint is one ``model.safetensors`` or
shards listed by ``model.safetensors.index.json`` (any ``*.safetensors`` set works too).
Everything wrong with a checkpoint (missing tensors, wrong shapes, tensors the model would
silently ignore) is reported in one ``HFCheckpointError``. The end-of-sequence ids are
config.json's and generation_config.json's ``eos_token_id`` lists together. Next-token-prediction (MTP)
layers are not served: their tensors are skipped, with a log line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from inference.config import ModelConfig
from inference.errors import require
from inference.hf.common import (IGNORED_SUFFIXES, HFCheckpointError, HFFamily, TensorRecipe, eos_fields,
                                 eos_token_ids)
from inference.hf.registry import model_recipes, mtp_tensors, parse_hf_config
from inference.model import MoEGPT
from inference.model.gpt import allocate_model

if TYPE_CHECKING:
    from inference.parallel import ParallelGroups

__all__ = ["HFCheckpointError", "load_hf_config", "load_hf_model", "load_tokenizer", "read_hf_config"]

INDEX_FILE = "model.safetensors.index.json"
log = logging.getLogger(__name__)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise HFCheckpointError(str(path.parent), [f"no {path.name} (expected a local Hugging Face checkpoint)"])
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise HFCheckpointError(str(path), [f"not valid JSON: {exc}"]) from None
    if not isinstance(data, dict):
        raise HFCheckpointError(str(path), ["expected a JSON object"])
    return data


def read_raw_config(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    return _read_json(Path(checkpoint_dir) / "config.json")


def read_hf_config(checkpoint_dir: str | os.PathLike) -> tuple[ModelConfig, HFFamily]:
    path = Path(checkpoint_dir) / "config.json"
    config, family = parse_hf_config(_read_json(path), str(path))
    return with_generation_eos(config, checkpoint_dir), family


def with_generation_eos(config: ModelConfig, checkpoint_dir: str | os.PathLike) -> ModelConfig:
    """``config`` with the end-of-sequence ids of the checkpoint's generation_config.json
    added (transformers' ``generate`` and vLLM stop on those; chat checkpoints often list
    more there than config.json does, e.g. Qwen3's ``<|im_end|>`` and ``<|endoftext|>``).
    No file: ``config`` as it is."""
    path = Path(checkpoint_dir) / "generation_config.json"
    if not path.is_file():
        return config
    ids = list(dict.fromkeys([*config.eos_token_ids, *eos_token_ids(_read_json(path), config.vocab_size)]))
    return dataclasses.replace(config, **eos_fields(ids)) if ids else config


def load_hf_config(checkpoint_dir: str | os.PathLike) -> ModelConfig:
    """Our ModelConfig for the checkpoint's config.json (no weights are read)."""
    return read_hf_config(checkpoint_dir)[0]


def _safe_open(file: Path):
    """``safetensors.safe_open`` that reports a garbage or truncated file as HFCheckpointError."""
    safetensors = require("safetensors", "hf", "--hf-checkpoint (reading .safetensors files)")
    try:
        return safetensors.safe_open(str(file), framework="pt")
    except Exception as exc:  # SafetensorError derives from Exception only
        raise HFCheckpointError(str(file), [f"not a readable .safetensors file ({exc}); "
                                            "is it truncated or not a safetensors file?"]) from None


def tensor_files(checkpoint_dir: str | os.PathLike) -> dict[str, Path]:
    """Map tensor name -> safetensors file holding it."""
    root = Path(checkpoint_dir)
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        return {name: root / file for name, file in weight_map.items()}
    files = sorted(root.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.pt"))
        hint = f" (found {', '.join(pickled)}: pickle files are never loaded; convert them to safetensors)" if pickled else ""
        raise HFCheckpointError(str(root), [f"no *.safetensors files{hint}"])
    names: dict[str, Path] = {}
    for file in files:
        with _safe_open(file) as handle:
            names.update((name, file) for name in handle.keys())
    return names


def _check(recipes: list[TensorRecipe], files: dict[str, Path], config: ModelConfig, skipped: set[str]) -> list[str]:
    """Problems with the checkpoint's names and shapes, read from headers only."""
    problems: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(set(files.values())):
        if not file.is_file():
            problems.append(f"shard {file.name} listed in {INDEX_FILE} does not exist")
            continue
        with _safe_open(file) as handle:
            shapes.update((n, tuple(handle.get_slice(n).get_shape())) for n in handle.keys() if files.get(n) == file)
    used: set[str] = set(skipped)
    for recipe in recipes:
        for name, expected in recipe.sources:
            used.add(name)
            if name not in files:
                problems.append(f"missing tensor {name} (expected shape {list(expected)})")
            elif name in shapes and shapes[name] != expected:
                problems.append(f"tensor {name} has shape {list(shapes[name])}, expected {list(expected)}")
    if config.tie_word_embeddings:
        used.add("lm_head.weight")   # a tied head may be saved or not; it is the embedding either way
    for name in sorted(set(files) - used):
        if not name.endswith(IGNORED_SUFFIXES):
            problems.append(f"unexpected tensor {name} (the model has no place for it: an unsupported feature?)")
    return problems


def _assemble(recipe: TensorRecipe, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
    tensors = [read(name) for name, _ in recipe.sources]
    if recipe.combine == "stack":
        out = torch.stack(tensors)
    elif recipe.combine == "stack_pairs":
        out = torch.stack([torch.cat(tensors[j:j + 2]) for j in range(0, len(tensors), 2)])
    else:
        out = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
    return recipe.transform(out) if recipe.transform is not None else out


def _targets(model: MoEGPT, recipes: list[TensorRecipe]) -> dict[str, torch.Tensor]:
    """Parameters and expert-bias buffers by name; every one must have a recipe (a
    parameter left out would keep uninitialised memory)."""
    targets = dict(model.named_parameters())
    targets.update((n, b) for n, b in model.named_buffers() if n.endswith("expert_bias"))
    uncovered = sorted(set(targets) - {r.target for r in recipes})
    if uncovered:
        raise RuntimeError(f"internal error: no checkpoint recipe for {uncovered[:5]}")
    return targets


def check_hf_checkpoint(checkpoint_dir: str | os.PathLike) -> tuple[ModelConfig, dict[str, Path], list[TensorRecipe]]:
    """Read config.json and every safetensors header (no tensor data) and raise one
    HFCheckpointError listing every problem; returns what ``load_hf_model`` needs."""
    raw = read_raw_config(checkpoint_dir)
    config, family = parse_hf_config(raw, str(Path(checkpoint_dir) / "config.json"))
    config = with_generation_eos(config, checkpoint_dir)
    files = tensor_files(checkpoint_dir)
    recipes = model_recipes(config, family, set(files), raw)
    skipped = mtp_tensors(config, family, set(files), raw)
    unserved = family.skipped(set(files))
    problems = _check(recipes, files, config, set(skipped).union(*unserved.values()))
    if problems:
        raise HFCheckpointError(f"checkpoint {checkpoint_dir} does not match its config ({raw.get('model_type')})",
                                problems)
    if skipped:
        log.info("skipping %d tensors of %d next-token-prediction (MTP) layer(s): not served, never routed",
                 len(skipped), family.mtp_layers(raw))
    for what, names in unserved.items():
        log.info("skipping %d tensors of %s", len(names), what)
    return config, files, recipes


@torch.no_grad()
def load_hf_model(checkpoint_dir: str | os.PathLike, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, parallel: "ParallelGroups | None" = None) -> MoEGPT:
    """MoEGPT with the checkpoint's weights, on ``device`` in ``dtype`` (expert biases of
    the router stay fp32), in eval mode. With ``parallel``, this rank's shards, read as
    slices of the safetensors files (no rank reads or holds the full model)."""
    config, files, recipes = check_hf_checkpoint(checkpoint_dir)
    device = torch.device(device)
    if parallel is not None:
        return _load_shards(config, files, recipes, device, dtype, parallel)
    model = allocate_model(config, device, dtype)
    targets = _targets(model, recipes)
    with ExitStack() as stack:
        handles = {f: stack.enter_context(_safe_open(f)) for f in sorted(set(files.values()))}
        for recipe in recipes:
            tensor = _assemble(recipe, lambda name: handles[files[name]].get_tensor(name))
            target = targets[recipe.target]
            if tensor.shape != target.shape:
                raise RuntimeError(f"internal error: {recipe.target} assembled as {list(tensor.shape)}, "
                                   f"the model has {list(target.shape)}")
            target.copy_(tensor.to(device=device, dtype=target.dtype))
    return model.eval()


def _load_shards(config: ModelConfig, files: dict[str, Path], recipes: list[TensorRecipe], device: torch.device,
                 dtype: torch.dtype, parallel: "ParallelGroups") -> MoEGPT:
    from inference.parallel.loading import SafetensorsCheckpoint, load_shards
    model = allocate_model(config, device, dtype, parallel)
    _targets(model, recipes)     # every parameter has a recipe
    with SafetensorsCheckpoint(files) as checkpoint:
        load_shards(model, checkpoint.recipe_sources(recipes))
    return model.eval()


def load_tokenizer(checkpoint_dir: str | os.PathLike):
    """The checkpoint's own tokenizer (tokenizer.json and friends), read from the local
    directory only. Returns a transformers tokenizer: ``encode(text)`` / ``decode(ids)``."""
    transformers = require("transformers", "hf", "text prompts (the checkpoint's tokenizer)")
    root = Path(checkpoint_dir)
    if not any((root / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise HFCheckpointError(str(root), ["no tokenizer files (tokenizer.json / tokenizer_config.json)"])
    return transformers.AutoTokenizer.from_pretrained(str(root), local_files_only=True)
