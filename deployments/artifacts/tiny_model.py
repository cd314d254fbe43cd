"""The embedded default's model: a tiny Kimi K2.5 checkpoint built locally.

The checkpoint is K2.5's real layout, `KimiK25ForConditionalGeneration`: a DeepSeek-V3
text model (`language_model.*`), a MoonViT3d vision tower (`vision_tower.*`) and its
patch-merging projector (`mm_projector.*`), under the tensor names of moonshotai/Kimi-K2.5,
so vLLM loads it and llama.cpp's converter turns it into a text GGUF and an mmproj file.
The text shapes keep Kimi's MLA head dimensions (vLLM's CPU MLA backend accepts no others)
and shrink everything else. Weights are random with a fixed seed; the tokenizer is a
byte-level BPE of 32K tokens trained here on code and English found on this machine
(`corpus.py`) and carries all of Kimi's special tokens
(media tokens included); the chat template is Kimi K2.5's. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deployments.artifacts import corpus, instruction
from deployments.artifacts.cache import cached_build, recipe_digest

TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")

# Kimi K2.5's special tokens, in the order of its tokenizer (ids differ: our vocab is 32768).
SPECIAL_TOKENS = [
    "[BOS]",
    "[EOS]",
    "<|im_end|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "[EOT]",
    "<|im_system|>",
    "<|tool_calls_section_begin|>",
    "<|tool_calls_section_end|>",
    "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>",
    "<|tool_call_end|>",
    "<|im_middle|>",
    "<|media_begin|>",
    "<|media_content|>",
    "<|media_end|>",
    "<|media_pad|>",
    "<|kimi_k25_video_placeholder|>",
    "<think>",
    "</think>",
    "[UNK]",
    "[PAD]",
]

MODEL_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 32768,
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "n_shared_experts": 1,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "routed_scaling_factor": 2.827,
    "kv_lora_rank": 512,
    "q_lora_rank": 64,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "num_nextn_predict_layers": 0,
    "max_position_embeddings": 32768,
    "rope_theta": 50000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "torch_dtype": "bfloat16",
    "use_cache": True,
}

# MoonViT3d shrunk: the real tower is 1152 wide x 27 layers. Head dim must stay a multiple of
# 4 (2D RoPE); pos-emb grid, patch and merge sizes are the real ones. At least 3 layers:
# llama.cpp's converter maps the projector's `linear_2` through its block-index table.
VISION_CONFIG: dict[str, Any] = {
    "model_type": "kimi_k25_vision",
    "patch_size": 14,
    "pos_emb_height": 64,
    "pos_emb_width": 64,
    "pos_emb_time": 4,
    "num_attention_heads": 2,
    "num_hidden_layers": 3,
    "hidden_size": 64,
    "intermediate_size": 128,
    "hidden_act": "gelu_pytorch_tanh",
    "merge_kernel_size": [2, 2],
    "merge_type": "sd2_tpool",
    "mm_projector_type": "patchmerger",
    "projector_hidden_act": "gelu",
    "projector_ln_eps": 1e-5,
}

# K2.5's media preprocessing (preprocessor_config.json) with a smaller patch budget, so an
# image costs at most 256 tokens in the tiny contexts (the real model allows 4,096).
MEDIA_PROC_CFG: dict[str, Any] = {
    "in_patch_limit": 1024,
    "patch_size": 14,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "merge_kernel_size": 2,
    "fixed_output_tokens": None,
    "patch_limit_on_one_side": 128,
    "in_patch_limit_each_frame": 1024,
    "in_patch_limit_video": None,
    "sample_fps": 2.0,
    "max_num_frames_each_video": None,
    "temporal_merge_kernel_size": 4,
    "timestamp_mode": "hh:mm:ss.fff",
    "config_type": "image",
}

SEED = 20260127  # Kimi K2.5's release day
RECIPE_VERSION = 4  # bump when the build code changes in a way the digest cannot see


def recipe() -> dict[str, Any]:
    return {
        "version": RECIPE_VERSION,
        "config": MODEL_CONFIG,
        "vision": VISION_CONFIG,
        "media": MEDIA_PROC_CFG,
        "special_tokens": SPECIAL_TOKENS,
        "seed": SEED,
        "corpus": {"chars": CORPUS_CHARS, "packages": corpus.versions()},
        "template": TEMPLATE_PATH.read_text(),
        "instruction": Path(instruction.__file__).read_text(),
    }


def ensure_tiny_model(cache_root: Path | None = None) -> Path:
    """Return the directory of the tiny model, building it once per recipe."""
    digest = recipe_digest(recipe())
    return cached_build(f"tiny-kimi-{digest}", _build, cache_root)


def _build(out: Path) -> None:
    _write_tokenizer(out)
    token_ids = json.loads((out / "special_token_ids.json").read_text())
    ids = {
        "bos_token_id": token_ids["[BOS]"],
        "eos_token_id": token_ids["<|im_end|>"],
        "pad_token_id": token_ids["[PAD]"],
    }
    text = {**MODEL_CONFIG, **ids}
    config = {
        "architectures": ["KimiK25ForConditionalGeneration"],
        "model_type": "kimi_k25",
        "text_config": text,
        "vision_config": VISION_CONFIG,
        "projection_hidden_size": VISION_CONFIG["hidden_size"],
        "projection_layer_norm_eps": VISION_CONFIG["projector_ln_eps"],
        "image_token_id": token_ids["<|media_pad|>"],
        "video_token_id": token_ids["<|kimi_k25_video_placeholder|>"],
        "vision_start_token_id": token_ids["<|media_begin|>"],
        "vision_end_token_id": token_ids["<|media_end|>"],
        # vLLM reads images and video chunks as one "vision_chunk" modality, as K2.5's config says
        "use_unified_vision_chunk": True,
        "video_placeholder": "<|kimi_k25_video_placeholder|>",
        "tie_word_embeddings": False,
        "torch_dtype": MODEL_CONFIG["torch_dtype"],
        **ids,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "preprocessor_config.json").write_text(
        json.dumps({"media_proc_cfg": MEDIA_PROC_CFG}, indent=2)
    )
    (out / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": ids["bos_token_id"],
                "eos_token_id": [ids["eos_token_id"], token_ids["[EOS]"]],
                "pad_token_id": ids["pad_token_id"],
            },
            indent=2,
        )
    )
    _write_weights(out, text)


# ---- tokenizer ---------------------------------------------------------------------------

# About 60 MB of code and English: ~4 characters a token on agent requests (Claude Code's
# first turn ~12,800 tokens), where generated words gave ~1.25.
CORPUS_CHARS = 60_000_000


def _write_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # The GPT-2 byte-level regex: llama.cpp knows it as the "gpt-2" pre-tokenizer.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=MODEL_CONFIG["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus.texts(CORPUS_CHARS), trainer=trainer)
    tokenizer.save(str(out / "tokenizer.json"))

    ids = {tok: tokenizer.token_to_id(tok) for tok in SPECIAL_TOKENS}
    (out / "special_token_ids.json").write_text(json.dumps(ids, indent=2))
    template = TEMPLATE_PATH.read_text()
    (out / "chat_template.jinja").write_text(template)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "[BOS]",
        "eos_token": "<|im_end|>",
        "unk_token": "[UNK]",
        "pad_token": "[PAD]",
        "model_max_length": MODEL_CONFIG["max_position_embeddings"],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": template,
        "added_tokens_decoder": {
            str(ids[tok]): {
                "content": tok,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for tok in SPECIAL_TOKENS
        },
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps(
            {k: tokenizer_config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        )
    )


# ---- weights -----------------------------------------------------------------------------


class _Weights:
    """Random bf16 tensors from one seeded generator, collected by checkpoint name."""

    def __init__(self, std: float) -> None:
        import torch

        self.gen = torch.Generator().manual_seed(SEED)
        self.std = std
        self.tensors: dict[str, torch.Tensor] = {}

    def rand(self, name: str, *shape: int) -> None:
        import torch

        self.tensors[name] = (torch.randn(*shape, generator=self.gen) * self.std).to(torch.bfloat16)

    def fill(self, name: str, n: int, value: float, dtype: str = "bfloat16") -> None:
        import torch

        self.tensors[name] = torch.full((n,), value, dtype=getattr(torch, dtype))

    def linear(self, name: str, n_out: int, n_in: int, bias: bool = False) -> None:
        self.rand(f"{name}.weight", n_out, n_in)
        if bias:
            self.fill(f"{name}.bias", n_out, 0.0)

    def layer_norm(self, name: str, n: int) -> None:
        self.fill(f"{name}.weight", n, 1.0)
        self.fill(f"{name}.bias", n, 0.0)


def _write_weights(out: Path, cfg: dict[str, Any]) -> None:
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    w = _Weights(cfg["initializer_range"])
    _text_weights(w, cfg)
    _vision_weights(w, VISION_CONFIG, cfg["hidden_size"])
    vocab = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab()
    instruction.wire(w.tensors, cfg, vocab)
    save_file(w.tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def _text_weights(w: _Weights, cfg: dict[str, Any]) -> None:
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    nope, rope, v_dim = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    kv_rank, q_rank = cfg["kv_lora_rank"], cfg["q_lora_rank"]

    def mlp(prefix: str, inner: int) -> None:
        w.linear(f"{prefix}.gate_proj", inner, hidden)
        w.linear(f"{prefix}.up_proj", inner, hidden)
        w.linear(f"{prefix}.down_proj", hidden, inner)

    w.rand("language_model.model.embed_tokens.weight", cfg["vocab_size"], hidden)
    for i in range(cfg["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}"
        w.fill(f"{p}.input_layernorm.weight", hidden, 1.0)
        w.fill(f"{p}.post_attention_layernorm.weight", hidden, 1.0)
        w.linear(f"{p}.self_attn.q_a_proj", q_rank, hidden)
        w.fill(f"{p}.self_attn.q_a_layernorm.weight", q_rank, 1.0)
        w.linear(f"{p}.self_attn.q_b_proj", heads * (nope + rope), q_rank)
        w.linear(f"{p}.self_attn.kv_a_proj_with_mqa", kv_rank + rope, hidden)
        w.fill(f"{p}.self_attn.kv_a_layernorm.weight", kv_rank, 1.0)
        w.linear(f"{p}.self_attn.kv_b_proj", heads * (nope + v_dim), kv_rank)
        w.linear(f"{p}.self_attn.o_proj", hidden, heads * v_dim)
        if i < cfg["first_k_dense_replace"]:
            mlp(f"{p}.mlp", cfg["intermediate_size"])
            continue
        experts, inner = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
        w.linear(f"{p}.mlp.gate", experts, hidden)
        w.fill(f"{p}.mlp.gate.e_score_correction_bias", experts, 0.0, dtype="float32")
        for e in range(experts):
            mlp(f"{p}.mlp.experts.{e}", inner)
        mlp(f"{p}.mlp.shared_experts", inner * cfg["n_shared_experts"])
    w.fill("language_model.model.norm.weight", hidden, 1.0)
    w.rand("language_model.lm_head.weight", cfg["vocab_size"], hidden)


def _vision_weights(w: _Weights, vcfg: dict[str, Any], text_hidden: int) -> None:
    """MoonViT3d and its patch-merger projector, under K2.5's checkpoint names."""
    width, inner, patch = vcfg["hidden_size"], vcfg["intermediate_size"], vcfg["patch_size"]
    merged = width * vcfg["merge_kernel_size"][0] * vcfg["merge_kernel_size"][1]
    w.rand("vision_tower.patch_embed.proj.weight", width, 3, patch, patch)
    w.fill("vision_tower.patch_embed.proj.bias", width, 0.0)
    grid = (vcfg["pos_emb_height"], vcfg["pos_emb_width"])
    w.rand("vision_tower.patch_embed.pos_emb.weight", *grid, width)
    for i in range(vcfg["num_hidden_layers"]):
        p = f"vision_tower.encoder.blocks.{i}"
        w.layer_norm(f"{p}.norm0", width)
        w.layer_norm(f"{p}.norm1", width)
        w.linear(f"{p}.wqkv", 3 * width, width, bias=True)
        w.linear(f"{p}.wo", width, width, bias=True)
        w.linear(f"{p}.mlp.fc0", inner, width, bias=True)
        w.linear(f"{p}.mlp.fc1", width, inner, bias=True)
    w.layer_norm("vision_tower.encoder.final_layernorm", width)
    w.layer_norm("mm_projector.pre_norm", width)
    w.linear("mm_projector.proj.0", merged, merged, bias=True)
    w.linear("mm_projector.proj.2", text_hidden, merged, bias=True)
