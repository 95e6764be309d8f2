"""Slicing: physically remove the units a PrunePlan drops, giving a SlimLlamaForCausalLM."""

from __future__ import annotations

import torch
from torch import nn

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


def apply_plan(model: nn.Module, plan: PrunePlan, device=None) -> SlimLlamaForCausalLM:
    """A new slim model holding exactly the kept units of `model` (which is left unchanged), on
    `device` (default: where `model` is; "meta": sizes only, no memory)."""
    plan.check_matches(discover(model))
    config = slim_config(model.config, plan)
    weight = next(model.parameters())
    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"):
            return SlimLlamaForCausalLM(config).to(weight.dtype)
    # a model spread over several devices (--device-map) may not fit one: its slim copy is built
    # on the CPU and spread again by the caller
    spread = len({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}) > 1
    home = device if device is not None else ("cpu" if spread else weight.device)
    slim = empty_slim(model, plan, home)
    fill_outer(model, slim)
    for i in range(len(plan.layers)):
        fill_layer(model, slim, plan, i)
    return slim


def empty_slim(model: nn.Module, plan: PrunePlan, device) -> SlimLlamaForCausalLM:
    """The slim model of `plan` with uninitialised weights on `device`, in `model`'s dtype.

    Built on the meta device and then given memory with `to_empty`: on the CPU the pages of an
    untouched tensor are not resident, so the slim model costs RAM only as `fill_layer` writes
    it (the dense model shrinking meanwhile under `release_layer`)."""
    config = slim_config(model.config, plan)
    with torch.device("meta"):
        slim = SlimLlamaForCausalLM(config)
    slim.to(next(model.parameters()).dtype)
    slim.to_empty(device=device)
    inner = slim.model
    inner.rotary_emb = type(inner.rotary_emb)(config=slim.config, device=device)  # its buffers are computed, not loaded
    slim.eval()
    if getattr(model, "generation_config", None) is not None:
        slim.generation_config = model.generation_config
    return slim


@torch.no_grad()
def fill_outer(model: nn.Module, slim: SlimLlamaForCausalLM) -> None:
    """Copy what slicing never changes: the embedding, the final norm, the output matrix."""
    src, dst = getattr(model, "model", model), slim.model
    dst.embed_tokens.weight.copy_(src.embed_tokens.weight)
    dst.norm.weight.copy_(src.norm.weight)
    if slim.config.tie_word_embeddings:
        slim.tie_weights()
    else:
        slim.lm_head.weight.copy_(model.lm_head.weight)


@torch.no_grad()
def fill_layer(model: nn.Module, slim: SlimLlamaForCausalLM, plan: PrunePlan, i: int) -> None:
    """Write slim decoder layer i from the dense layer i: the kept rows / columns of every
    member, the rest (norms) whole; one tensor at a time, so only one sliced copy is in flight."""
    dense_layer, slim_layer = decoder_layers(model)[i], slim.model.layers[i]
    shape, lp = discover(model)[i], plan.layers[i]
    members = {f"{path}.{kind_end}": (axis, part) for kind in MEMBERS for path, axis, part in MEMBERS[kind]
               for kind_end in ("weight", "bias")}
    source = dict(dense_layer.named_parameters())
    for name, target in list(slim_layer.named_parameters()) + list(slim_layer.named_buffers()):
        if name not in source:
            raise RuntimeError(f"slicing layer {i}: the dense layer has no {name}")
        value = source[name]
        if name in members:
            axis, part = members[name]
            if name.endswith("bias") and axis == "in":
                target.copy_(value)
                continue
            value = take_lines(value, axis, kept_index(lp, shape, part))
        target.copy_(value)


def release_layer(model: nn.Module, i: int) -> None:
    """Free dense decoder layer i (its tensors move to the meta device): slicing is done with it."""
    layer = decoder_layers(model)[i]
    for p in layer.parameters():
        p.grad = None
    layer.to("meta")


def slice_streamed(model: nn.Module, plan: PrunePlan, device) -> SlimLlamaForCausalLM:
    """`apply_plan` that consumes `model`: each dense layer is freed once its slim layer is
    written, so the two together never hold much more than the dense model (plus one layer)."""
    plan.check_matches(discover(model))
    slim = empty_slim(model, plan, device)
    fill_outer(model, slim)
    for i in range(len(plan.layers)):
        fill_layer(model, slim, plan, i)
        release_layer(model, i)
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


def as_slim(model: nn.Module) -> SlimLlamaForCausalLM:
    """A plain LlamaForCausalLM as a (uniform) slim model, so int4 config and export apply: the
    keep-everything plan sliced (a slim model is returned as it is)."""
    if isinstance(model, SlimLlamaForCausalLM):
        return model
    return apply_plan(model, PrunePlan.keep_all(discover(model)))
