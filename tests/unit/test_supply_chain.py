"""Dependencies are pinned exactly, so what was tested is what installs."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
PINNED = re.compile(r"^[A-Za-z0-9_.\-]+(\[[a-z,]+\])?==[0-9][0-9A-Za-z.+\-]*$")


def test_every_dependency_is_pinned_exactly():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    deps = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        deps += extra
    loose = [d for d in deps if not PINNED.match(d)]
    assert deps and not loose, loose
