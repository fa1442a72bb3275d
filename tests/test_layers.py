"""The floor plan, drawn from the code: imports point down the layers and never in a cycle.

    core (placeforge: catalog, geo, file I/O, config, ingest) -> shards -> models
        -> clustering / trainer / evaluation -> pipelines (jobs and the command line)

`synthcity` (the synthetic city) is a package of its own beside them: it may import the core,
and only the command line, benchmarks and tests import it, so it sits at the stages' height and
nothing below pipelines may import it.  Every import counts, also a lazy one inside a function.
"""

from __future__ import annotations

import ast
import subprocess
import sys
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
    """'synthcity.city' -> 'synthcity', 'placeforge.trainer.data' -> 'trainer', 'numpy' -> None.

    The stages install as placeforge.<stage> but live in top-level folders, so a file's own
    module name ('trainer/data.py' -> 'trainer.data') is read without the prefix.
    """
    parts = module.split(".")
    if parts[0] == "placeforge" and len(parts) > 1 and parts[1] in LAYER:
        parts = parts[1:]
    return parts[0] if parts[0] in LAYER else None


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
    assert package_of("placeforge") == "placeforge"
    assert package_of("placeforge.models.encoders") == "models"
    assert package_of("placeforge.trainer") == "trainer"
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


def test_pyproject_installs_every_package_under_two_names():
    """Every folder with an __init__.py is installed, the stages as placeforge.<stage>, and only
    `placeforge` and `synthcity` are top-level names in site-packages."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {p.parent.relative_to(REPO).as_posix() for p in REPO.glob("**/__init__.py")
               if not p.is_relative_to(REPO / "tests") and ".venv" not in p.parts and "runs" not in p.parts}
    package_dir = setuptools["package-dir"]
    declared = {package_dir.get(name, name.replace(".", "/")) for name in setuptools["packages"]}
    assert declared == folders
    assert {name.split(".")[0] for name in setuptools["packages"]} == {"placeforge", "synthcity"}
    assert sorted(package_dir) == sorted(f"placeforge.{stage}" for stage in LAYER if stage not in
                                         ("placeforge", "synthcity"))


def test_stages_import_as_placeforge_subpackages_only(tmp_path):
    """Outside the checkout (another working directory), `trainer` is not importable; placeforge.trainer is."""
    probe = ("import importlib.util as u; import placeforge.trainer, placeforge.pipelines.cli; "
             "print([u.find_spec(n) is None for n in ('trainer', 'shards', 'models', 'clustering', 'evaluation', "
             "'pipelines')])")
    found = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                           env={"PATH": "/usr/bin:/bin"})
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == str([True] * 6)
