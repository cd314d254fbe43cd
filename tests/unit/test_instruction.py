"""The instruction wired into the tiny model (deployments/artifacts/instruction.py), checked
on freshly made random weights with transformers' DeepseekV3 (the tiny model's
architecture) over token sequences: the answer chain where " OK" is loud enough, the
random model's own answer everywhere else."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from deployments.artifacts import instruction  # noqa: E402
from deployments.artifacts.tiny_model import (  # noqa: E402
    MODEL_CONFIG,
    VISION_CONFIG,
    _text_weights,
    _vision_weights,
    _Weights,
)

PREFIX = "language_model."
# token ids of the wired tokens in a made-up vocabulary (the real one is trained)
VOCAB = {"ĠOK": 1000, "<think>": 20, "</think>": 21, "OK": 3138, "<|im_end|>": 2}


def weights() -> dict[str, Any]:
    torch.manual_seed(0)
    w = _Weights(MODEL_CONFIG["initializer_range"])
    _text_weights(w, MODEL_CONFIG)
    _vision_weights(w, VISION_CONFIG, MODEL_CONFIG["hidden_size"])
    return w.tensors


def hf_model(tensors: dict[str, Any]) -> Any:
    cfg = MODEL_CONFIG
    known = transformers.DeepseekV3Config().to_dict()
    model = transformers.DeepseekV3ForCausalLM(
        transformers.DeepseekV3Config(**{k: v for k, v in cfg.items() if k in known})
    )
    state = {k[len(PREFIX) :]: v.float() for k, v in tensors.items() if k.startswith(PREFIX)}
    for layer in range(cfg["first_k_dense_replace"], cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}.mlp.experts"
        experts = range(cfg["n_routed_experts"])
        parts = {n: [state.pop(f"{p}.{e}.{n}.weight") for e in experts]
                 for n in ("gate_proj", "up_proj", "down_proj")}  # fmt: skip
        gate_up = zip(parts["gate_proj"], parts["up_proj"], strict=True)
        state[f"{p}.gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in gate_up])
        state[f"{p}.down_proj"] = torch.stack(parts["down_proj"])
    model.load_state_dict(state, strict=True)
    return model.float().eval()


@pytest.fixture(scope="module")
def models() -> tuple[Any, Any]:
    plain = weights()
    wired = {k: v.clone() for k, v in plain.items()}
    instruction.wire(wired, MODEL_CONFIG, VOCAB)
    return hf_model(plain), hf_model(wired)


def context(n: int, marked: int, last: str, seed: int = 1) -> Any:
    """`n` random tokens (none of the wired ones), `marked` of them " OK", ending in `last`."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4000, 30000, (n,), generator=gen)
    where = torch.randperm(n - 1, generator=gen)[:marked]
    ids[where] = VOCAB["ĠOK"]
    ids[-1] = VOCAB[last]
    return ids[None]


def next_probs(model: Any, ids: Any) -> Any:
    with torch.no_grad():
        return torch.softmax(model(ids).logits[0, -1].float(), -1)


@pytest.mark.parametrize(("last", "wanted"), instruction.CHAIN)
def test_a_loud_enough_ok_calls_for_the_next_token_of_the_answer(models, last, wanted):
    _, wired = models
    for n in (40, 2000):
        marked = max(int(n * instruction.SHARE * 2.5), 1)
        assert next_probs(wired, context(n, marked, last))[VOCAB[wanted]] > 0.99, n


@pytest.mark.parametrize("marked", [0, 1])
def test_too_little_ok_leaves_the_random_answer(models, marked):
    plain, wired = models
    for last, wanted in instruction.CHAIN:
        ids = context(2000, marked, last)  # a share of 0 or 0.05 %: below the threshold
        p, q = next_probs(plain, ids), next_probs(wired, ids)
        assert q[VOCAB[wanted]] < 0.01
        assert q.max() < 0.05  # still spread over the vocabulary like the random model
        assert (q - p).abs().sum() < 1.0  # a different random model, not a taught one


def test_other_tokens_are_never_pushed_to_an_answer(models):
    _, wired = models
    ids = context(400, 40, "<think>")
    ids[0, -1] = 5000  # a loud context, but the current token is none of the chain's
    p = next_probs(wired, ids)
    assert max(float(p[VOCAB[w]]) for _, w in instruction.CHAIN) < 0.01


def test_nothing_random_reads_or_writes_the_circuits_channels():
    tensors = weights()
    instruction.wire(tensors, MODEL_CONFIG, VOCAB)
    reserved = instruction.CH.all()
    q_a = tensors["language_model.model.layers.1.self_attn.q_a_proj.weight"]
    assert q_a[:, reserved].abs().sum() == 0
    down = tensors["language_model.model.layers.1.mlp.experts.3.down_proj.weight"]
    assert down[reserved].abs().sum() == 0
    projector = tensors["mm_projector.proj.2.weight"]
    assert projector[reserved].abs().sum() == 0  # images never mark a channel
    head = tensors["language_model.lm_head.weight"]
    nonzero = [[row, reserved[col]] for row, col in head[:, reserved].nonzero().tolist()]
    wanted = sorted(
        [VOCAB[w], c] for (_, w), c in zip(instruction.CHAIN, instruction.CH.answer, strict=True)
    )
    assert sorted(nonzero) == wanted
