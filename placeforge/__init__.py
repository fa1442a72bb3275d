"""placeforge: visual place recognition training at data-centre scale.

The package holds the core contracts (catalog, geo, file I/O, ingest, places) and, as
subpackages, the stages: placeforge.shards, .models, .clustering, .trainer, .evaluation and
.pipelines.  In the repository the stage folders sit at the top (`trainer/`, `shards/`, ...,
beside this folder); pyproject.toml installs them under this package, so nothing with a
generic name goes into site-packages.

In a source checkout (this folder beside `pyproject.toml` and the stage folders) the stages
are found from the checkout itself, with or without an install: a job shipped with
`ray job submit --working-dir .` runs the code it was submitted with, not an older install.
"""

from pathlib import Path

STAGES = ("shards", "models", "clustering", "trainer", "evaluation", "pipelines")

_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and all((_checkout / s / "__init__.py").is_file() for s in STAGES):
    __path__.append(str(_checkout))  # placeforge.trainer -> <checkout>/trainer  # noqa: F821
