"""Recurrent state pool: one fixed slot per running request for every recurrent layer's states.

Recurrent layers (Gated DeltaNet, Mamba2) keep a fixed-size state per request instead of
per-token KV. The pool preallocates, per kind of state, one tensor holding every layer of
that kind: ``[num_layers_of_kind, num_slots + 1, *state_shape]``; layer i reads
``tensors[kind][j]`` (j its position among the kind's layers), a contiguous
``[num_slots + 1, ...]`` view that the layers index through a static int tensor of slot ids.
Slot ``num_slots`` is the dummy slot that padding rows of a captured decode batch point at;
it is never handed out. Slot ids are small ints owned by the host; tensors never move, so
decode CUDA graphs stay valid across allocations.

Kinds (and their per-slot shapes) come from the model config (``state_specs``):

- ``gated_deltanet.conv`` [conv_dim, K - 1], model dtype; ``gated_deltanet.recurrent``
  [num_v_heads, head_k_dim, head_v_dim], ``config.recurrent_state_dtype``;
- ``mamba2.conv`` [conv_dim, K - 1], model dtype; ``mamba2.ssm`` [num_heads, head_dim,
  state_size], ``config.recurrent_state_dtype``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from inference.config import DTYPES, ModelConfig
from inference.errors import NoFreeStateSlotsError
from inference.recurrent_config import GATED_DELTANET, MAMBA2

__all__ = ["NoFreeStateSlotsError", "StatePool", "StateSpec", "state_bytes_per_sequence", "state_specs"]


@dataclass(frozen=True)
class StateSpec:
    """One kind of per-request state: the global indices of the layers that have it, the
    shape of one slot of one layer, and its dtype."""

    name: str
    layers: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def bytes_per_slot(self) -> int:
        """Bytes of one request's state of this kind, over all its layers."""
        return len(self.layers) * math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def state_specs(config: ModelConfig, model_dtype: torch.dtype) -> list[StateSpec]:
    """The state kinds of ``config``'s recurrent layers (empty for a pure-attention model)."""
    state_dtype = getattr(torch, DTYPES[config.recurrent_state_dtype])
    specs = []
    for kind, sub, second in ((GATED_DELTANET, config.gated_deltanet, "recurrent"), (MAMBA2, config.mamba2, "ssm")):
        layers = tuple(i for i, t in enumerate(config.layer_types) if t == kind)
        if not layers:
            continue
        specs.append(StateSpec(f"{kind}.conv", layers, sub.conv_state_shape, model_dtype))
        specs.append(StateSpec(f"{kind}.{second}", layers, sub.recurrent_state_shape, state_dtype))
    return specs


def state_bytes_per_sequence(config: ModelConfig, model_dtype: torch.dtype) -> int:
    """Bytes of one request's recurrent state over all layers: one pool slot, and one
    prefix-cache checkpoint."""
    return sum(spec.bytes_per_slot for spec in state_specs(config, model_dtype))


class StatePool:
    """Fixed state slots for running requests.

    Invariant: ``num_free + num_used == num_slots``; every used slot is held by exactly one
    owner and every owner holds at most one slot; slot ids run ``0 .. num_slots - 1`` and
    ``dummy_slot == num_slots`` is never handed out. ``allocate`` zeroes the slot on the
    device (enqueued after any earlier work writing it, so a slot freed by a request whose
    last step is still in flight must only be freed once that step completed).
    """

    def __init__(self, specs: list[StateSpec], num_slots: int, device: torch.device | str = "cpu") -> None:
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots must be an int >= 1, got {num_slots!r}")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"state spec names must be unique, got {names}")
        self.specs = {s.name: s for s in specs}
        self.num_slots = num_slots
        self.dummy_slot = num_slots
        self.device = torch.device(device)
        self.tensors = {s.name: torch.zeros(len(s.layers), num_slots + 1, *s.shape, dtype=s.dtype, device=device)
                        for s in specs}
        self._layer_views: dict[int, list[torch.Tensor]] = {}
        for s in specs:
            for j, layer in enumerate(s.layers):
                self._layer_views.setdefault(layer, []).append(self.tensors[s.name][j])
        self._free: deque[int] = deque(range(num_slots))
        self._slot_of: dict[Hashable, int] = {}
        self._owner_of: dict[int, Hashable] = {}

    @classmethod
    def for_model(cls, config: ModelConfig, num_slots: int, model_dtype: torch.dtype,
                  device: torch.device | str = "cpu") -> "StatePool":
        return cls(state_specs(config, model_dtype), num_slots, device)

    # ----------------------------------------------------------------- views

    def layer_states(self, layer_index: int) -> tuple[torch.Tensor, ...]:
        """The slot tensors of one recurrent layer, in spec order: (conv, recurrent/ssm)."""
        if layer_index not in self._layer_views:
            raise KeyError(f"layer {layer_index} has no recurrent state; recurrent layers: {sorted(self._layer_views)}")
        return tuple(self._layer_views[layer_index])

    @property
    def bytes_per_slot(self) -> int:
        return sum(s.bytes_per_slot for s in self.specs.values())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    # ----------------------------------------------------------------- slots

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._owner_of)

    def slot_of(self, owner: Hashable) -> int | None:
        return self._slot_of.get(owner)

    def owner_of(self, slot: int) -> Hashable | None:
        return self._owner_of.get(slot)

    def allocate(self, owner: Hashable) -> int:
        """A zeroed slot for ``owner`` (which must not hold one yet)."""
        if owner in self._slot_of:
            raise ValueError(f"{owner!r} already holds state slot {self._slot_of[owner]}")
        if not self._free:
            raise NoFreeStateSlotsError(f"all {self.num_slots} state slots are in use")
        slot = self._free.popleft()
        self._slot_of[owner] = slot
        self._owner_of[slot] = owner
        self.zero(slot)
        return slot

    def free(self, owner: Hashable) -> int:
        """Give back ``owner``'s slot (its content is left as is: the next owner's
        ``allocate`` zeroes it); returns the slot id."""
        if owner not in self._slot_of:
            raise ValueError(f"{owner!r} holds no state slot")
        slot = self._slot_of.pop(owner)
        del self._owner_of[slot]
        self._free.append(slot)
        return slot

    def zero(self, slot: int) -> None:
        """Zero one slot of every state kind (one small fill per kind, on the device)."""
        self._check_slot(slot, allow_dummy=True)
        for t in self.tensors.values():
            t[:, slot].zero_()

    def copy_slot_to(self, slot: int, dest: dict[str, torch.Tensor], index: int) -> None:
        """``dest[kind][:, index] = tensors[kind][:, slot]`` for every kind (checkpoints)."""
        self._check_slot(slot)
        for name, t in self.tensors.items():
            dest[name][:, index].copy_(t[:, slot])

    def copy_slot_from(self, slot: int, src: dict[str, torch.Tensor], index: int) -> None:
        """``tensors[kind][:, slot] = src[kind][:, index]`` for every kind (restores)."""
        self._check_slot(slot)
        for name, t in self.tensors.items():
            t[:, slot].copy_(src[name][:, index])

    def check_invariants(self) -> None:
        def expect(condition: bool, message: str) -> None:
            if not condition:
                raise AssertionError(f"StatePool invariant broken: {message}")

        expect(self.num_free + self.num_used == self.num_slots,
               f"free {self.num_free} + used {self.num_used} != {self.num_slots}")
        expect(len(set(self._free)) == len(self._free), "a slot is free twice")
        expect(not set(self._free) & set(self._owner_of), "a slot is both free and used")
        expect(all(0 <= s < self.num_slots for s in list(self._free) + list(self._owner_of)),
               "a slot id is out of range (or the dummy slot was handed out)")
        expect(all(self._slot_of[o] == s for s, o in self._owner_of.items())
               and len(self._slot_of) == len(self._owner_of), "owner and slot maps disagree")

    def _check_slot(self, slot: int, allow_dummy: bool = False) -> None:
        top = self.num_slots + (1 if allow_dummy else 0)
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < top:
            raise ValueError(f"state slot must be an int in [0, {top}), got {slot!r}")
