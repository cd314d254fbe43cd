"""The layers of docs/architecture.md, checked on the code: imports go one way
(ingress -> adapters -> pipeline -> the rest of serve_app -> deployments), the pipeline
knows nothing of HTTP, and no function in serve_app needs a second screen."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVE_APP = ROOT / "serve_app"
HTTP = ("fastapi", "starlette")


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def layer(module: str) -> int:
    """Higher imports lower, never the other way."""
    if module == "serve_app.ingress" or module == "serve_app.app":
        return 4
    if module.startswith("serve_app.api"):
        return 3
    if module == "serve_app.pipeline":
        return 2
    if module.startswith("serve_app."):
        return 1
    return 0  # deployments, libraries


def test_imports_go_one_way():
    upward = []
    for path in sorted(SERVE_APP.rglob("*.py")):
        here = module_name(path)
        for target in imports(path):
            if target.startswith(("serve_app", "deployments")) and layer(target) > layer(here):
                upward.append(f"{here} imports {target}")
    assert not upward, upward
    for path in sorted((ROOT / "deployments").rglob("*.py")):
        assert not any(t.startswith("serve_app") for t in imports(path)), path


def test_the_pipeline_and_what_it_uses_know_nothing_of_http():
    below_adapters = [p for p in SERVE_APP.rglob("*.py") if layer(module_name(p)) <= 2]
    for path in below_adapters:
        http = {t for t in imports(path) if t.startswith(HTTP)}
        assert not http, f"{module_name(path)} imports {http}"


def test_no_function_needs_a_second_screen():
    long = []
    for path in sorted(SERVE_APP.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > 45:
                    long.append(f"{module_name(path)}.{node.name}: {lines} lines")
    assert not long, long
