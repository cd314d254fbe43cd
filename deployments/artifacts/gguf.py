"""GGUF artifacts of the tiny model for the llama.cpp tiers (standard Q4_K_M, budget Q2_K).

The tiny model converts with llama.cpp's own `convert_hf_to_gguf.py`; its tokenizer is a
plain GPT-2 byte-level BPE whose hash llama.cpp does not know, so the conversion names
the pre-tokenizer explicitly. The chat template and special tokens travel in the GGUF
metadata, so llama-server renders Kimi's format and parses Kimi tool calls. The vision
tower and projector convert apart, as llama.cpp's `--mmproj` file (F16, as published for
K2.5), which `llama-server --mmproj` loads beside either quant.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from deployments.artifacts.cache import cached_build
from deployments.artifacts.llama_cpp import LLAMA_CPP_VERSION, converter_dir, llama_binary
from deployments.artifacts.tiny_model import ensure_tiny_model

QUANTS = {"Q4_K_M", "Q2_K", "Q8_0", "F16"}

_CONVERT = """
import sys
sys.path.insert(0, sys.argv[1])
sys.argv = [sys.argv[1] + "/convert_hf_to_gguf.py", *sys.argv[2:]]
import convert_hf_to_gguf
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
convert_hf_to_gguf.main()
"""


MMPROJ = "mmproj-tiny-kimi-F16.gguf"


def gguf_name(quant: str) -> str:
    return f"tiny-kimi-{quant}.gguf"


def ensure_tiny_gguf(quant: str) -> Path:
    if quant not in QUANTS:
        raise ValueError(f"unknown quant {quant!r}; choose one of {sorted(QUANTS)}")
    model_dir = ensure_tiny_model()
    name = f"{model_dir.name}-gguf-{quant}-llama.cpp-{LLAMA_CPP_VERSION}"

    def build(out: Path) -> None:
        f16 = out / gguf_name("F16")
        _convert(model_dir, f16)
        if quant != "F16":
            _run(
                [str(llama_binary("llama-quantize")), str(f16), str(out / gguf_name(quant)), quant]
            )
            f16.unlink()

    return cached_build(name, build) / gguf_name(quant)


def ensure_tiny_mmproj() -> Path:
    """The vision tower and projector of the tiny model as llama.cpp's mmproj file."""
    model_dir = ensure_tiny_model()
    name = f"{model_dir.name}-mmproj-llama.cpp-{LLAMA_CPP_VERSION}"
    return cached_build(name, lambda out: _convert(model_dir, out / MMPROJ, "--mmproj")) / MMPROJ


def _convert(model_dir: Path, outfile: Path, *extra: str) -> None:
    argv = [str(model_dir), "--outfile", str(outfile), "--outtype", "f16", *extra]
    _run([sys.executable, "-c", _CONVERT, str(converter_dir()), *argv])


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{Path(cmd[0]).name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )


def read_gguf_header(path: Path) -> dict[str, object]:
    """File type, chat template, vocabulary size and weights' bytes read back from a GGUF
    file."""
    sys.path.insert(0, str(converter_dir() / "gguf-py"))
    import gguf

    reader = gguf.GGUFReader(str(path))

    def field(key: str) -> object:
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    ftype = field("general.file_type")
    return {
        "architecture": field("general.architecture"),
        "file_type": ftype,
        "file_type_name": gguf.LlamaFileType(ftype).name if isinstance(ftype, int) else None,
        "chat_template": field("tokenizer.chat_template"),
        "tokens": len(reader.fields["tokenizer.ggml.tokens"].data),
        "tensor_bytes": sum(int(t.n_bytes) for t in reader.tensors),  # the file less metadata
    }
