"""The MoE GPT decoder."""

from inference.model.context import AttentionMetadata, ForwardContext
from inference.model.gpt import MoEGPT

__all__ = ["AttentionMetadata", "ForwardContext", "MoEGPT"]
