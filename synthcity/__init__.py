"""A procedurally generated city, photographed from the street, written as real VPR datasets.

`generate(out_dir, cfg)` writes an `@`-named dataset (SF-XL / Pitts / Tokyo 24/7
style: train, test/database, test/queries) of a city placed at San Francisco,
a val/database + val/queries split made like the test split in a third city
5 km east of it (for tuning; the test split is for reporting), and a
GSV-Cities style dataset of a second city at Melbourne, so the ingest code
sees both formats, both hemispheres and two UTM zones.  It is the
embedded data of the demo and the tests; `python -m synthcity --help`
describes the layout.

Modules by role: `city` (the scene model), `facade` / `ground` / `sprites` /
`render` (the ray caster), `conditions` (time, weather, camera defects),
`plan` (places, poses, splits), `naming` (coordinates and file names),
`write` (files on disk) and `synth_config` (the config).  Importing this
package is cheap: the submodules load on first use.

A package of its own beside `placeforge`, not inside it: it imports the core
(`placeforge.config`, `geo`, `fileio`, `logs`) and nothing above it, and only the
command line (`placeforge synth`), benchmarks and tests import it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from synthcity.synth_config import SynthConfig

__all__ = ["SynthConfig", "generate"]


def generate(out_dir: Path, cfg: "SynthConfig", *, overwrite: bool = False, progress: bool = False) -> dict:
    """Write the synthetic datasets under `out_dir`; see `synthcity.write.generate`."""
    from synthcity.write import generate as _generate

    return _generate(Path(out_dir), cfg, overwrite=overwrite, progress=progress)


def __getattr__(name: str):
    if name == "SynthConfig":
        from synthcity.synth_config import SynthConfig

        return SynthConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
