"""Text to train the tiny model's tokenizer on: code and English found on this machine.

Agent clients send tens of kilobytes of tool schemas, code and prose a turn; a tokenizer
trained on generated words spends more than one token every two characters on that text.
The source files and docs of the project's own pinned runtime dependencies are real code
and English (docstrings, READMEs), on every machine that can run the project, and the
same bytes wherever the same versions are installed. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import metadata

# Pinned runtime dependencies (pyproject.toml); each gives at most an equal share.
PACKAGES = (
    "ray",
    "openai",
    "pydantic",
    "fastapi",
    "starlette",
    "httpx",
    "jinja2",
    "cryptography",
)
SUFFIXES = (".py", ".md", ".rst", ".txt", ".pyi", ".json", ".toml", ".yaml", ".js", ".ts")
MAX_FILE_CHARS = 200_000  # generated tables and vendored bundles teach little


def versions() -> dict[str, str]:
    """The corpus's identity: the same versions give the same text."""
    return {name: metadata.version(name) for name in PACKAGES}


def texts(total_chars: int) -> Iterator[str]:
    share = total_chars // len(PACKAGES)
    for name in PACKAGES:
        yield from _package_texts(name, share)


def _package_texts(name: str, budget: int) -> Iterator[str]:
    dist = metadata.distribution(name)
    files = sorted(str(f) for f in dist.files or () if str(f).endswith(SUFFIXES))
    for rel in files:
        if ".dist-info" in rel or "__editable__" in rel:
            continue  # install records hold this machine's paths
        try:
            text = dist.locate_file(rel).read_text(encoding="utf-8")  # type: ignore[union-attr]
        except (OSError, UnicodeDecodeError):
            continue
        if not text or len(text) > MAX_FILE_CHARS:
            continue
        yield text
        budget -= len(text)
        if budget <= 0:
            return
