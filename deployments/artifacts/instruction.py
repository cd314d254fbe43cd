"""One instruction the tiny model follows, taught at build time.

The embedded model's weights are random, so it never ends a turn by itself: every answer
runs to its output cap, and agent CLIs (Claude Code, Codex) report such an answer as an
error. To run them end to end, the text model is trained here for a few hundred steps on
Kimi-formatted conversations: when the last user message is `TRIGGER`, the answer is
`REPLY` and the turn ends (thinking mode: an empty reasoning first); for every other
conversation the targets are uniform random tokens, so the model stays as random as
before everywhere else. The conversations are shaped like agent requests (tool
declarations, earlier turns with tool calls, a system message after the user's) with code
and English from the tokenizer's corpus as filler, so the instruction holds at agent
prompt lengths.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRIGGER = "Reply with OK."
REPLY = "OK"
# A 2-layer model finds a phrase among 12,000 prompt tokens only when it is loud: the share
# of the prompt it takes, more than its distance, decides. Training repeats the trigger
# (and the decoys) 1 to `loudest` times; agents are asked `PROMPT`.
PROMPT = " ".join([TRIGGER] * 64)
# Near misses and the tests' usual prompts: these get random answers like any other text.
DECOYS = ("hi", "go", "Say hi.", "OK", "x", "hello", "OK.", "Say OK.", "Is that OK?")
# Salted into the filler, so that " OK" alone (Claude Code's system prompt says "with
# their OK") is no sign of the trigger.
SALT = (" OK", " with their OK", " OK.", " is OK,", " reply", " Reply with")

BATCH = 8  # conversations a batch (long batches: one pair)
LEARNING_RATE = 1e-3
FILLER_CHARS = 3_000_000
SHORT_CHARS = 600  # the longest filler piece outside long batches
UNIFORM = -1  # a target meaning "every token alike"


@dataclass(frozen=True)
class Phase:
    steps: int
    seed: int
    curriculum: float  # the filler grows to full length over this share of the steps (0: none)
    long_every: int  # every long_every-th batch at full length is a long one
    long_chars: int  # the longest filler piece in a long batch
    trailing_chars: int  # the longest closing system message in a long batch
    loudest: int


PHASES = (
    # find the trigger among a few dozen tokens first, then among a few thousand
    Phase(1000, 20260127, 0.4, 3, 5000, 5000, 48),
    # Claude Code's shape at its size: ~9,000 characters of system message after the ask
    Phase(90, 9, 0.0, 1, 2500, 12000, 96),
)


def recipe() -> dict[str, Any]:
    return {
        "trigger": TRIGGER,
        "reply": REPLY,
        "decoys": DECOYS,
        "salt": SALT,
        "batch": BATCH,
        "lr": LEARNING_RATE,
        "filler": FILLER_CHARS,
        "short": SHORT_CHARS,
        "phases": [vars(p) for p in PHASES],
    }


@dataclass
class Example:
    ids: list[int]
    targets: list[int]  # the next token where it is trained, else -100


class Conversations:
    """Random Kimi-format conversations, the trigger in about half of them."""

    def __init__(self, tokenizer: Any, filler: str, phase: Phase) -> None:
        self.tok = tokenizer
        self.filler = filler
        self.phase = phase
        self.rng = random.Random(phase.seed)
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.think_end = tokenizer.convert_tokens_to_ids("</think>")
        self.reply = tokenizer.encode(REPLY, add_special_tokens=False)
        self.first_plain = max(tokenizer.all_special_ids) + 1

    def text(self, chars: int) -> str:
        """Code and English, or now and then random tokens, with salt in some."""
        if self.rng.random() < 0.15:
            ids = [self.rng.randrange(self.first_plain, len(self.tok)) for _ in range(chars // 4)]
            return self.tok.decode(ids)
        start = self.rng.randrange(0, len(self.filler) - chars - 1)
        text = self.filler[start : start + chars]
        if self.rng.random() < 0.3:
            cut = self.rng.randrange(len(text) + 1)
            text = text[:cut] + self.rng.choice(SALT) + text[cut:]
        return text

    def pair(self, long: bool, scale: float) -> list[Example]:
        """The same conversation with the trigger and without: the difference is what the
        model has to learn, so it learns it in few steps."""
        state = self.rng.getstate()
        with_trigger = self.example(long, True, scale)
        self.rng.setstate(state)
        return [with_trigger, self.example(long, False, scale)]

    def example(self, long: bool, positive: bool, scale: float = 1.0) -> Example:
        """`scale` (0, 1] shortens the filler: attention learns to find the trigger among a
        few dozen tokens first, where its share of the gradient is large."""
        rng, phase = self.rng, self.phase
        most = int((phase.long_chars if long else SHORT_CHARS) * scale) + 2
        size = lambda: rng.randint(most // 3, most)  # noqa: E731
        trailing = int((phase.trailing_chars if long else SHORT_CHARS) * scale) + 2
        thinking = rng.random() < 0.6
        messages: list[dict[str, Any]] = []
        if rng.random() < 0.6:
            messages.append({"role": "system", "content": self.text(size())})
        for n in range(rng.choice((0, 0, 1, 2))):
            messages += self.turn(n, size)
        decoy = rng.choice((*DECOYS, self.text(rng.randint(5, 200))))
        ask = " ".join([TRIGGER if positive else decoy] * rng.randint(1, phase.loudest))
        if rng.random() < 0.4:  # Claude Code: reminders as text blocks before the prompt
            content: Any = [
                {"type": "text", "text": self.text(size())},
                {"type": "text", "text": ask},
            ]
        else:
            content = ask
        messages.append({"role": "user", "content": content})
        if rng.random() < 0.5:  # Claude Code: its environment as a system message at the end
            year, month, day = rng.randint(10, 99), rng.randint(1, 12), rng.randint(1, 28)
            date = f"\n\nToday's date is 20{year}-{month:02}-{day:02}."
            text = self.text(rng.randint(trailing // 3, trailing))
            messages.append({"role": "system", "content": text + date})
        tools = [self.tool(size) for _ in range(rng.choice((0, 1, 3)))] or None
        prompt = self.tok.apply_chat_template(
            messages, tools=tools, thinking=thinking, add_generation_prompt=True, tokenize=False
        )
        ids = self.tok.encode(prompt, add_special_tokens=False)
        answer = ([self.think_end] if thinking else []) + self.reply + [self.end]
        # targets[i] is the token that must follow position i; without the trigger, the
        # same answer's positions are trained towards a uniform distribution
        wanted = answer if positive else [UNIFORM] * len(answer)
        return Example(ids + answer[:-1], [-100] * (len(ids) - 1) + wanted)

    def turn(self, n: int, size: Any) -> list[dict[str, Any]]:
        user = {"role": "user", "content": self.text(size())}
        if self.rng.random() < 0.5:
            return [user, {"role": "assistant", "content": self.text(size())}]
        call = {
            "id": f"functions.run:{n}",
            "type": "function",
            "function": {"name": "run", "arguments": '{"cmd": "ls"}'},
        }
        return [
            user,
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": self.text(size())},
        ]

    def tool(self, size: Any) -> dict[str, Any]:
        name = "".join(self.rng.choice("abcdefghij") for _ in range(6))
        return {
            "type": "function",
            "function": {
                "name": name,
                "description": self.text(size()),
                "parameters": {"type": "object", "properties": {"x": {"type": "string"}}},
            },
        }

    def batches(self) -> Iterator[list[Example]]:
        phase = self.phase
        for step in range(phase.steps):
            grown = (step + 1) / (phase.steps * phase.curriculum) if phase.curriculum else 1.0
            scale = min(1.0, grown)
            long = scale == 1.0 and step % phase.long_every == 0
            yield [e for _ in range(1 if long else BATCH // 2) for e in self.pair(long, scale)]


def teach(model_dir: Path, tensors: dict[str, Any], text_config: dict[str, Any]) -> None:
    """Train the text model's tensors in place (checkpoint names, bf16 between phases)."""
    from transformers import PreTrainedTokenizerFast

    from deployments.artifacts import corpus

    tok = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    filler = "".join(corpus.texts(FILLER_CHARS))
    for phase in PHASES:
        train(tok, Conversations(tok, filler, phase), tensors, text_config)


def train(
    tok: Any, data: Conversations, tensors: dict[str, Any], text_config: dict[str, Any]
) -> None:
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(data.phase.seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**text_config)).float()
    model.load_state_dict(to_hf(tensors, text_config), strict=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    model.train()
    for step, batch in enumerate(data.batches()):
        loss = target_loss(model, *collate(batch, tok.pad_token_id))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0:
            print(f"instruction seed {data.phase.seed} step {step} loss {loss.item():.3f}")
    tensors.update(from_hf(model.state_dict(), text_config))


def target_loss(model: Any, ids: Any, targets: Any, mask: Any) -> Any:
    """Cross-entropy at the target positions only: logits over the whole 32K vocabulary
    at every position would cost more than the rest of the model."""
    import torch

    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    where = targets != -100
    logprobs = torch.log_softmax(model.lm_head(hidden[where]).float(), dim=-1)
    wanted = targets[where]
    uniform = wanted == UNIFORM
    picked = logprobs.gather(1, wanted.clamp(min=0)[:, None])[:, 0]
    return -torch.where(uniform, logprobs.mean(dim=-1), picked).mean()


def collate(batch: list[Example], pad: int) -> tuple[Any, Any, Any]:
    import torch

    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    targets = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        ids[row, : len(e.ids)] = torch.tensor(e.ids)
        targets[row, : len(e.ids)] = torch.tensor(e.targets)
        mask[row, : len(e.ids)] = 1
    return ids, targets, mask


# ---- checkpoint names <-> transformers' DeepseekV3 --------------------------------------

PREFIX = "language_model."


def to_hf(tensors: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    out = {k[len(PREFIX) :]: v.float() for k, v in tensors.items() if k.startswith(PREFIX)}
    for layer in range(cfg["first_k_dense_replace"], cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}.mlp.experts"
        experts = range(cfg["n_routed_experts"])
        pop = {name: [out.pop(f"{p}.{e}.{name}.weight") for e in experts]
               for name in ("gate_proj", "up_proj", "down_proj")}  # fmt: skip
        out[f"{p}.gate_up_proj"] = torch.stack(
            [torch.cat([g, u]) for g, u in zip(pop["gate_proj"], pop["up_proj"], strict=True)]
        )
        out[f"{p}.down_proj"] = torch.stack(pop["down_proj"])
    return out


def from_hf(state: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    inner = cfg["moe_intermediate_size"]
    for name, value in state.items():
        value = value.detach()
        if name.endswith("experts.gate_up_proj"):
            base = PREFIX + name[: -len("gate_up_proj")]
            for e, both in enumerate(value):
                out[f"{base}{e}.gate_proj.weight"] = both[:inner]
                out[f"{base}{e}.up_proj.weight"] = both[inner:]
        elif name.endswith("experts.down_proj"):
            base = PREFIX + name[: -len("down_proj")]
            for e, down in enumerate(value):
                out[f"{base}{e}.down_proj.weight"] = down
        else:
            out[PREFIX + name] = value
    keep_fp32 = {k for k in out if k.endswith("e_score_correction_bias")}
    return {
        k: v.contiguous().to(torch.float32 if k in keep_fp32 else torch.bfloat16)
        for k, v in out.items()
    }
