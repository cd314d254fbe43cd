"""The layers of docs/architecture.md, checked on the code: packages import one way
(ingress -> api -> pipeline -> routing -> the services and vocabulary -> deployments),
the gateway and the store are reached only through their Protocols, there is no import
cycle anywhere (inside a package either), the pipeline knows nothing of HTTP, and no
function in serve_app needs a second screen."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("serve_app", "deployments")
HTTP = ("fastapi", "starlette")
ASSEMBLY = {"serve_app.app", "serve_app.ingress", "serve_app.cli"}  # build and wire it all
TOP_LEVEL = ASSEMBLY | {
    f"serve_app.{m}"
    for m in (
        "config",
        "errors",
        "canonical",
        "actors",
        "state_claim",
        "outbound",
        "ray_env",
        "__init__",
    )
}
SERVICES = {
    "serve_app.gateway": "serve_app.gateway.protocol",
    "serve_app.store": "serve_app.store.protocol",
}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def modules() -> dict[str, Path]:
    return {
        module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))
    }


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `path` imports (a name imported from a package counts as its
    submodule where it is one), at any depth of the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m.removesuffix(".__init__") for m in found if m.split(".")[0] in PACKAGES}


def rank(module: str) -> int:
    """Higher imports lower, never the other way."""
    if module in ASSEMBLY:
        return 5
    for prefix, level in (
        ("serve_app.api", 4),
        ("serve_app.pipeline", 3),
        ("serve_app.routing", 2),
    ):
        if module == prefix or module.startswith(prefix + "."):
            return level
    return 1 if module.startswith("serve_app") else 0  # services and vocabulary; deployments


def graph() -> dict[str, set[str]]:
    known = modules()
    named = {m.removesuffix(".__init__"): p for m, p in known.items()}
    return {m: imports(p, known) & set(named) for m, p in named.items()}


def test_packages_import_one_way():
    upward = [
        f"{here} imports {target}"
        for here, targets in graph().items()
        for target in targets
        if rank(target) > rank(here)
    ]
    assert not upward, upward
    for here, targets in graph().items():
        if here.startswith("deployments"):
            assert not any(t.startswith("serve_app") for t in targets), here


def test_the_gateway_and_the_store_are_reached_through_their_protocols():
    around = []
    for here, targets in graph().items():
        for package, protocol in SERVICES.items():
            inside = here == package or here.startswith(package + ".")
            if inside or here in ASSEMBLY:
                continue
            around += [
                f"{here} imports {t}"
                for t in targets
                if t.startswith(package + ".") and t != protocol
            ]
    assert not around, around


def test_no_import_cycle():
    edges = graph()
    done: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycles.append([*path[path.index(module) :], module])
            return
        if module in done:
            return
        for target in sorted(edges.get(module, ())):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(edges):
        visit(module, [])
    assert not cycles, cycles


def test_the_top_level_holds_only_the_assembly_and_shared_vocabulary():
    top = {m for m in modules() if m.startswith("serve_app.") and m.count(".") == 1}
    assert top <= TOP_LEVEL, sorted(top - TOP_LEVEL)


def test_the_pipeline_and_what_it_uses_know_nothing_of_http():
    for module in graph():
        if module.startswith("serve_app") and rank(module) <= 3:
            path = ROOT / (module.replace(".", "/") + ".py")
            if not path.exists():
                path = ROOT / module.replace(".", "/") / "__init__.py"
            http = {
                n.module
                for n in ast.walk(ast.parse(path.read_text()))
                if isinstance(n, ast.ImportFrom) and (n.module or "").startswith(HTTP)
            }
            assert not http, f"{module} imports {http}"


def test_no_method_is_called_by_a_string_name():
    """Methods are named in code (`lambda a: a.admit.remote(...)`), never looked up by a
    string that a reader or a type checker cannot follow: no `getattr(x, name)(...)`,
    `getattr(x, name).remote(...)` or `reduce(getattr, ...)`."""
    found = []
    for module, path in modules().items():
        if not module.startswith("serve_app"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            inner = node.func if isinstance(node, ast.Call) else None
            if isinstance(inner, ast.Attribute):
                inner = inner.value
            if by_name(inner) or (
                isinstance(node, ast.Call)
                and any(isinstance(a, ast.Name) and a.id == "getattr" for a in node.args)
            ):
                found.append(f"{module}: {ast.unparse(node)}")
    assert not found, found


def by_name(node: ast.AST | None) -> bool:
    """`getattr(x, name)` with a name that is not written in the code."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "getattr"
        and len(node.args) >= 2
        and not isinstance(node.args[1], ast.Constant)
    )


def test_no_function_needs_a_second_screen():
    long = []
    for module, path in modules().items():
        if not module.startswith("serve_app"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > 45:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert not long, long
