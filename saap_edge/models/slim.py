"""Slim LLaMA: a LLaMA decoder whose layers each have their own head, KV-head and MLP sizes.

This file imports only torch and transformers: `save_pretrained` copies it next to the
weights, so a saved slim model also loads with `trust_remote_code=True` where saap_edge is
not installed. With saap_edge imported, `AutoModelForCausalLM.from_pretrained(dir)` finds
these classes through the Auto registration at the bottom.

Per-layer sizes live in three config lists of length `num_hidden_layers`:
`num_attention_heads_per_layer`, `num_key_value_heads_per_layer`,
`intermediate_size_per_layer`. With a `quantization` section the seven projections of each
layer are Int4Linear (packed int4 codes, fp16 scales and offsets). The scalar fields keep the dense model's values; `head_dim`
is always explicit because it can no longer be derived from hidden / heads.

A layer with 0 heads and 0 KV heads is attention-free: it has no attention projections and
no attention norm, and adds only its MLP to the residual stream (llama.cpp's `deci` layers
with n_head = 0 compute the same).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from .int4_linear import replace_linears

PER_LAYER_FIELDS = {
    "num_attention_heads_per_layer": "num_attention_heads",
    "num_key_value_heads_per_layer": "num_key_value_heads",
    "intermediate_size_per_layer": "intermediate_size",
}


class SlimLlamaConfig(LlamaConfig):
    """LlamaConfig plus per-layer head, KV-head and MLP sizes (lists, one entry a layer)."""

    model_type = "saap_llama"

    def __init__(
        self,
        num_attention_heads_per_layer: list[int] | None = None,
        num_key_value_heads_per_layer: list[int] | None = None,
        intermediate_size_per_layer: list[int] | None = None,
        quantization: dict | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # int4 checkpoints: {"scheme", "bits": 4, "group_size", "modules", ...}; see int4_linear.py.
        # (Not `quantization_config`, which would send transformers looking for a quantizer.)
        self.quantization = quantization
        given = {
            "num_attention_heads_per_layer": num_attention_heads_per_layer,
            "num_key_value_heads_per_layer": num_key_value_heads_per_layer,
            "intermediate_size_per_layer": intermediate_size_per_layer,
        }
        n_layers = self.num_hidden_layers
        for field, scalar in PER_LAYER_FIELDS.items():
            values = given[field]
            values = [getattr(self, scalar)] * n_layers if values is None else [int(v) for v in values]
            if len(values) != n_layers:
                raise ValueError(f"{field} has {len(values)} entries for {n_layers} layers")
            setattr(self, field, values)
        for i in range(n_layers):
            heads, kv_heads, ffn = self.layer_sizes(i)
            attention_free = heads == 0 and kv_heads == 0
            if ffn < 1 or not attention_free and (kv_heads < 1 or heads < 1 or heads % kv_heads):
                raise ValueError(
                    f"layer {i}: {heads} query heads, {kv_heads} KV heads, MLP width {ffn}: "
                    "each layer needs >= 1 KV head and heads divisible by KV heads (or 0 of both), "
                    "and MLP width >= 1"
                )

    def layer_sizes(self, layer: int) -> tuple[int, int, int]:
        """(query heads, KV heads, MLP width) of decoder layer `layer`."""
        return (
            self.num_attention_heads_per_layer[layer],
            self.num_key_value_heads_per_layer[layer],
            self.intermediate_size_per_layer[layer],
        )

    @property
    def is_uniform(self) -> bool:
        """True when every layer has the same sizes (a plain `llama` architecture)."""
        return len({self.layer_sizes(i) for i in range(self.num_hidden_layers)}) == 1


class NoAttention(nn.Module):
    """The attention of an attention-free layer: adds nothing to the residual stream. It still
    appends empty keys and values (0 heads) to the cache, so that the cache's length, which
    transformers reads from any layer, stays the number of tokens seen."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx, self.head_dim = config, layer_idx, config.head_dim

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                cache_position=None, **kwargs):
        if past_key_values is not None:
            empty = hidden_states.new_zeros(hidden_states.shape[0], 0, hidden_states.shape[1], self.head_dim)
            past_key_values.update(empty, empty, self.layer_idx, {"cache_position": cache_position})
        return torch.zeros_like(hidden_states), None


def _build_layer(config: SlimLlamaConfig, layer: int) -> LlamaDecoderLayer:
    """A decoder layer with this layer's sizes that still reads the shared config at run time.

    The modules are built from a shallow copy holding the layer's sizes, then pointed back at
    the shared config, so settings changed later (attention implementation) reach every layer.
    An attention-free layer gets NoAttention and no attention norm.
    """
    sized = copy.copy(config)
    sized.num_attention_heads, sized.num_key_value_heads, sized.intermediate_size = config.layer_sizes(layer)
    attention_free = sized.num_key_value_heads == 0
    if attention_free:  # built at one head, then replaced
        sized.num_attention_heads = sized.num_key_value_heads = 1
    block = LlamaDecoderLayer(sized, layer)
    if attention_free:
        block.self_attn, block.input_layernorm = NoAttention(config, layer), nn.Identity()
    block.self_attn.config = config
    block.mlp.config = config
    return block


class SlimLlamaModel(LlamaModel):
    """LlamaModel whose decoder layers have per-layer sizes; forward is LlamaModel's."""

    config_class = SlimLlamaConfig

    def __init__(self, config: SlimLlamaConfig):
        # LlamaModel.__init__ would allocate every layer at its dense size first; build the
        # same fields here with the slim sizes instead.
        LlamaPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(_build_layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class SlimLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM over a SlimLlamaModel; generate() and the KV cache work unchanged."""

    config_class = SlimLlamaConfig

    def __init__(self, config: SlimLlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = SlimLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.quantization:
            replace_linears(self.model, config.quantization["group_size"], config.quantization["modules"])
        self.post_init()


AutoConfig.register(SlimLlamaConfig.model_type, SlimLlamaConfig, exist_ok=True)
AutoModel.register(SlimLlamaConfig, SlimLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(SlimLlamaConfig, SlimLlamaForCausalLM, exist_ok=True)
SlimLlamaConfig.register_for_auto_class()
SlimLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
