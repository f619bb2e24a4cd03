"""The pure core and the store never import I/O frameworks (STYLE.md, practice 1)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "harmonicd"
BANNED = {"asyncio", "aiohttp", "pyudev", "watchdog", "socket", "subprocess"}


@pytest.mark.parametrize("layer", ["core", "store"])
def test_layer_imports_no_io_framework(layer: str) -> None:
    found = []
    for path in sorted((PKG / layer).glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                if n.split(".")[0] in BANNED:
                    found.append(f"{path.name}: {n}")
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("harmonicd.services"):
                found.append(f"{path.name}: {node.module} (a lower layer may not import services)")
    assert not found, found
