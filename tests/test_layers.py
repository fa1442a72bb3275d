"""The floor plan, drawn from the code: imports point down the layers and never in a cycle.

    core (placeforge: catalog, geo, file I/O, config, ingest) -> shards -> models
        -> clustering / trainer / evaluation -> pipelines (jobs and the command line)

`placeforge.synth` (the synthetic city) is a leaf of its own above the core that only the
command line, benchmarks and tests use.  Every import counts, also a lazy one inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYER = {"placeforge": 0, "shards": 1, "models": 2, "clustering": 3, "trainer": 3, "evaluation": 3,
         "placeforge.synth": 3, "pipelines": 4}


def package_of(module: str) -> str | None:
    """'placeforge.synth.city' -> 'placeforge.synth', 'trainer.data' -> 'trainer', 'numpy' -> None."""
    if module == "placeforge.synth" or module.startswith("placeforge.synth."):
        return "placeforge.synth"
    top = module.split(".")[0]
    return top if top in LAYER else None


def import_edges() -> set[tuple[str, str, str]]:
    """(importing package, imported package, file) for every project import in the packages."""
    edges = set()
    for top in ("placeforge", "shards", "models", "clustering", "trainer", "evaluation", "pipelines"):
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO)
            source = package_of(".".join(rel.with_suffix("").parts))
            for node in ast.walk(ast.parse(path.read_text(), str(rel))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
                else:
                    continue
                for name in names:
                    target = package_of(name)
                    if target is not None and target != source:
                        edges.add((source, target, str(rel)))
    return edges


def test_package_of():
    assert package_of("placeforge.synth.city") == "placeforge.synth"
    assert package_of("placeforge.catalog") == "placeforge"
    assert package_of("models.encoders") == "models"
    assert package_of("numpy.linalg") is None


def test_no_import_points_up_a_layer():
    upward = sorted(f"{file}: {src} -> {dst}" for src, dst, file in import_edges() if LAYER[dst] > LAYER[src])
    assert upward == []


def test_package_imports_have_no_cycle():
    graph: dict[str, set[str]] = {}
    for src, dst, _ in import_edges():
        graph.setdefault(src, set()).add(dst)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(p for p in graph if reaches(p, p, {p}))
    assert cycles == []


@pytest.mark.parametrize("folder", ["placeforge", "shards", "models", "clustering", "trainer", "evaluation",
                                    "pipelines", "benchmarks"])
def test_no_sys_path_edits(folder):
    offenders = [str(p.relative_to(REPO)) for p in (REPO / folder).rglob("*.py") if "sys.path" in p.read_text()]
    assert offenders == []
