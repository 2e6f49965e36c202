"""Imports point down only: cli -> server -> engine -> pipeline -> models -> lora; sampling imports only torch."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "mistralrs_py"
ORDER = ["cli", "server", "engine", "pipeline", "models", "lora"]
# NOTE: front ends beside the CLI (the terminal chat, the Python API): they may import anything
# below them, and nothing below may import them.
CLI_LEVEL = {"cli", "interactive", "api"}


def layer(module: str) -> str | None:
    head = module.split(".")[0]
    if head in CLI_LEVEL:
        return "cli"
    return head if head in ORDER or head == "sampling" else None


def imports(path: Path):
    rel = path.relative_to(PKG).with_suffix("")
    parts = list(rel.parts)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = parts[: len(parts) - node.level]
            yield ".".join([*base, *(node.module.split(".") if node.module else [])])
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mistralrs_py."):
            yield node.module.removeprefix("mistralrs_py.")


def test_imports_point_down():
    bad = []
    for path in PKG.rglob("*.py"):
        src = layer(".".join(path.relative_to(PKG).with_suffix("").parts))
        if src is None:
            continue
        for target in imports(path):
            if target.split(".")[0] == "cli" and path != PKG / "cli.py" and path != PKG / "__main__.py":
                bad.append((path.name, target))  # NOTE: nothing imports the CLI itself
            dst = layer(target)
            if dst is None or dst == src:
                continue
            if src == "sampling" or dst == "cli":
                bad.append((path.name, target))
            elif dst != "sampling" and ORDER.index(dst) < ORDER.index(src):
                bad.append((path.name, target))
            elif dst == "sampling" and src not in ("engine",):
                bad.append((path.name, target))
    assert not bad, bad
