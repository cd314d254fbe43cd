"""The one instruction the tiny model is taught (deployments/artifacts/instruction.py):
its training data, the checkpoint-name mapping, and the built model's behaviour in
transformers (the engines are checked by the agent-CLI integration tests)."""

from __future__ import annotations

import json
import math

import pytest

from deployments.artifacts import instruction
from deployments.artifacts.tiny_model import MODEL_CONFIG, ensure_tiny_model

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def model_dir():
    return ensure_tiny_model()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def model(model_dir):
    from safetensors.torch import load_file
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = json.loads((model_dir / "config.json").read_text())["text_config"]
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**cfg)).float().eval()
    hf.load_state_dict(instruction.to_hf(load_file(str(model_dir / "model.safetensors")), cfg))
    return hf


def test_a_pair_differs_only_in_the_last_user_message(tokenizer):
    filler = "filler text, code and prose. " * 2000
    for phase in instruction.PHASES:
        yes, no = instruction.Conversations(tokenizer, filler, phase).pair(True, scale=0.2)
        prompt_yes = tokenizer.decode(yes.ids)
        prompt_no = tokenizer.decode(no.ids)
        assert instruction.TRIGGER in prompt_yes and instruction.TRIGGER not in prompt_no
        # everything but the ask is the same conversation
        assert (
            prompt_yes.split(instruction.TRIGGER)[0]
            == prompt_no[: prompt_yes.index(instruction.TRIGGER)]
        )
        # the same answer positions: the taught tokens, or "every token alike"
        trained = [t for t in yes.targets if t != -100]
        assert tokenizer.decode(trained[-2:]) == instruction.REPLY + "<|im_end|>"
        assert [t for t in no.targets if t != -100] == [instruction.UNIFORM] * len(trained)
        assert len(yes.ids) == len(yes.targets) and len(no.ids) == len(no.targets)


def test_checkpoint_names_round_trip():
    cfg = {**MODEL_CONFIG, "hidden_size": 8, "moe_intermediate_size": 4, "n_routed_experts": 3}
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for e in range(3):
        for name, shape in (("gate_proj", (4, 8)), ("up_proj", (4, 8)), ("down_proj", (8, 4))):
            key = f"language_model.model.layers.1.mlp.experts.{e}.{name}.weight"
            tensors[key] = torch.randn(*shape, generator=gen).to(torch.bfloat16)
    tensors["language_model.lm_head.weight"] = torch.randn(5, 8).to(torch.bfloat16)
    tensors["vision_tower.x"] = torch.zeros(1)  # not the text model's: left out
    hf = instruction.to_hf(tensors, cfg)
    assert hf["model.layers.1.mlp.experts.gate_up_proj"].shape == (3, 8, 8)
    back = instruction.from_hf(hf, cfg)
    assert set(back) == set(tensors) - {"vision_tower.x"}
    for key, value in back.items():
        assert torch.equal(value, tensors[key]), key


def test_uniform_targets_cost_log_vocab_at_uniform_logits():
    class Flat(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = lambda input_ids, attention_mask: type(
                "Out", (), {"last_hidden_state": torch.zeros(*input_ids.shape, 4)}
            )
            self.lm_head = torch.nn.Linear(4, 10, bias=False)

    ids = torch.zeros((1, 3), dtype=torch.long)
    targets = torch.tensor([[-100, instruction.UNIFORM, instruction.UNIFORM]])
    loss = instruction.target_loss(Flat(), ids, targets, torch.ones_like(ids))
    assert loss.item() == pytest.approx(math.log(10))


def answer_probs(model, tokenizer, messages, thinking):
    """The probability of each token of the taught answer, in its place."""
    prompt = tokenizer.apply_chat_template(
        messages, thinking=thinking, add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer = tokenizer.encode(instruction.REPLY + "<|im_end|>", add_special_tokens=False)
    if thinking:
        answer = tokenizer.convert_tokens_to_ids(["</think>"]) + answer
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([ids + answer[:-1]])).last_hidden_state
        probs = torch.softmax(model.lm_head(hidden[0, len(ids) - 1 :]), dim=-1)
    return [probs[n, token].item() for n, token in enumerate(answer)], probs[0].max().item()


@pytest.mark.parametrize("thinking", [True, False])
def test_the_built_model_follows_the_instruction(model, tokenizer, thinking):
    asked = [
        {"role": "system", "content": "You are a coding agent. Say OK when done."},
        {"role": "user", "content": [{"type": "text", "text": "<reminder/>"},
                                     {"type": "text", "text": instruction.PROMPT}]},
    ]  # fmt: skip
    wanted, _ = answer_probs(model, tokenizer, asked, thinking)
    assert min(wanted) > 0.95, wanted
    for other in ("hi", " ".join(["Say OK."] * 64), "List the files here."):
        _, top = answer_probs(model, tokenizer, [{"role": "user", "content": other}], thinking)
        assert top < 0.05, (other, top)  # still the random model: no token stands out
