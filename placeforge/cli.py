"""`placeforge` command: one entry point over the stages.

    placeforge demo --out runs/demo        synthetic city -> catalog -> shards -> read back
    placeforge synth --out DIR             render the synthetic city (python -m placeforge.synth)
    placeforge build-shards ...            pipelines/build_shards.py
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path


def demo(argv: list[str] | None = None) -> int:
    """The embedded default, end to end on one CPU with a local Ray."""
    parser = argparse.ArgumentParser(
        prog="placeforge demo",
        description="Render the synthetic city, ingest it, build place-aware shards with a local Ray, "
        "write the initial view-class labels (v0), stream the shards back, then train the tiny "
        "preset with DeepSpeed: stage 1 (Siamese MIM) and stage 2 (global descriptor + pair "
        "classifier + CosFace, reclustering between epochs). Everything is written under --out; "
        "a re-run reuses what is already complete.",
        allow_abbrev=False,
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--preset", default="default", help="synthetic city size: default (~3.5k images) or tiny")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild outputs made with another config")
    parser.add_argument("--no-train", action="store_true", help="stop after the shards and labels")
    args = parser.parse_args(argv)

    from clustering.job import ReclusterConfig, ReclusterError, recluster
    from clustering.labels import latest_version
    from placeforge.config import ConfigError
    from placeforge.synth import generate
    from placeforge.synth.synth_config import preset
    from shards.build import BuildConfig, BuildError, build
    from shards.reader import ShardSet, place_sample_pipeline, same_place_pairs

    out = args.out.resolve()
    try:
        synth_cfg = preset(args.preset)
        started = time.perf_counter()
        print(f"[1/6] synthetic city -> {out / 'city'}")
        generate(out / "city", synth_cfg, overwrite=args.overwrite, progress=True)
        print(f"[2/6] catalog + shards -> {out / 'shards'}")
        sources = [("atname", out / "city" / "atname" / "train"), ("gsv_cities", out / "city" / "gsv_cities")]
        summary = build(
            sources,
            out / "shards",
            BuildConfig(images_per_shard=400, min_shards=8),
            overwrite=args.overwrite,
            num_cpus=args.num_cpus,
        )
        print(summary.report())
        print(f"[3/6] initial view-class labels -> {out / 'labels'}")
        if summary.skipped and latest_version(out / "labels") is not None:
            print(f"labels v{latest_version(out / 'labels'):04d} already written for these shards")
        else:
            labels = recluster(out / "shards", out / "labels", ReclusterConfig(), force=True, num_cpus=args.num_cpus)
            print(labels.report())
    except (ConfigError, BuildError, ReclusterError, ValueError) as err:
        print(f"placeforge demo: error: {err}", file=sys.stderr)
        return 2

    print("[4/6] streaming the shards back through shards.reader")
    shard_set = ShardSet.open(out / "shards")
    samples = list(place_sample_pipeline(shard_set.urls, shuffle_buffer=64))
    pairs = list(same_place_pairs(samples, random.Random(0)))
    images = sum(len(s.jpegs) for s in samples)
    print(
        f"read {len(samples)} place samples, {images} images "
        f"({len({s.place_id for s in samples})} places), {len(pairs)} same-place pairs"
    )
    if images != summary.manifest.counts["in_shards"]:
        print("placeforge demo: error: images read back differ from the manifest", file=sys.stderr)
        return 1
    if not args.no_train:
        pretrain = out / "train" / "pretrain"
        print(f"[5/6] stage 1, Siamese MIM pre-training (configs/demo_pretrain.yaml) -> {pretrain}")
        # The tiny city has ~16 place samples: smaller batches and fewer epochs so every rank has full batches.
        tiny = args.preset == "tiny"
        overrides1 = {"pairs_per_batch": 4, "epochs": 2} if tiny else {}
        overrides2 = {"places_per_batch": 2, "num_workers": 1, "epochs": 2, "recluster_every_epochs": 1} if tiny else {}
        if run_training("demo_pretrain.yaml", ["--shards", str(out / "shards"), "--out", str(pretrain)], overrides1):
            return 1
        finetune = out / "train" / "finetune"
        init_from = sorted((pretrain / "export").glob("mim_epoch*.pt"))[-1]
        print(f"[6/6] stage 2, joint fine-tuning with reclustering (configs/demo_finetune.yaml) -> {finetune}")
        stage2 = ["--shards", str(out / "shards"), "--labels", str(out / "labels"), "--init-from", str(init_from),
                  "--out", str(finetune)]
        if run_training("demo_finetune.yaml", stage2, overrides2):
            return 1
    print(f"demo done in {time.perf_counter() - started:.1f} s; outputs in {out}")
    return 0


def run_training(config_name: str, args: list[str], overrides: dict[str, int]) -> int:
    """Run one trainer stage in its own process (DeepSpeed's process group must not outlive it).

    A stage whose final export exists is skipped; an interrupted one resumes from its checkpoint.
    """
    import subprocess

    import yaml

    config = CONFIGS / config_name
    out = Path(args[args.index("--out") + 1])
    epochs = overrides.get("epochs", yaml.safe_load(config.read_text())["epochs"])
    if (out / "export" / f"model_epoch{epochs - 1:04d}.pt").is_file():
        print(f"already trained: {out / 'export'}")
        return 0
    flags = [item for key, value in overrides.items() for item in ("--" + key.replace("_", "-"), str(value))]
    command = [sys.executable, "-m", "trainer.train", "--config", str(config), *args, *flags]
    if (out / "checkpoints" / "latest").is_file():
        command.append("--resume")
    return subprocess.run(command, cwd=CONFIGS.parent).returncode


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


COMMANDS = {
    "demo": ("run the embedded default end to end", demo),
    "synth": ("render the synthetic city", lambda argv: _synth_main(argv)),
    "build-shards": ("build place-aware WebDataset shards (Ray Data)", lambda argv: _build_shards_main(argv)),
}


def _synth_main(argv: list[str]) -> int:
    from placeforge.synth.__main__ import main

    return main(argv)


def _build_shards_main(argv: list[str]) -> int:
    from pipelines.build_shards import main

    return main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {text}" for name, (text, _) in COMMANDS.items()]
        print("usage: placeforge COMMAND [--help]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nplaceforge: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    return COMMANDS[argv[0]][1](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
