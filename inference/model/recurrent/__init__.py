"""Recurrent token mixers of hybrid decoders: Gated DeltaNet and Mamba2, with their short
causal conv, their recurrences (recurrent and chunked forms side by side, plain torch) and
the per-step metadata. States live outside the layers, in slots of a ``StatePool``."""

from inference.model.recurrent.backend import AUTO, CHUNKED, MODES, RECURRENT
from inference.model.recurrent.gated_deltanet import GatedDeltaNet
from inference.model.recurrent.mamba2 import Mamba2Mixer
from inference.model.recurrent.metadata import RecurrentMetadata

__all__ = ["AUTO", "CHUNKED", "MODES", "RECURRENT", "GatedDeltaNet", "Mamba2Mixer", "RecurrentMetadata"]
