"""Slicing: physically remove the units a PrunePlan drops, giving a SlimLlamaForCausalLM."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_utils import no_init_weights

from saap_edge.models.slim import SlimLlamaConfig, SlimLlamaForCausalLM
from saap_edge.prune.groups import ATTN, MEMBERS, MLP, OUTPUT_PROJ, LayerShape, decoder_layers, discover, member_index, submodule
from saap_edge.prune.plan import LayerPlan, PrunePlan


def slim_config(config, plan: PrunePlan) -> SlimLlamaConfig:
    """The config of the model that `plan` leaves: per-layer sizes plus the source's settings."""
    fields = config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        fields.pop(key, None)
    fields.update(
        head_dim=plan.head_dim,
        num_attention_heads_per_layer=[lp.kept_heads for lp in plan.layers],
        num_key_value_heads_per_layer=[len(lp.kv_groups) for lp in plan.layers],
        intermediate_size_per_layer=[len(lp.channels) for lp in plan.layers],
    )
    return SlimLlamaConfig(**fields)


def kept_index(lp: LayerPlan, shape: LayerShape, part: str) -> torch.Tensor:
    """Rows (or columns) a layer plan keeps in a member holding `part`: query-head rows of
    q_proj and columns of o_proj ("q") follow the kept heads, k/v rows ("kv") the kept
    groups, MLP lines ("ch") the kept channels."""
    if part == "q":
        return member_index(torch.tensor(lp.query_heads, dtype=torch.long), shape, "qh")
    units = lp.kv_groups if part == "kv" else lp.channels
    return member_index(torch.tensor(units, dtype=torch.long), shape, part)


def sliced_state_dict(model: nn.Module, plan: PrunePlan) -> dict[str, torch.Tensor]:
    """The model's state dict with the dropped rows / columns removed (keys unchanged); an
    attention-free layer loses its attention projections and attention norm."""
    state = {k: v for k, v in model.state_dict().items()}
    prefix = "model.layers" if hasattr(model, "model") else "layers"
    for i, shape in enumerate(discover(model)):
        lp = plan.layers[i]
        for kind, members in MEMBERS.items():
            for path, axis, part in members:
                key = f"{prefix}.{i}.{path}"
                if kind == ATTN and lp.attention_free:
                    state.pop(f"{key}.weight", None)
                    state.pop(f"{key}.bias", None)
                    continue
                index = kept_index(lp, shape, part)
                state[f"{key}.weight"] = take_lines(state[f"{key}.weight"], axis, index).contiguous()
                if f"{key}.bias" in state and axis == "out":
                    state[f"{key}.bias"] = take_lines(state[f"{key}.bias"], axis, index).contiguous()
        if lp.attention_free:
            state.pop(f"{prefix}.{i}.input_layernorm.weight", None)
    return state


def take_lines(tensor: torch.Tensor, axis: str, index: torch.Tensor) -> torch.Tensor:
    """The rows (axis "out": weight rows or bias entries) or columns ("in") of a member's
    weight at `index`."""
    return tensor.index_select(0 if axis == "out" else 1, index.to(tensor.device))


def apply_plan(model: nn.Module, plan: PrunePlan) -> SlimLlamaForCausalLM:
    """A new slim model holding exactly the kept units of `model` (which is left unchanged)."""
    plan.check_matches(discover(model))
    config = slim_config(model.config, plan)
    state = sliced_state_dict(model, plan)
    weight = next(model.parameters())
    with no_init_weights():
        slim = SlimLlamaForCausalLM(config)
    # a model spread over several devices (--device-map) may not fit one: its slim copy is built
    # on the CPU and spread again by the caller
    spread = len({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}) > 1
    slim.to(dtype=weight.dtype, device="cpu" if spread else weight.device)
    missing, unexpected = slim.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"slicing left missing keys {missing} / unexpected keys {unexpected}")
    slim.tie_weights()
    slim.eval()
    if getattr(model, "generation_config", None) is not None:
        slim.generation_config = model.generation_config
    return slim


def mask_units(model: nn.Module, plan: PrunePlan) -> None:
    """Zero, in place, the output-side weights of every dropped unit (o_proj columns of every
    dropped query head, down_proj columns of every dropped channel).

    A dropped unit then contributes nothing to the residual stream, which is what slicing does
    physically (an attention-free layer too: all of its o_proj columns are zero); tests
    compare the two.
    """
    for i, (layer, shape) in enumerate(zip(decoder_layers(model), discover(model))):
        lp = plan.layers[i]
        for kind, part in ((ATTN, "q"), (MLP, "ch")):
            weight = submodule(layer, OUTPUT_PROJ[kind]).weight
            keep = torch.zeros(weight.shape[1], dtype=torch.bool)
            keep[kept_index(lp, shape, part)] = True
            with torch.no_grad():
                weight[:, ~keep.to(weight.device)] = 0
