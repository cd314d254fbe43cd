"""The tiny model's byte-level vocabulary, for tests that steer llama.cpp's sampler at
tokens with particular bytes (by `logit_bias`)."""

from __future__ import annotations

import functools

from deployments.artifacts.tiny_model import ensure_tiny_model


@functools.cache
def vocab() -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_tiny_model()).get_vocab()


@functools.cache
def token_bytes() -> dict[int, bytes]:
    """Each byte-level token's bytes (special tokens, which are no bytes, left out)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    return {
        i: bytes(to_byte[c] for c in text)
        for text, i in vocab().items()
        if all(c in to_byte for c in text)
    }


def half_character_token() -> int:
    """A token that is a space and the first byte of a two-byte character: its text is
    incomplete UTF-8 until a token after it completes the character."""
    return min(
        i for i, b in token_bytes().items() if len(b) == 2 and b[0] == 0x20 and 0xC2 <= b[1] <= 0xDF
    )
