"""The floor plan, drawn from the code: imports point down the layers and never in a cycle.

    core (placeforge: catalog, geo, file I/O, config, ingest) -> shards -> models
        -> clustering / trainer / evaluation -> pipelines (jobs and the command line)

`synthcity` (the synthetic city) is a package of its own beside them: it may import the core,
and only the command line, benchmarks and tests import it, so it sits at the stages' height and
nothing below pipelines may import it.  Every import counts, also a lazy one inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYER = {"placeforge": 0, "shards": 1, "models": 2, "clustering": 3, "trainer": 3, "evaluation": 3,
         "synthcity": 3, "pipelines": 4}
# Layer numbers alone would let a stage and the city import each other (both at 3), so the city's
# neighbours are spelled out: what it may import, and who may import it.
SYNTHCITY_IMPORTS = {"placeforge"}
SYNTHCITY_IMPORTED_BY = {"pipelines"}


def package_of(module: str) -> str | None:
    """'synthcity.city' -> 'synthcity', 'trainer.data' -> 'trainer', 'numpy' -> None."""
    top = module.split(".")[0]
    return top if top in LAYER else None


def import_edges() -> set[tuple[str, str, str]]:
    """(importing package, imported package, file) for every project import in the packages."""
    edges = set()
    for top in LAYER:
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


def rule_breaks(edges: set[tuple[str, str, str]]) -> list[str]:
    """'file: src -> dst' for each edge that points up a layer or crosses the city's fence."""
    breaks = []
    for src, dst, file in edges:
        upward = LAYER[dst] > LAYER[src]
        into_city = dst == "synthcity" and src not in SYNTHCITY_IMPORTED_BY
        out_of_city = src == "synthcity" and dst not in SYNTHCITY_IMPORTS
        if upward or into_city or out_of_city:
            breaks.append(f"{file}: {src} -> {dst}")
    return sorted(breaks)


def test_package_of():
    assert package_of("synthcity.city") == "synthcity"
    assert package_of("synthcity") == "synthcity"
    assert package_of("placeforge.catalog") == "placeforge"
    assert package_of("models.encoders") == "models"
    assert package_of("numpy.linalg") is None


def test_rule_breaks_on_hand_made_edges():
    allowed = {("pipelines", "synthcity", "pipelines/cli.py"), ("synthcity", "placeforge", "synthcity/write.py"),
               ("trainer", "models", "trainer/train.py"), ("shards", "placeforge", "shards/build.py")}
    assert rule_breaks(allowed) == []
    assert rule_breaks({("shards", "trainer", "shards/build.py")}) == ["shards/build.py: shards -> trainer"]
    fenced = {("placeforge", "synthcity", "placeforge/geo.py"), ("trainer", "synthcity", "trainer/data.py"),
              ("synthcity", "shards", "synthcity/write.py"), ("synthcity", "pipelines", "synthcity/plan.py")}
    assert rule_breaks(fenced) == ["placeforge/geo.py: placeforge -> synthcity",
                                   "synthcity/plan.py: synthcity -> pipelines",
                                   "synthcity/write.py: synthcity -> shards",
                                   "trainer/data.py: trainer -> synthcity"]


def test_no_import_points_up_a_layer():
    assert rule_breaks(import_edges()) == []


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
                                    "pipelines", "synthcity", "benchmarks"])
def test_no_sys_path_edits(folder):
    offenders = [str(p.relative_to(REPO)) for p in (REPO / folder).rglob("*.py") if "sys.path" in p.read_text()]
    assert offenders == []
