"""Every Python and shell block of README.md and docs/*.md, run as printed against the test
cluster, so a stale example fails here. Only the app's address is changed (the doc says
`http://127.0.0.1:8000`); a shell block runs from the project's root, a Python block
in a directory holding a `photo.png`, both with the environment a reader is told to
have (`KIMI_API_KEY`, `KIMI_SERVE_ADMIN_TOKEN`, `KIMI_SERVE_URL`). A block that cannot
run here says why in an HTML comment above it (`<!-- not run: why -->`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.integration.conftest import ADMIN_TOKEN, ROOT, new_key

pytestmark = pytest.mark.integration

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(
    r"(?:<!-- not run: (?P<why>[^>]*?) -->\n)?^```(?P<lang>python|bash)\n(?P<code>.*?)^```",
    re.S | re.M,
)


def blocks() -> list[object]:
    found = []
    for path in DOCS:
        text = path.read_text()
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start("code")) + 1
            name = f"{path.relative_to(ROOT)}:{line}"
            found.append(pytest.param(m["lang"], m["code"], m["why"], id=name))
    return found


def test_the_docs_have_blocks_to_run():
    assert sum(1 for b in blocks() if b.values[2] is None) >= 6


@pytest.mark.parametrize(("lang", "code", "why"), blocks())
def test_a_doc_block_runs_as_printed(lang, code, why, serve_url, admin, tmp_path: Path):
    if why:
        pytest.skip(why)
    host = serve_url.removeprefix("http://")
    code = code.replace("http://127.0.0.1:8000", serve_url).replace("localhost:8000", host)
    key, _ = new_key(admin, "enterprise")
    env = {
        **os.environ,
        "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
        "KIMI_API_KEY": key,
        "KIMI_SERVE_ADMIN_TOKEN": ADMIN_TOKEN,
        "KIMI_SERVE_URL": serve_url,
    }
    Image.new("RGB", (64, 48), (200, 120, 40)).save(tmp_path / "photo.png")
    if lang == "python":
        argv, cwd = [sys.executable, "-c", code], tmp_path
    else:
        argv, cwd = ["bash", "-euo", "pipefail", "-c", code], ROOT
    run = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-3000:])
    assert run.stdout.strip(), "the block printed nothing"
    assert '"error"' not in run.stdout, run.stdout[-2000:]  # a curl's answer is no error
