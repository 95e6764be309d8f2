"""A torch model behind runtime.base.Runtime, so torch rows are timed by the same generator
loop as llama.cpp and onnxruntime (runtime/ itself must stay free of torch)."""

from __future__ import annotations

import numpy as np
import torch

from runtime.base import Runtime


class TorchRuntime(Runtime):
    name = "torch"

    def __init__(self, model, tokenizer=None, device: str | torch.device = "cpu"):
        self.model, self.tokenizer, self.device = model.eval(), tokenizer, torch.device(device)
        self.bos_token_id = model.config.bos_token_id
        self.vocab_size = model.config.vocab_size
        eos = model.config.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.reset()

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_bos)["input_ids"]

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer else " ".join(map(str, ids))

    def reset(self) -> None:
        from transformers.cache_utils import DynamicCache

        self.cache = DynamicCache()
        self.n_past = 0

    @torch.inference_mode()
    def logits(self, new_ids: list[int]) -> np.ndarray:
        ids = torch.tensor([new_ids], device=self.device)
        pos = torch.arange(self.n_past, self.n_past + len(new_ids), device=self.device)[None]
        out = self.model(input_ids=ids, position_ids=pos, past_key_values=self.cache, use_cache=True)
        self.cache, self.n_past = out.past_key_values, self.n_past + len(new_ids)
        last = out.logits[0, -1].float()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return last.cpu().numpy()
