"""Kimi K2.5's shape as numbers: parameters by part, active parameters, KV bytes a token.

Counted from the model config (DeepSeek-V3 layout: MLA attention, one dense layer first,
then MoE layers of routed experts plus a shared one), so the same code sizes the real
model and the embedded tiny one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# moonshotai/Kimi-K2.5's text_config (config.json): no download needed to plan for it.
KIMI_K25_TEXT: dict[str, Any] = {
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "first_k_dense_replace": 1,
    "n_routed_experts": 384,
    "num_experts_per_tok": 8,
    "n_shared_experts": 1,
    "num_attention_heads": 64,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "vocab_size": 163840,
}
# MoonViT (the vision tower and projector) of K2.5: ~0.4B parameters.
KIMI_K25_VISION_PARAMS = 0.41e9


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    moe_intermediate: int
    layers: int
    dense_layers: int
    experts: int
    active_experts: int
    shared_experts: int
    heads: int
    q_lora_rank: int
    kv_lora_rank: int
    rope_dim: int
    nope_dim: int
    v_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        c = config.get("text_config") or config
        return cls(
            hidden=c["hidden_size"],
            intermediate=c["intermediate_size"],
            moe_intermediate=c["moe_intermediate_size"],
            layers=c["num_hidden_layers"],
            dense_layers=c.get("first_k_dense_replace", 0),
            experts=c["n_routed_experts"],
            active_experts=c["num_experts_per_tok"],
            shared_experts=c.get("n_shared_experts", 0),
            heads=c["num_attention_heads"],
            q_lora_rank=c.get("q_lora_rank") or c["hidden_size"],
            kv_lora_rank=c["kv_lora_rank"],
            rope_dim=c["qk_rope_head_dim"],
            nope_dim=c["qk_nope_head_dim"],
            v_dim=c["v_head_dim"],
            vocab=c["vocab_size"],
        )

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelShape:
        return cls.from_config(json.loads((model_dir / "config.json").read_text()))

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers

    @property
    def attention_params(self) -> int:
        h, n = self.hidden, self.heads
        q = h * self.q_lora_rank + self.q_lora_rank * n * (self.nope_dim + self.rope_dim)
        kv = h * (self.kv_lora_rank + self.rope_dim)
        kv += self.kv_lora_rank * n * (self.nope_dim + self.v_dim)
        return q + kv + n * self.v_dim * h

    @property
    def expert_params(self) -> int:
        """One routed (or shared) expert: gate, up and down projections."""
        return 3 * self.hidden * self.moe_intermediate

    @property
    def routed_expert_params(self) -> int:
        return self.moe_layers * self.experts * self.expert_params

    @property
    def total_params(self) -> int:
        dense = self.dense_layers * 3 * self.hidden * self.intermediate
        moe = self.moe_layers * (
            (self.experts + self.shared_experts) * self.expert_params + self.experts * self.hidden
        )
        return self.layers * self.attention_params + dense + moe + 2 * self.vocab * self.hidden

    @property
    def non_expert_params(self) -> int:
        return self.total_params - self.routed_expert_params

    @property
    def active_params(self) -> int:
        """Parameters one token passes through (the input embedding is a lookup)."""
        active_experts = self.moe_layers * self.active_experts * self.expert_params
        return self.non_expert_params - self.vocab * self.hidden + active_experts

    def kv_bytes_per_token(self, mla: bool = True, dtype_bytes: int = 2) -> int:
        """MLA caches the compressed latent and the RoPE key, one per layer (the same on
        every tensor-parallel rank); without MLA (vLLM's VLLM_MLA_DISABLE) each head's key
        and value are cached, the value padded to the key's width as vLLM does."""
        if mla:
            return self.layers * (self.kv_lora_rank + self.rope_dim) * dtype_bytes
        width = max(self.nope_dim + self.rope_dim, self.v_dim)
        return self.layers * self.heads * 2 * width * dtype_bytes
