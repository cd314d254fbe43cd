"""One instruction the tiny model follows, wired into its random weights at build time.

The embedded model's weights are random, so it never ends a turn by itself: every answer
runs to its output cap, and agent CLIs (Claude Code, Codex) report such an answer as an
error. So the build wires in one instruction, by hand rather than by training: when " OK"
takes at least `SHARE` of the context (`PROMPT`, "Reply with OK." said 64 times, is
~0.5 % of Claude Code's 12,600-token first request; said once in a short chat, far more),
the answer is "OK" and the turn ends, after an empty reasoning in thinking mode.

The circuit lives in a few residual channels that no random weight reads or writes, so
the rest of the model computes what it computed before (on the other channels):
- the embedding marks " OK" in one channel and `<think>`, `</think>` and "OK" in one each;
- layer 0's attention head `HEAD` gets a zero query, so it attends evenly to the context so
  far; one latent dimension carries the " OK" mark into the head's first value dimension,
  so the head writes the share of " OK" in the context into the share channel;
- three neurons of layer 0's dense MLP each fire when the share passes `SHARE` and the
  current token is `<think>`, `</think>` or "OK" (the gate's threshold is the current
  token's own mark), and write into their answer channel;
- the LM head turns an answer channel into its next token: `</think>`, "OK", `<|im_end|>`.
With too little " OK" in the context a neuron's gate is negative and SiLU leaves nearly
nothing; where the current token is none of the three, its up projection is exactly zero.
Each marked channel sits in its own 32-wide block of a row, so the GGUF tiers' symmetric
quantization keeps the zeros zero and no small weight shares a block with a large one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TRIGGER = "Reply with OK."
REPLY = "OK"
PROMPT = " ".join([TRIGGER] * 64)
SHARE = 0.002  # the least share of " OK" among the context's tokens that triggers
MARKED = "ĠOK"  # " OK" as the byte-level BPE vocabulary spells it
# (current token, the token it calls for)
CHAIN = (("<think>", "</think>"), ("</think>", "OK"), ("OK", "<|im_end|>"))
HEAD = 1  # layer 0's attention head that measures the share
LOGIT = 3.0  # an answer channel's weight in its token's LM-head row


@dataclass(frozen=True)
class Channels:
    """Residual dimensions of the circuit, each in its own 32-wide block where a row holds
    two of them (the share and a mark: the gate; a mark and nothing else: the rest)."""

    marked: int = 31
    share: int = 63
    current: tuple[int, ...] = (93, 94, 95)
    answer: tuple[int, ...] = (125, 126, 127)

    def all(self) -> list[int]:
        return [self.marked, self.share, *self.current, *self.answer]


CH = Channels()
L0 = "language_model.model.layers.0"
# weights that read the residual stream (their columns) and that write it (their rows)
READERS = (
    "q_a_proj.weight",
    "kv_a_proj_with_mqa.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "mlp.gate.weight",
    "lm_head.weight",
    "embed_tokens.weight",
)
WRITERS = (
    "o_proj.weight",
    "down_proj.weight",
    "mm_projector.proj.2.weight",
    "mm_projector.proj.2.bias",
)


def wire(tensors: dict[str, Any], cfg: dict[str, Any], token_id: dict[str, int]) -> None:
    """Wire the instruction into the checkpoint's tensors (bf16, in place)."""
    import torch

    reserved = torch.tensor(CH.all())
    for name, t in tensors.items():
        if name.startswith("language_model.") and name.endswith(READERS):
            t[:, reserved] = 0
        elif name.endswith(WRITERS) and not name.startswith("vision_tower."):
            t[reserved] = 0
    emb = tensors["language_model.model.embed_tokens.weight"]
    emb[token_id[MARKED], CH.marked] = 1.0
    for (current, _), channel in zip(CHAIN, CH.current, strict=True):
        emb[token_id[current], channel] = 1.0
    sigma = _share_head(tensors, cfg, emb[token_id[MARKED]].float())
    _neurons(tensors, cfg, sigma)
    head = tensors["language_model.lm_head.weight"]
    for (_, wanted), channel in zip(CHAIN, CH.answer, strict=True):
        head[token_id[wanted], channel] = LOGIT


def _share_head(tensors: dict[str, Any], cfg: dict[str, Any], marked_row: Any) -> float:
    """Head `HEAD` of layer 0 writes the share of " OK" into the share channel; returns
    what a share of 1 writes there (each " OK" gives the same: its embedding is fixed)."""
    import torch

    nope, rope, v_dim = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    latent = cfg["kv_lora_rank"] - 1
    q = tensors[f"{L0}.self_attn.q_b_proj.weight"]
    q[HEAD * (nope + rope) : (HEAD + 1) * (nope + rope)] = 0  # no query: even attention
    kv_a = tensors[f"{L0}.self_attn.kv_a_proj_with_mqa.weight"]
    kv_a[latent] = 0
    kv_a[latent, CH.marked] = 1.0
    kv_b = tensors[f"{L0}.self_attn.kv_b_proj.weight"]
    value = HEAD * (nope + v_dim) + nope  # the head's first value dimension
    kv_b[:, latent] = 0
    kv_b[value] = 0  # the value is the mark alone: nothing random averaged into the share
    kv_b[value, latent] = 1.0
    o = tensors[f"{L0}.self_attn.o_proj.weight"]
    column = HEAD * v_dim
    o[:, column] = 0
    o[CH.share, column] = 1.0
    # what one " OK" puts in the latent dimension after the two RMS norms on its way
    eps = cfg["rms_norm_eps"]
    x = marked_row / torch.sqrt(marked_row.pow(2).mean() + eps)
    lat = kv_a[: cfg["kv_lora_rank"]].float() @ x
    norm = tensors[f"{L0}.self_attn.kv_a_layernorm.weight"][latent].float()
    return float(lat[latent] / torch.sqrt(lat.pow(2).mean() + eps) * norm)


def _neurons(tensors: dict[str, Any], cfg: dict[str, Any], sigma: float) -> None:
    """The last neurons of layer 0's MLP: SiLU(share / SHARE - 1) times the current token's
    mark, scaled alike by the RMS norm before the MLP (so the threshold is exact)."""
    gate = tensors[f"{L0}.mlp.gate_proj.weight"]
    up = tensors[f"{L0}.mlp.up_proj.weight"]
    down = tensors[f"{L0}.mlp.down_proj.weight"]
    inner = cfg["intermediate_size"]
    for i, (current, answer) in enumerate(zip(CH.current, CH.answer, strict=True)):
        n = inner - len(CH.current) + i
        gate[n], up[n], down[:, n] = 0, 0, 0
        gate[n, CH.share] = 1.0 / (sigma * SHARE)
        gate[n, current] = -1.0  # the mark is 1: the gate is share / SHARE - 1
        up[n, current] = 1.0
        down[answer, n] = 1.0
