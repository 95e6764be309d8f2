"""Discovery: the coupled structures (units) of a LLaMA decoder layer that are pruned together.

An attention unit is one KV group: KV head j, the query heads that read it, the matching
rows of q/k/v_proj and the matching input columns of o_proj. transformers' `repeat_kv`
expands KV head j to query heads j*n_rep ... (j+1)*n_rep-1, so query head h belongs to KV
group h // n_rep and a group's q rows (and o_proj columns) are one contiguous block.
With MHA (n_rep = 1) a unit is one head. An MLP unit is one intermediate channel: a row of
gate_proj and up_proj and a column of down_proj. The hidden size is never pruned.

Finer and coarser attention units (`PruneSettings.units`):
- a query head (HEAD): its q_proj rows and o_proj columns. Search removes query heads as
  slots, one head from every KV group of the layer at once, so every kept group keeps the
  same number of query heads (llama.cpp needs n_head divisible by n_head_kv): a layer may
  keep 3 KV groups x 2 query heads;
- the whole attention module (MODULE): every KV group and the attention norm; the layer
  keeps its MLP (a `deci` layer with 0 heads; never the reverse, which llama.cpp drops).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ATTN, MLP, HEAD, MODULE = "attn", "mlp", "head", "module"

# Coupled projections of each unit kind: (module path in the decoder layer, axis that holds
# the unit: "out" = weight rows, "in" = weight columns, which slice of the unit it holds).
MEMBERS: dict[str, tuple[tuple[str, str, str], ...]] = {
    ATTN: (
        ("self_attn.q_proj", "out", "q"),
        ("self_attn.k_proj", "out", "kv"),
        ("self_attn.v_proj", "out", "kv"),
        ("self_attn.o_proj", "in", "q"),
    ),
    MLP: (
        ("mlp.gate_proj", "out", "ch"),
        ("mlp.up_proj", "out", "ch"),
        ("mlp.down_proj", "in", "ch"),
    ),
}
# Members of one query head ("qh": head_dim rows of q_proj, head_dim columns of o_proj).
HEAD_MEMBERS = (("self_attn.q_proj", "out", "qh"), ("self_attn.o_proj", "in", "qh"))
# The projection whose input columns a unit owns (FLAP / Wanda-sp read their inputs).
OUTPUT_PROJ = {ATTN: "self_attn.o_proj", MLP: "mlp.down_proj"}


def kind_members(kind: str) -> tuple[tuple[str, str, str], ...]:
    """The coupled projections of a unit kind (ATTN, MLP or HEAD)."""
    return HEAD_MEMBERS if kind == HEAD else MEMBERS[kind]


def scored_kinds(heads: bool) -> tuple[str, ...]:
    """The unit kinds a ranking scores: KV groups and MLP channels, and query heads if `heads`."""
    return (ATTN, MLP, HEAD) if heads else (ATTN, MLP)


def output_proj(kind: str) -> str:
    return OUTPUT_PROJ.get(kind, OUTPUT_PROJ[ATTN])


@dataclass(frozen=True)
class LayerShape:
    """Sizes of one decoder layer, read from its real weights."""

    layer: int
    n_heads: int
    n_kv: int
    head_dim: int
    ffn: int
    hidden: int

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv

    def n_units(self, kind: str) -> int:
        return {ATTN: self.n_kv, MLP: self.ffn, HEAD: self.n_heads}[kind]

    def unit_width(self, part: str) -> int:
        """Rows/columns one unit owns in a member holding `part` ("q": a KV group's query
        heads, "kv", "qh": one query head, "ch")."""
        return {"q": self.n_rep * self.head_dim, "kv": self.head_dim, "qh": self.head_dim, "ch": 1}[part]


def submodule(layer: nn.Module, path: str) -> nn.Linear:
    module = layer
    for name in path.split("."):
        module = getattr(module, name)
    return module


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a LLaMA causal LM (or of its base model)."""
    base = getattr(model, "model", model)
    return base.layers


def layer_shape(layer: nn.Module, index: int, head_dim: int) -> LayerShape:
    attn, mlp = layer.self_attn, layer.mlp
    free = not hasattr(attn, "q_proj")  # an attention-free layer of a pruned model
    return LayerShape(
        layer=index,
        n_heads=0 if free else attn.q_proj.weight.shape[0] // head_dim,
        n_kv=0 if free else attn.k_proj.weight.shape[0] // head_dim,
        head_dim=head_dim,
        ffn=mlp.gate_proj.weight.shape[0],
        hidden=mlp.gate_proj.weight.shape[1],
    )


def model_head_dim(model: nn.Module) -> int:
    config = model.config
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def discover(model: nn.Module) -> list[LayerShape]:
    """The shape of every decoder layer of `model`, from the weights themselves."""
    head_dim = model_head_dim(model)
    return [layer_shape(layer, i, head_dim) for i, layer in enumerate(decoder_layers(model))]


def unit_reduce(values: torch.Tensor, axis: str, n_units: int) -> torch.Tensor:
    """Sum a per-weight tensor (out x in) into one value per unit (rows or columns in blocks)."""
    per_line = values.sum(dim=1 if axis == "out" else 0)
    return per_line.reshape(n_units, -1).sum(dim=1)


def member_index(units: torch.Tensor, shape: LayerShape, part: str) -> torch.Tensor:
    """Row (or column) indices of the given units inside a member holding `part`."""
    width = shape.unit_width(part)
    offsets = torch.arange(width)
    return (units.long()[:, None] * width + offsets[None, :]).reshape(-1)


def member_params(member: nn.Linear, axis: str, n_units: int) -> int:
    """Parameters one unit owns in this member (weight lines plus bias entries)."""
    rows, cols = member.weight.shape
    per_unit = (cols * rows // n_units) if axis == "out" else (rows * cols // n_units)
    if member.bias is not None and axis == "out":
        per_unit += rows // n_units
    return per_unit


def unit_cost(layer: nn.Module, shape: LayerShape, kind: str) -> int:
    """Parameters removed with one unit of `kind` from this layer, counted from real shapes
    (MODULE: what goes beyond the KV groups with the whole attention, its norm)."""
    if kind == MODULE:
        return sum(p.numel() for p in layer.input_layernorm.parameters())
    n = shape.n_units(kind)
    return sum(member_params(submodule(layer, path), axis, n) for path, axis, _ in kind_members(kind))


def unit_costs(model: nn.Module, shapes: list[LayerShape], layers: list[int]) -> dict[tuple[int, str], int]:
    """Parameters one unit of each kind removes, per prunable layer (ATTN and MLP units, one
    query head, and the attention module's own extra parameters)."""
    blocks = decoder_layers(model)
    return {(i, kind): unit_cost(blocks[i], shapes[i], kind) for i in layers for kind in (ATTN, MLP, HEAD, MODULE)}


def total_params(model: nn.Module) -> int:
    """Parameters of the model, tied weights counted once."""
    return sum(p.numel() for p in model.parameters())
