"""transformers configs with the shapes of our model presets (for HF comparisons)."""

from __future__ import annotations

from inference.config import ModelConfig


def hf_config_for(config: ModelConfig):
    """An OLMoE or Qwen3-MoE transformers config matching ``config``'s shape; raises
    ValueError for shapes neither architecture expresses."""
    import transformers

    common = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                  num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                  num_key_value_heads=config.num_kv_heads, rope_theta=config.rope_theta,
                  max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
                  num_experts=config.num_experts, num_experts_per_tok=config.topk,
                  norm_topk_prob=config.router.norm_topk_prob, tie_word_embeddings=config.tie_word_embeddings)
    if config.router.score_function != "softmax" or config.shared_expert_intermediate_size:
        raise ValueError(f"{config.name}: no HF architecture here for sigmoid routers or shared experts")
    if config.qk_norm == "full" and not config.dense_layers:
        return transformers.OlmoeConfig(intermediate_size=config.moe_intermediate_size, **common)
    if config.qk_norm == "per_head":
        return transformers.Qwen3MoeConfig(head_dim=config.head_dim, moe_intermediate_size=config.moe_intermediate_size,
                                           intermediate_size=config.intermediate_size, decoder_sparse_step=1,
                                           mlp_only_layers=list(config.dense_layers), **common)
    raise ValueError(f"{config.name}: qk_norm={config.qk_norm!r} matches neither OLMoE nor Qwen3-MoE")
