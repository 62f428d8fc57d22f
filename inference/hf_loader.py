"""Compatibility entry point: the loader lives in ``inference.hf`` (one module per family)."""

from inference.hf.common import HFCheckpointError
from inference.hf.loader import check_hf_checkpoint, load_hf_config, load_hf_model, load_tokenizer, read_hf_config

__all__ = ["HFCheckpointError", "check_hf_checkpoint", "load_hf_config", "load_hf_model", "load_tokenizer",
           "read_hf_config"]
