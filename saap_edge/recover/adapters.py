"""LoRA adapters for recovery, attached the peft way.

- ``qalora``: the projections are Int4Linear (frozen int4 groups) and each gets a
  group-pooled LoRA: A reads the input averaged over each group of G inputs (in / G
  features), B maps rank r to the outputs. peft's own QA-LoRA variant is tied to GPTQ
  layers, so we register :class:`Int4LoraLinear` through peft's custom-module mechanism
  (``LoraConfig._register_custom_module``) and reuse peft's QA-LoRA settings
  (``use_qalora``, ``qalora_group_size``) and pooled forward, so adapter_config.json and
  adapter_model.safetensors have peft's QA-LoRA layout. What peft lacks is the merge: its
  QA-LoRA variant refuses to merge; here the update, constant within each group, is added
  to the group offsets (codes and scales never change).
- ``lora``: plain peft LoRA on fp nn.Linear projections, merged into the fp weights (the
  paper's LoRA ablation).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.lora.variants import QALoraLinearVariant
from torch import nn

from saap_edge.models.int4_linear import QUANT_MODULES, Int4Linear


class GroupOffsetVariant(QALoraLinearVariant):
    """peft's QA-LoRA forward (pooled input scaled by in / G) plus an exact merge into offsets."""

    @staticmethod
    def get_delta_weight(module: "Int4LoraLinear", active_adapter: str) -> torch.Tensor:
        """The per-group offset change [out, in / G].

        Forward adds B A (mean_g(x) * L) * s with L = in / G groups, i.e. a weight change of
        s * (L / G) * (B A)[o, g] for every input j of group g.
        """
        a = module.lora_A[active_adapter].weight.float()
        b = module.lora_B[active_adapter].weight.float()
        groups = module.in_features // module.qalora_group_size[active_adapter]
        return (b @ a) * module.scaling[active_adapter] * groups / module.qalora_group_size[active_adapter]


class Int4LoraLinear(nn.Module, LoraLayer):
    """peft LoRA layer over an Int4Linear base: group-pooled adapters merged into the offsets."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0, lora_alpha: int = 1, **kwargs):
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        if config.use_dora or not config.use_qalora:
            raise ValueError("Int4Linear layers take QA-LoRA adapters only (use_qalora=True, no DoRA)")
        base = self.get_base_layer()
        if config.qalora_group_size != base.group_size:
            raise ValueError(f"qalora_group_size {config.qalora_group_size} differs from the int4 group size {base.group_size}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        return GroupOffsetVariant()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            xa = self._cast_input_dtype(x, self.lora_A[name].weight.dtype)
            result = self.lora_variant[name].forward(self, active_adapter=name, x=xa, result=result).to(result.dtype)
        return result

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return self.lora_variant[adapter].get_delta_weight(self, adapter)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """offsets += delta (rounded to fp16, as stored); codes and scales are untouched."""
        base = self.get_base_layer()
        for name in adapter_names or self.active_adapters:
            if name not in self.lora_A:
                continue
            offsets = (base.offsets.float() + self.get_delta_weight(name).to(base.offsets.device)).half()
            if safe_merge and not torch.isfinite(offsets).all():
                raise ValueError(f"merging adapter {name!r} gives non-finite offsets")
            base.offsets = offsets
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        raise NotImplementedError("merged int4 offsets are rounded to fp16; reload the unmerged model instead")

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def lora_config(kind: str, rank: int, alpha: float, dropout: float, group_size: int | None, modules=QUANT_MODULES) -> LoraConfig:
    """The peft LoraConfig of recovery `kind` (qalora | lora), custom int4 layer registered."""
    extra = {"use_qalora": True, "qalora_group_size": group_size} if kind == "qalora" else {}
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(modules), bias="none",
        task_type="CAUSAL_LM", **extra,
    )
    if kind == "qalora":
        config._register_custom_module({Int4Linear: Int4LoraLinear})
    return config


def attach(model: nn.Module, config: LoraConfig) -> PeftModel:
    """Wrap `model` with fresh adapters (B = 0, so the wrapped model computes as before)."""
    with warnings.catch_warnings():
        # peft warns about any layer type it does not know; Int4Linear is handled by Int4LoraLinear
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        return get_peft_model(model, config)


def save_adapters(peft_model: PeftModel, directory: str | Path) -> None:
    """peft's adapter files, byte-identical between runs: peft keeps target_modules as a set,
    whose order (and so adapter_config.json) changes with every process's hash seed."""
    peft_model.save_pretrained(directory, safe_serialization=True)
    path = Path(directory) / "adapter_config.json"
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_adapters(model: nn.Module, directory: str | Path, trainable: bool = False) -> PeftModel:
    """Load adapters saved by `save_pretrained` onto `model` (int4 layer re-registered)."""
    from saap_edge.files import check_safetensors, read_json, reading

    directory = Path(directory)
    read_json(directory / "adapter_config.json", "adapter config")
    check_safetensors(directory / "adapter_model.safetensors", "adapter weights")
    with reading(directory, "peft adapter"):
        config = LoraConfig.from_pretrained(str(directory))
        if config.use_qalora:
            config._register_custom_module({Int4Linear: Int4LoraLinear})
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            return PeftModel.from_pretrained(model, str(directory), config=config, is_trainable=trainable)


def merge(peft_model: PeftModel) -> nn.Module:
    """Fold the adapters into the base (offsets for int4, weights for fp) and drop them."""
    return peft_model.merge_and_unload(safe_merge=True)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
