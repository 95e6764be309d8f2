"""Slicing: physically remove the units a PrunePlan drops, giving a SlimLlamaForCausalLM."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_utils import no_init_weights

from saap_edge.models.slim import SlimLlamaConfig, SlimLlamaForCausalLM
from saap_edge.prune.groups import MEMBERS, decoder_layers, discover, member_index, submodule
from saap_edge.prune.plan import PrunePlan


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


def _kept_units(plan: PrunePlan, layer: int, kind: str) -> torch.Tensor:
    lp = plan.layers[layer]
    return torch.tensor(lp.kv_groups if kind == "attn" else lp.channels, dtype=torch.long)


def sliced_state_dict(model: nn.Module, plan: PrunePlan) -> dict[str, torch.Tensor]:
    """The model's state dict with the dropped rows / columns removed (keys unchanged)."""
    state = {k: v for k, v in model.state_dict().items()}
    prefix = "model.layers" if hasattr(model, "model") else "layers"
    for i, shape in enumerate(discover(model)):
        for kind, members in MEMBERS.items():
            units = _kept_units(plan, i, kind)
            for path, axis, part in members:
                key = f"{prefix}.{i}.{path}"
                state[f"{key}.weight"] = member_slice(state[f"{key}.weight"], axis, units, shape, part).contiguous()
                if f"{key}.bias" in state and axis == "out":
                    state[f"{key}.bias"] = member_slice(state[f"{key}.bias"], axis, units, shape, part).contiguous()
    return state


def member_slice(tensor: torch.Tensor, axis: str, units: torch.Tensor, shape, part: str) -> torch.Tensor:
    """The rows (axis "out": weight rows or bias entries) or columns ("in") of a member's
    weight that the given units own."""
    index = member_index(units, shape, part).to(tensor.device)
    return tensor.index_select(0 if axis == "out" else 1, index)


def apply_plan(model: nn.Module, plan: PrunePlan) -> SlimLlamaForCausalLM:
    """A new slim model holding exactly the kept units of `model` (which is left unchanged)."""
    plan.check_matches(discover(model))
    config = slim_config(model.config, plan)
    state = sliced_state_dict(model, plan)
    weight = next(model.parameters())
    with no_init_weights():
        slim = SlimLlamaForCausalLM(config)
    slim.to(dtype=weight.dtype, device=weight.device)
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
    """Zero, in place, the output-side weights of every dropped unit (o_proj / down_proj columns).

    A dropped unit then contributes nothing to the residual stream, which is what slicing does
    physically; tests compare the two.
    """
    for i, (layer, shape) in enumerate(zip(decoder_layers(model), discover(model))):
        for kind, (path, part) in {"attn": ("self_attn.o_proj", "q"), "mlp": ("mlp.down_proj", "ch")}.items():
            kept = set(_kept_units(plan, i, kind).tolist())
            dropped = torch.tensor([u for u in range(shape.n_units(kind)) if u not in kept], dtype=torch.long)
            if len(dropped):
                with torch.no_grad():
                    submodule(layer, path).weight[:, member_index(dropped, shape, part)] = 0
