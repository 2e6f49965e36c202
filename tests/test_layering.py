"""Imports point down only, and front ends share the engine client instead of each other:

    cli -> interactive -> api | server -> terminal -> openai -> engine -> pipeline -> models -> lora

`api` and `server` are peers (neither imports the other); sampling imports nothing of ours and only
the engine imports it; nothing imports the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "mistralrs_py"
LEVEL = {
    "cli": 0,
    "interactive": 1,
    "evaluate": 1,
    "api": 2,
    "server": 2,
    "terminal": 3,
    "openai": 4,
    "engine": 5,
    "pipeline": 6,
    "models": 7,
    "lora": 8,
}


def layer(module: str) -> str | None:
    head = module.split(".")[0]
    return head if head in LEVEL or head == "sampling" else None


def imports(path: Path, pkg: Path):
    rel = path.relative_to(pkg).with_suffix("")
    parts = list(rel.parts)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = parts[: len(parts) - node.level]
            yield ".".join([*base, *(node.module.split(".") if node.module else [])])
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mistralrs_py."):
            yield node.module.removeprefix("mistralrs_py.")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mistralrs_py."):
                    yield alias.name.removeprefix("mistralrs_py.")


def violations(pkg: Path = PKG) -> list[tuple[str, str]]:
    bad = []
    for path in pkg.rglob("*.py"):
        src = layer(".".join(path.relative_to(pkg).with_suffix("").parts))
        if src is None:
            continue
        for target in imports(path, pkg):
            dst = layer(target)
            if dst is None or dst == src:
                continue
            if dst == "cli" and path != pkg / "__main__.py":
                ok = False  # NOTE: nothing imports the CLI itself
            elif src == "sampling":
                ok = False
            elif dst == "sampling":
                ok = src == "engine"
            else:
                ok = LEVEL[dst] > LEVEL[src]
            if not ok:
                bad.append((str(path.relative_to(pkg)), target))
    return bad


def test_imports_point_down():
    assert not violations()


def test_the_check_sees_a_bad_import(tmp_path):
    """The walk above must catch upward and sideways imports (it would pass on an empty package)."""
    pkg = tmp_path / "mistralrs_py"
    (pkg / "engine").mkdir(parents=True)
    (pkg / "engine" / "x.py").write_text("from ..server import app\nfrom ..api import Runner\nfrom ..engine import y\n")
    (pkg / "api.py").write_text("from .server.app import create_app\nfrom .openai import service\n")
    assert sorted(violations(pkg)) == [("api.py", "server.app"), ("engine/x.py", "api"), ("engine/x.py", "server")]
