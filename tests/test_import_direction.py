"""The packages import one way (docs/architecture.md, "Packages and import direction"): each may
import only the packages listed for it here, so a new upward import fails this test by name."""

from __future__ import annotations

import ast
from pathlib import Path

import scifm

ROOT = Path(scifm.__file__).parent

# package (or top-level module) -> what it may import; every package may import itself
ALLOWED = {
    "core": set(),
    "tokenizers": {"core"},
    "data": {"core", "tokenizers"},
    "model": {"core"},
    "parallel": {"core", "megatron", "model"},
    "hf": {"core", "model", "tokenizers"},
    "megatron": {"core", "model"},
    "config": {"core", "data", "model", "parallel"},
    "train": {"core", "config", "data", "hf", "model", "parallel", "tokenizers"},
    "eval": {"core", "config", "data", "model", "tokenizers", "train"},
    "launch": {"core", "config", "eval", "parallel", "train"},
    "plan": {"core", "config", "data", "model", "parallel", "tokenizers"},
    "cli": {"core", "config", "data", "eval", "launch", "model", "plan", "train"},
    "configs": set(),  # the packaged YAML files
    "__init__": set(),
}


def package_imports() -> dict[tuple[str, str], list[str]]:
    """(importer, imported) -> the files and modules behind that edge."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in ROOT.rglob("*.py"):
        src = path.relative_to(ROOT).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                parts = name.split(".")
                if parts[0] == "scifm" and len(parts) > 1 and parts[1] != src:
                    edges.setdefault((src, parts[1]), []).append(f"{path.relative_to(ROOT.parent)} imports {name}")
    return edges


def test_every_package_is_listed() -> None:
    packages = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in ROOT.rglob("*.py")}
    assert packages <= set(ALLOWED), f"add {sorted(packages - set(ALLOWED))} to ALLOWED with its place in the layering"


def test_imports_go_one_way() -> None:
    upward = [where for (src, dst), wheres in sorted(package_imports().items()) if dst not in ALLOWED[src]
              for where in wheres]
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_the_layering_has_no_cycle() -> None:
    # the allowed graph itself must be acyclic, or ALLOWED would permit what this test forbids
    order: list[str] = []
    remaining = {k: set(v) for k, v in ALLOWED.items()}
    while remaining:
        ready = sorted(k for k, deps in remaining.items() if deps <= set(order))
        assert ready, f"cycle among {sorted(remaining)}"
        order += ready
        for k in ready:
            del remaining[k]
