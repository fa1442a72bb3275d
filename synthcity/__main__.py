"""Command line: `python -m synthcity --out DIR [--preset tiny] [--key value ...]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from placeforge.config import (
    ConfigError,
    add_config_arguments,
    check_output_folder,
    config_from_args,
    from_mapping,
    load_file,
)
from placeforge.logs import setup_logging
from synthcity.synth_config import PRESETS, SynthConfig, preset

DESCRIPTION = """\
Render a synthetic city from a street-level camera and write it as real VPR datasets.

Written under DIR (default sizes: 6770 images of 320x240, about a minute and a half on 2 cores):
  atname/train/*.jpg              training district: each place and heading seen train_captures
                                  times, first like the database, then under query conditions
  atname/test/database/*.jpg      test district (other streets), daylight, clear or overcast,
                                  one image per place and heading
  atname/test/queries/*.jpg       test district, night / dusk / rain / fog, jittered pose, traffic;
                                  every query has a database image within 25 m
  atname/val/database/*.jpg       validation split, made like the test split in a third city
  atname/val/queries/*.jpg        5 km east of the train/test one (no street shared with them):
                                  tune on val, report on test; --val-places 0 leaves it out
      names: @utm_east@utm_north@zone@letter@lat@lon@pano_id@tile_num@heading@pitch@roll@height
             @timestamp(YYYYMM)@note(condition)@.jpg   -- city origin: San Francisco (UTM 10S)
  gsv_cities/Dataframes/<City>.csv        place_id,year,month,northdeg,city_id,lat,lon,panoid
  gsv_cities/Images/<City>/<City>_<place_id:07d>_<year>_<month:02d>_<northdeg:03d>_<lat>_<lon>_<panoid>.jpg
                                  a second city (default SynthMelbourne, southern hemisphere)
  synth_manifest.json             resolved config, counts, origins; written last

Running again with the same config is a no-op; a different config into a non-empty
DIR is refused unless --overwrite.  Output is identical for any --workers.
"""


def resolve_config(args: argparse.Namespace) -> SynthConfig:
    """defaults (or --preset) <- --config file <- --key value flags."""
    if args.preset == "default":
        return config_from_args(SynthConfig, args)
    # The same precedence as config_from_args, starting from the preset's values.
    cfg = preset(args.preset)
    if args.config:
        cfg = from_mapping(SynthConfig, load_file(args.config), base=cfg, where=str(args.config))
    flags = {k[len("cfg__") :]: v for k, v in vars(args).items() if k.startswith("cfg__")}
    return from_mapping(SynthConfig, flags, base=cfg, where="command line")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m synthcity", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (created if missing)")
    parser.add_argument("--overwrite", action="store_true", help="replace synthetic data of another config in DIR")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS), help="starting sizes (tiny: ~220 images, for tests)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_arguments(parser, SynthConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    # Printed, not logged: the refusal lines docs/errors.md lists and the result table are the command's answer.
    try:
        cfg = resolve_config(args)
        check_output_folder(args.out)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from synthcity.write import AT_DIRS, OutputDirError, generate

    try:
        summary = generate(args.out, cfg, overwrite=args.overwrite, progress=not args.quiet)
    except OutputDirError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = summary["counts"]
    if summary["status"] == "unchanged":
        print(f"{summary['out_dir']} already holds this dataset (same config); nothing to do.")
    else:
        print(f"{summary['status']} {summary['rendered']} images to {summary['out_dir']} "
              f"in {summary['seconds']:.1f} s with {summary['workers']} workers")  # fmt: skip
    rows = [(f"atname/{split}", n, "") for split in AT_DIRS if (n := counts.get("atname", {}).get(split))]
    rows += [(f"gsv_cities/{city}", c["images"], f" of {c['places']} places") for city, c in counts.get("gsv_cities", {}).items()]
    rows.append(("total", counts.get("total_images", 0), ""))
    width = max(len(name) for name, _, _ in rows)
    for name, n, extra in rows:
        print(f"  {name:{width}s} {n:6d} images{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
