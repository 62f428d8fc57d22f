"""Local Hugging Face MoE checkpoints: config mapping and weight names per family
(``registry.FAMILIES``, one module per family), and the safetensors loader.

Supported ``model_type`` values: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3 (and
kimi_k2), glm4_moe, gpt_oss, minimax_m2, and the hybrids qwen3_next, qwen3_5_moe (+ qwen3_5_moe_text)
and nemotron_h (model and reference paths; not served by the engine yet).
"""

from inference.hf.common import HFCheckpointError, HFFamily, TensorRecipe
from inference.hf.loader import load_hf_config, load_hf_model, load_tokenizer, read_hf_config
from inference.hf.registry import FAMILIES, SUPPORTED_MODEL_TYPES, parse_hf_config

__all__ = ["FAMILIES", "HFCheckpointError", "HFFamily", "SUPPORTED_MODEL_TYPES", "TensorRecipe", "load_hf_config",
           "load_hf_model", "load_tokenizer", "parse_hf_config", "read_hf_config"]
