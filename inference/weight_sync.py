"""Trainer weights -> ``(name, tensor)`` pairs in our parameter names, for
``LLMEngine.update_weights``.

- ``named_tensors_from_megatron(gpt, config)``: the exact inverse of
  ``inference.megatron_export`` (``megatron_state``): megatron-core ``GPTModel`` (local spec,
  one rank holding every parameter) -> ours, un-grouping the fused QKV rows and stacking the
  ``SequentialMLP`` experts into ``w13`` / ``w2``.
- ``named_tensors_from_hf(tensors, hf_config)``: a transformers state dict (or a stream of
  ``(name, tensor)``) -> ours, through the HF loader's name mapping (``inference.hf.registry``
  recipes, assembled as ``inference.hf.loader`` assembles them; next-token-prediction layers
  are skipped, as the loader skips them).

Names are those of ``MoEGPT.named_parameters()`` plus the routers' ``expert_bias`` buffers.
Tensors keep the trainer's dtype and device (the engine casts when it copies); tensors that
map one to one are the trainer's own (detached), the others are new (stacked or permuted).
Everything wrong is reported before the first pair is yielded, except for a stream of HF
tensors, which is checked as it arrives and at its end.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from inference.config import ModelConfig
from inference.hf.common import IGNORED_SUFFIXES, HFCheckpointError, TensorRecipe
from inference.hf.loader import _assemble
from inference.hf.registry import model_recipes, mtp_tensors, parse_hf_config
from inference.megatron_export import megatron_weight_plan, our_weights
from inference.model import MoEGPT

NamedTensors = Iterator[tuple[str, torch.Tensor]]


# ---- megatron-core -------------------------------------------------------------------------
def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside megatron's wrappers (Float16Module, DDP: each holds ``.module``)."""
    while not hasattr(model, "decoder") and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    if not hasattr(model, "decoder") or not hasattr(model, "embedding"):
        raise TypeError(f"expected a megatron-core GPTModel (or a wrapper of one), got {type(model).__name__}")
    return model


def _ungrouped_qkv(qkv: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Megatron's per-group [q_g; k_g; v_g] rows -> our [q; k; v] (weight or bias)."""
    d, g = config.head_dim, config.num_kv_heads
    per_group = config.num_heads // g
    grouped = qkv.reshape(g, (per_group + 2) * d, *qkv.shape[1:])
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    rest = qkv.shape[1:]
    return torch.cat([q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)])


def _plan_and_shapes(config: ModelConfig):
    """The export's weight plan and our tensor shapes, from a meta-device model."""
    with torch.device("meta"):
        model = MoEGPT(config)
    return megatron_weight_plan(model), {n: tuple(t.shape) for n, t in our_weights(model).items()}


def named_tensors_from_megatron(gpt_model: torch.nn.Module, config: ModelConfig) -> NamedTensors:
    """Every parameter of ``MoEGPT(config)`` (and router expert biases) from a megatron-core
    GPTModel built by ``inference.megatron_export`` (or with the same local spec and names),
    one layer's tensors at a time. Raises ValueError naming every megatron parameter left
    unused, missing, or of the wrong shape (e.g. a tensor-parallel shard) before yielding."""
    gpt = _unwrap(gpt_model)
    source = dict(gpt.named_parameters())
    source.update((n, b) for n, b in gpt.named_buffers() if n.endswith("expert_bias"))
    plan, shapes = _plan_and_shapes(config)
    used = {name for _, names, _ in plan for name in names}
    problems = [f"no megatron parameter {n}" for n in sorted(used - source.keys())]
    problems += [f"megatron parameter {n} has no place in our model" for n in sorted(source.keys() - used)]
    if not problems:
        for target, names, how in plan:
            got = tuple(source[names[0]].shape)
            want = shapes[target][1:] if how == "stack" else shapes[target]
            if got != want:
                problems.append(f"{names[0]}: megatron {list(got)}, ours needs {list(want)} (for {target})")
    if problems:
        raise ValueError("megatron weights do not map onto our model:\n  " + "\n  ".join(problems))
    return _megatron_pairs(plan, source, config)


def _megatron_pairs(plan, source: dict[str, torch.Tensor], config: ModelConfig) -> NamedTensors:
    with torch.no_grad():
        for target, names, how in plan:
            tensors = [source[n].detach() for n in names]
            if how == "stack":
                yield target, torch.stack(tensors)
            elif how == "qkv":
                yield target, _ungrouped_qkv(tensors[0], config)
            else:
                yield target, tensors[0]


# ---- Hugging Face ------------------------------------------------------------------------
def _raw_config(hf_config: Any) -> dict[str, Any]:
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if callable(getattr(hf_config, "to_dict", None)):      # a transformers PretrainedConfig
        return hf_config.to_dict()
    raise TypeError(f"hf_config must be a config.json dict or a transformers config, got {type(hf_config).__name__}")


class _HFStream:
    """Matches arriving checkpoint tensors to the loader's recipes. Invariant: ``pending``
    holds exactly the arrived tensors that some recipe still needs; ``by_source`` maps every
    source name of the current recipes to its shape and the recipes using it (Qwen's
    ``q_proj`` feeds both ``qkv_proj`` and ``output_gate_proj``). The recipes depend on the
    names a layer holds (classic or fused experts, the MoE block's module name), so a name
    that no current recipe uses makes them be recomputed from every name known so far."""

    def __init__(self, raw: dict[str, Any], names: Iterable[str] = ()) -> None:
        self.raw = raw
        self.config, self.arch = parse_hf_config(raw, "hf_config")
        self.names: set[str] = set(names)
        self.arrived: set[str] = set()
        self.pending: dict[str, torch.Tensor] = {}
        self.emitted: set[str] = set()
        self._plan()

    def _plan(self) -> None:
        self.recipes = model_recipes(self.config, self.arch, self.names, self.raw)
        self.by_source: dict[str, tuple[tuple[int, ...], list[TensorRecipe]]] = {}
        for r in self.recipes:
            for name, shape in r.sources:
                self.by_source.setdefault(name, (shape, []))[1].append(r)

    def ignored(self, name: str) -> bool:
        # a tied head may be saved or not; it is the embedding either way; MTP layers and a
        # vision tower are not served
        return (name.endswith(IGNORED_SUFFIXES) or bool(mtp_tensors(self.config, self.arch, {name}, self.raw))
                or (name == "lm_head.weight" and self.config.tie_word_embeddings) or bool(self.arch.skipped({name})))

    def check_mapping(self, tensors: Mapping[str, torch.Tensor]) -> list[str]:
        """Every problem of a whole state dict, from names and shapes only."""
        names = {n for n in tensors if not self.ignored(n)}
        problems = [f"missing tensor {n} (expected shape {list(self.by_source[n][0])})"
                    for n in sorted(self.by_source.keys() - names)]
        problems += [f"unexpected tensor {n} (the model has no place for it)"
                     for n in sorted(names - self.by_source.keys())]
        problems += [f"tensor {n} has shape {list(tensors[n].shape)}, expected {list(self.by_source[n][0])}"
                     for n in sorted(names & self.by_source.keys()) if tuple(tensors[n].shape) != self.by_source[n][0]]
        return problems

    def add(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Take one tensor; returns the (our name, tensor) pairs it completes. A name no
        recipe uses yet waits in ``pending``: a later name may change the layer's layout
        (a fused ``experts.down_proj`` only fits once ``experts.gate_up_proj`` is known)."""
        if self.ignored(name):
            return []
        if name in self.arrived:
            raise HFCheckpointError("hf tensors", [f"tensor {name} arrived twice"])
        self.arrived.add(name)
        self.pending[name] = tensor
        candidates = [name]
        if name not in self.by_source:
            self.names.add(name)
            self._plan()
            candidates = list(self.pending)
        return [pair for n in candidates if n in self.pending for pair in self._complete(n)]

    def _complete(self, name: str) -> list[tuple[str, torch.Tensor]]:
        if name not in self.by_source:
            return []
        shape, recipes = self.by_source[name]
        tensor = self.pending[name]
        if tuple(tensor.shape) != shape:
            raise HFCheckpointError("hf tensors",
                                    [f"tensor {name} has shape {list(tensor.shape)}, expected {list(shape)}"])
        done = []
        for recipe in recipes:
            if recipe.target in self.emitted or any(n not in self.pending for n, _ in recipe.sources):
                continue
            with torch.no_grad():
                done.append((recipe.target, _assemble(recipe, lambda n: self.pending[n].detach())))
            self.emitted.add(recipe.target)
            for n, _ in recipe.sources:     # a source is dropped once every recipe using it is done
                if all(r.target in self.emitted for r in self.by_source[n][1]):
                    del self.pending[n]
        return done

    def leftovers(self) -> list[str]:
        """What a finished stream left unmatched."""
        problems = [f"missing tensor {n} (expected shape {list(shape)})" for r in self.recipes
                    if r.target not in self.emitted for n, shape in r.sources if n not in self.pending]
        return problems + [f"unexpected tensor {n}" for n in sorted(self.pending) if n not in self.by_source]


def named_tensors_from_hf(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                          hf_config: Any) -> NamedTensors:
    """Our parameters from Hugging Face tensors: a state dict (``model.state_dict()``, or
    safetensors files read back; classic per-expert or transformers-5 fused experts) or an
    iterable of ``(name, tensor)`` in any order. ``hf_config`` is the config.json dict or
    the transformers config. A mapping is checked whole before anything is yielded
    (HFCheckpointError listing every missing, unexpected or misshapen tensor); a stream is
    checked as it arrives (shapes, repeats) and at its end (missing or unplaced tensors), so a
    bad stream fails part way through its pairs."""
    raw = _raw_config(hf_config)
    if isinstance(tensors, Mapping):
        stream = _HFStream(raw, tensors.keys())
        problems = stream.check_mapping(tensors)
        if problems:
            raise HFCheckpointError("hf tensors", problems)
        return _hf_pairs(stream, tensors.items())
    return _hf_pairs(_HFStream(raw), tensors)


def _hf_pairs(stream: _HFStream, items: Iterable[tuple[str, torch.Tensor]]) -> NamedTensors:
    for name, tensor in items:
        yield from stream.add(name, tensor)
    problems = stream.leftovers()
    if problems:
        raise HFCheckpointError("hf tensors (stream ended)", problems)
