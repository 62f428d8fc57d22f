"""Per-rank weight loading: each rank reads only its shards, from full tensors in memory or
straight from safetensors files (``safe_open(...).get_slice``), so no rank ever holds the
full model.

A module built from ``inference.parallel`` layers says which part of each full tensor a
parameter holds (``tensor_shards()``; parameters of other modules are replicated). Sources
are addressed by the module's own parameter names (the unsharded ``MoEGPT``'s names); a
checkpoint with other names or a split layout (Hugging Face ``q_proj``/``k_proj``/``v_proj``,
one tensor per expert) maps onto them with ``TensorRecipe``s (``inference.hf.common``):
``recipe_source`` turns a recipe into one virtual tensor whose boxes read only the pieces
of the source tensors they cover. Only safetensors are read, never pickle.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Protocol, Sequence

import torch
from torch import nn

from inference.parallel.shards import Box, TensorShard, module_shards


class TensorSource(Protocol):
    """A full tensor that can be read box by box."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def read(self, box: Box) -> torch.Tensor: ...


class ShardLoadError(ValueError):
    """Sources that do not fit the module: every missing tensor and wrong shape at once."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("cannot load this rank's shards:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class InMemoryTensor:
    """A full tensor already in memory (tests, weights handed over by a trainer)."""

    tensor: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    def read(self, box: Box) -> torch.Tensor:
        return self.tensor[box]


@dataclass(frozen=True)
class ConcatSource:
    """``torch.cat(parts, dim=0)`` without materialising it: a box reads from the parts it
    overlaps. Invariant: the parts agree on every dimension but the first."""

    parts: tuple[TensorSource, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return (sum(p.shape[0] for p in self.parts), *self.parts[0].shape[1:])

    def read(self, box: Box) -> torch.Tensor:
        pieces, offset = [], 0
        for part in self.parts:
            n = part.shape[0]
            a, b = max(box[0].start, offset), min(box[0].stop, offset + n)
            if b > a:
                pieces.append(part.read((slice(a - offset, b - offset), *box[1:])))
            offset += n
        return torch.cat(pieces, dim=0)


@dataclass(frozen=True)
class StackSource:
    """``torch.stack(parts)`` without materialising it (one part per expert)."""

    parts: tuple[TensorSource, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.parts), *self.parts[0].shape)

    def read(self, box: Box) -> torch.Tensor:
        return torch.stack([self.parts[i].read(box[1:]) for i in range(box[0].start, box[0].stop)])


class TransformedSource:
    """A recipe's combined tensor after its ``transform`` (a permutation or transpose: GPT-OSS's
    interleaved gate/up columns, DeepSeek's interleaved rotary rows). A box of the result may
    come from anywhere in the source, so this one tensor is read whole, transformed and
    sliced, and dropped by ``release()`` once the loader has its shard. Invariant: the
    source is read at most once between releases."""

    def __init__(self, inner: TensorSource, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.inner, self.transform = inner, transform
        self._full: torch.Tensor | None = None
        self._shape: tuple[int, ...] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        if self._shape is None:
            try:          # a view or a permutation: its shape follows from the source's alone
                self._shape = tuple(self.transform(torch.empty(self.inner.shape, device="meta")).shape)
            except (RuntimeError, NotImplementedError, IndexError):
                self._shape = tuple(self._materialise().shape)
        return self._shape

    def _materialise(self) -> torch.Tensor:
        if self._full is None:
            self._full = self.transform(self.inner.read(tuple(slice(0, n) for n in self.inner.shape)))
        return self._full

    def read(self, box: Box) -> torch.Tensor:
        return self._materialise()[box]

    def release(self) -> None:
        self._full = None


def recipe_source(recipe, open_source: Callable[[str], TensorSource]) -> TensorSource:
    """The virtual full tensor of one ``TensorRecipe`` (``target``, ``sources``, ``combine``,
    optional ``transform``)."""
    parts = [open_source(name) for name, _ in recipe.sources]
    if recipe.combine == "cat":
        source = parts[0] if len(parts) == 1 else ConcatSource(tuple(parts))
    elif recipe.combine == "stack":
        source = StackSource(tuple(parts))
    elif recipe.combine == "stack_pairs":
        source = StackSource(tuple(ConcatSource((parts[j], parts[j + 1])) for j in range(0, len(parts), 2)))
    else:
        raise ValueError(f"{recipe.target}: combine mode {recipe.combine!r} cannot be read shard by shard")
    transform = getattr(recipe, "transform", None)
    return source if transform is None else TransformedSource(source, transform)


@dataclass
class _SliceSource:
    checkpoint: "SafetensorsCheckpoint"
    name: str

    @property
    def shape(self) -> tuple[int, ...]:
        return self.checkpoint.shape(self.name)

    def read(self, box: Box) -> torch.Tensor:
        return self.checkpoint.read(self.name, box)


class SafetensorsCheckpoint:
    """Open safetensors files, read box by box. Invariant: ``elements_read`` counts every
    element read since opening (what this rank pulled from disk)."""

    def __init__(self, files: Mapping[str, os.PathLike | str]) -> None:
        self.files = {name: Path(f) for name, f in files.items()}
        self.elements_read = 0
        self._stack = ExitStack()
        self._handles: dict[Path, object] = {}

    @classmethod
    def from_directory(cls, checkpoint_dir: os.PathLike | str) -> "SafetensorsCheckpoint":
        """Every tensor of a checkpoint directory (one file or an index of shards)."""
        from inference.hf.loader import tensor_files
        return cls(tensor_files(checkpoint_dir))

    def __enter__(self) -> "SafetensorsCheckpoint":
        from safetensors import safe_open
        for f in sorted(set(self.files.values())):
            self._handles[f] = self._stack.enter_context(safe_open(str(f), framework="pt"))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._handles.clear()

    def _slice(self, name: str):
        if not self._handles:
            raise RuntimeError("SafetensorsCheckpoint is read inside a `with` block")
        return self._handles[self.files[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, box: Box) -> torch.Tensor:
        t = self._slice(name)[box]
        self.elements_read += t.numel()
        return t

    def source(self, name: str) -> TensorSource | None:
        return _SliceSource(self, name) if name in self.files else None

    def recipe_sources(self, recipes: Sequence) -> dict[str, TensorSource]:
        """Sources under the recipes' target names; a recipe naming an absent tensor is left
        out, so loading reports it as missing."""
        return {r.target: recipe_source(r, self.source) for r in recipes
                if all(name in self.files for name, _ in r.sources)}


def shard_targets(module: nn.Module) -> Iterator[tuple[str, torch.Tensor, TensorShard, bool]]:
    """``(name, local tensor, shard, required)`` for every parameter (required) and buffer
    (loaded when a source has it), each shared tensor once (a tied head)."""
    seen: set[int] = set()
    for mod_name, mod in module.named_modules():
        shards = module_shards(mod)
        owned = [(n, t, True) for n, t in mod.named_parameters(recurse=False)]
        owned += [(n, t, False) for n, t in mod.named_buffers(recurse=False)]
        for name, tensor, required in owned:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            full = f"{mod_name}.{name}" if mod_name else name
            yield full, tensor, shards.get(name) or TensorShard.replicated(tensor.shape), required


@torch.no_grad()
def load_shards(module: nn.Module, sources: Mapping[str, TensorSource]) -> int:
    """Fill every parameter (and every buffer a source names) with this rank's shard of its
    source; returns the elements copied. All problems are checked before anything is read."""
    plan, problems = [], []
    for name, tensor, shard, required in shard_targets(module):
        src = sources.get(name)
        if src is None:
            if required:
                problems.append(f"missing tensor {name} (full shape {list(shard.full_shape)})")
            continue
        if tuple(src.shape) != shard.full_shape:
            problems.append(f"tensor {name} has shape {list(src.shape)}, expected {list(shard.full_shape)}")
        elif shard.local_shape != tuple(tensor.shape):
            problems.append(f"{name}: local tensor {list(tensor.shape)} is not its shard {list(shard.local_shape)}")
        else:
            plan.append((tensor, shard, src))
    if problems:
        raise ShardLoadError(problems)
    for tensor, shard, src in plan:
        tensor.copy_(shard.read(src.read, dtype=tensor.dtype, device=tensor.device))
        if hasattr(src, "release"):
            src.release()
    return sum(t.numel() for t, _, _ in plan)


def load_full(module: nn.Module, state: Mapping[str, torch.Tensor]) -> int:
    """This rank's shards of full tensors in memory (e.g. an unsharded model's state_dict)."""
    return load_shards(module, {name: InMemoryTensor(t) for name, t in state.items()})
