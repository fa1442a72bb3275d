"""`placeforge` command: one entry point over the stages.

    placeforge demo --out runs/demo        synthetic city -> shards -> labels -> stage 1 -> stage 2 -> recall
    placeforge synth --out DIR             render the synthetic city (python -m synthcity)
    placeforge build-shards ...            pipelines/build_shards.py
    placeforge evaluate ...                pipelines/evaluate.py
    placeforge import-checkpoint --from pairvpr|mutualvpr FILE --out OUT    a released model -> a placeforge model file
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from pathlib import Path

from placeforge.logs import setup_logging


def demo(argv: list[str] | None = None) -> int:
    """The embedded default, end to end on one CPU with a local Ray."""
    parser = argparse.ArgumentParser(
        prog="placeforge demo",
        description="Render the synthetic city, ingest it, build place-aware shards with a local Ray, "
        "write the initial view-class labels (v0), stream the shards back, train the CPU "
        "preset with DeepSpeed: stage 1 (Siamese MIM) and stage 2 (global descriptor + pair "
        "classifier; Recall@1/5 on the city's validation split every few epochs, the best epoch "
        "kept; --preset tiny also runs CosFace over the view classes and reclusters between "
        "epochs, which the full recipe leaves off), then evaluate Recall@N on the city's test "
        "split: the untrained encoder, the trained global descriptor, after pair-classifier "
        "re-ranking, and the raw-pixel baseline. Everything is written under --out; a re-run "
        "reuses what is already complete.",
        allow_abbrev=False,
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--preset", default="default", help="synthetic city size: default (~6.8k images) or tiny")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild outputs made with another config")
    parser.add_argument("--no-train", action="store_true", help="stop after the shards and labels")
    parser.add_argument("--no-eval", action="store_true", help="stop after training")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="demo",
                        help=f"demo: the recipe of configs/demo_*.yaml (about 10 minutes on 2 cores); long: the same "
                             f"with stage 2 trained {RECIPES['long']['epochs']} epochs (about 25 minutes), into "
                             f"train-long/ and eval-long/, reusing the city, shards, labels and stage 1")
    parser.add_argument("--city-seed", type=int, default=None,
                        help="render another synthetic city (layout, facades, conditions, test split: the seed of "
                             "placeforge synth) to try the recipe on a city it was not tuned on; use a new --out")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of both training stages (initial weights, data order, masks); a seed other "
                             "than 0 trains into train-seedN/ and evaluates into eval-seedN/, reusing the city, "
                             "shards and labels, so several seeds give the run-to-run spread")
    args = parser.parse_args(argv)
    setup_logging()

    from placeforge.clustering.job import ReclusterConfig, ReclusterError, recluster
    from placeforge.clustering.labels import latest_version
    from placeforge.config import ConfigError
    from placeforge.places import PlaceConfig
    from placeforge.shards.build import BuildConfig, BuildError, build
    from placeforge.shards.reader import ShardSet, place_sample_pipeline, same_place_pairs
    from synthcity import generate
    from synthcity.write import OutputDirError

    out = args.out.resolve()
    try:
        synth_cfg = city_config(args.preset, args.city_seed)
        started = time.perf_counter()
        print(f"[1/7] synthetic city -> {out / 'city'}")
        generate(out / "city", synth_cfg, overwrite=args.overwrite, progress=True)
        print(f"[2/7] catalog + shards -> {out / 'shards'}")
        sources = [("atname", out / "city" / "atname" / "train"), ("gsv_cities", out / "city" / "gsv_cities")]
        summary = build(
            sources,
            out / "shards",
            # A place is one view: the images of one of 4 heading sectors within 4 m of a leader
            # image (the city's camera positions are 7.5 m apart), so MS positives show the same
            # facades from the same spot; 15 m cells x sectors mixed two views in 53 % of their
            # images and cut 284 of 800 views at cell edges. Places need 2 images (docs/benchmarks.md).
            BuildConfig(images_per_shard=400, min_shards=8,
                        places=PlaceConfig(heading_sectors=4, min_images_per_place=2, view_radius_m=4.0)),
            overwrite=args.overwrite,
            num_cpus=args.num_cpus,
        )
        print(summary.report())
        print(f"[3/7] initial view-class labels -> {out / 'labels'}")
        if summary.skipped and latest_version(out / "labels") is not None:
            print(f"labels v{latest_version(out / 'labels'):04d} already written for these shards")
        else:
            labels = recluster(out / "shards", out / "labels", ReclusterConfig(), force=True, num_cpus=args.num_cpus)
            print(labels.report())
    except (ConfigError, BuildError, ReclusterError, OutputDirError, ValueError) as err:
        print(f"placeforge demo: error: {err}", file=sys.stderr)
        return 2

    print("[4/7] streaming the shards back through shards.reader")
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
    suffix = f"-seed{args.seed}" if args.seed else ""
    recipe_suffix = "" if args.recipe == "demo" else f"-{args.recipe}"
    if not args.no_train:
        pretrain = out / f"train{suffix}" / "pretrain"  # stage 1 is the same for every recipe
        print(f"[5/7] stage 1, Siamese MIM pre-training (configs/demo_pretrain.yaml) -> {pretrain}")
        overrides1, overrides2 = training_overrides(args.preset, args.recipe, args.seed)
        if run_training("demo_pretrain.yaml", ["--shards", str(out / "shards"), "--out", str(pretrain)], overrides1):
            return 1
        finetune = out / f"train{recipe_suffix}{suffix}" / "finetune"
        init_from = sorted((pretrain / "export").glob("mim_epoch*.pt"))[-1]
        print(f"[6/7] stage 2, global descriptor + pair classifier (configs/demo_finetune.yaml) -> {finetune}")
        stage2 = ["--shards", str(out / "shards"), "--labels", str(out / "labels"), "--init-from", str(init_from),
                  "--out", str(finetune)]
        val = out / "city" / "atname" / "val"
        if (val / "queries").is_dir():  # recall during training on the validation split, never on test
            stage2 += ["--validation.database", f"atname:{val / 'database'}",
                       "--validation.queries", f"atname:{val / 'queries'}"]
        if run_training("demo_finetune.yaml", stage2, overrides2):
            return 1
        if not args.no_eval:
            epochs = overrides2.get("epochs", _config_epochs("demo_finetune.yaml"))
            trained = finetune / "export" / f"model_epoch{epochs - 1:04d}.pt"
            if (finetune / "export" / "best_model.pt").is_file():  # the epoch chosen on the validation split
                trained = finetune / "export" / "best_model.pt"
            eval_dir = out / f"eval{recipe_suffix}{suffix}"
            print(f"[7/7] Recall@N on the synthetic test split -> {eval_dir}")
            if evaluate_demo(out, trained, args.num_cpus, eval_dir, args.seed):
                return 1
    print(f"demo done in {time.perf_counter() - started:.1f} s; outputs in {out}")
    return 0


def city_config(preset_name: str, city_seed: int | None = None):
    """The synthetic city of a demo run: the preset, rendered from `city_seed` when one is given."""
    from synthcity.synth_config import preset

    cfg = preset(preset_name)
    return cfg if city_seed is None else dataclasses.replace(cfg, seed=city_seed)


def evaluate_demo(out: Path, trained: Path, num_cpus: int | None, eval_dir: Path, seed: int = 0) -> int:
    """Evaluate the untrained encoder and the trained model on the city's test split into
    `eval_dir`; print both."""
    from placeforge.config import from_mapping, load_file
    from placeforge.evaluation.job import EvalConfig, EvaluationError, evaluate
    from placeforge.evaluation.testset import read_split
    from placeforge.models.checkpoint import save_model_checkpoint
    from placeforge.models.encoders import build_model
    from placeforge.raysession import ray_session
    from placeforge.trainer.train_config import TrainConfig

    recipe = from_mapping(TrainConfig, load_file(CONFIGS / "demo_finetune.yaml"), where="demo_finetune.yaml")
    untrained = eval_dir / "untrained.pt"
    if not untrained.is_file():  # the same architecture from the recipe's seed, before any training
        import torch

        encoder_cfg = recipe.encoder
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed or recipe.seed)  # the initial weights of the run it is compared with
            save_model_checkpoint(build_model(encoder_cfg), encoder_cfg, untrained)
    test = out / "city" / "atname" / "test"
    try:
        database = read_split(f"atname:{test / 'database'}", "database")
        queries = read_split(f"atname:{test / 'queries'}", "queries")
        results = {}
        with ray_session(None, num_cpus):  # one local Ray for both evaluations
            for name, checkpoint in (("untrained", untrained), ("trained", trained)):
                results[name] = evaluate(checkpoint, database, queries, eval_dir / name, EvalConfig(),
                                         num_cpus=num_cpus,
                                         title=f"demo: {name} ({checkpoint.name}) on the synthetic test split")
    except (EvaluationError, ValueError, OSError) as err:
        print(f"placeforge demo: error: evaluation failed: {err}", file=sys.stderr)
        return 1
    rows = [("untrained encoder", results["untrained"].recall("global")),
            ("trained, global descriptor", results["trained"].recall("global")),
            ("trained, re-ranked", results["trained"].recall("reranked")),
            ("raw pixels (16x16 thumbnails)", results["trained"].recall("baseline"))]
    print(f"Recall@N on the TEST split: {len(queries)} queries, {len(database)} database images "
          f"(right: within 25 m; the recipe was tuned on the validation split, atname/val)")
    print(f"{'':>28}  {'R@1':>6}  {'R@5':>6}  {'R@10':>6}")
    for title, recall in rows:
        if recall is not None:
            print(f"{title:>28}  " + "  ".join(f"{100 * recall[n]:6.1f}" for n in (1, 5, 10)))
    print(results["trained"].report["rerank"]["note"])
    if results["trained"].report.get("baseline"):
        print(results["trained"].report["baseline"]["note"])
    print(f"reports: {eval_dir / 'untrained' / 'report.html'}, {eval_dir / 'trained' / 'report.html'}")
    return 0


def _config_epochs(config_name: str) -> int:
    from placeforge.config import load_file

    return int(load_file(CONFIGS / config_name)["epochs"])


def training_overrides(preset: str, recipe: str, seed: int) -> tuple[dict, dict]:
    """Overrides of configs/demo_pretrain.yaml and configs/demo_finetune.yaml for one demo run."""
    # The tiny city has ~16 place samples: smaller batches and fewer epochs so every rank has full
    # batches. It also runs CosFace and one reclustering between epochs, which the full recipe leaves
    # off (configs/demo_finetune.yaml says why), so the test of this job covers them.
    tiny = preset == "tiny"
    stage1 = {"batch.pairs_per_batch": 4, "epochs": 2} if tiny else {}
    stage2 = {**RECIPES[recipe]}  # the recipe's stage 2; the tiny city's sizes win over it
    if tiny:
        stage2.update({"batch.places_per_batch": 2, "batch.images_per_place": 2, "num_workers": 1, "epochs": 2,
                       "cosface_weight": 0.02, "recluster_every_epochs": 1, "validation.every_epochs": 1})
    if seed:
        stage1, stage2 = {**stage1, "seed": seed}, {**stage2, "seed": seed}
    return stage1, stage2


def run_training(config_name: str, args: list[str], overrides: dict[str, float]) -> int:
    """Run one trainer stage in its own process (DeepSpeed's process group must not outlive it).

    A stage whose final export exists is skipped; an interrupted one resumes from its checkpoint.
    """
    import subprocess

    config = CONFIGS / config_name
    out = Path(args[args.index("--out") + 1])
    epochs = overrides.get("epochs", _config_epochs(config_name))
    if (out / "export" / f"model_epoch{epochs - 1:04d}.pt").is_file():
        print(f"already trained: {out / 'export'}")
        return 0
    flags = [item for key, value in overrides.items() for item in ("--" + key.replace("_", "-"), str(value))]
    command = [sys.executable, "-m", "placeforge.trainer.train", "--config", str(config), *args, *flags]
    if (out / "checkpoints" / "latest").is_file():
        command.append("--resume")
    return subprocess.run(command, cwd=CONFIGS.parent).returncode


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Stage-2 overrides of configs/demo_finetune.yaml per demo recipe (`placeforge demo --recipe`).
# long: issue 10's longer recipe, the demo's stage 2 trained 36 epochs (about 25 minutes on 2
# cores in all), validated every 4 epochs, every image an anchor of the pair classifier, as
# measured in docs/benchmarks.md, round 4.
RECIPES: dict[str, dict[str, int]] = {
    "demo": {}, "long": {"epochs": 36, "validation.every_epochs": 4, "pair_anchors_per_place": 0}}


COMMANDS = {
    "demo": ("run the embedded default end to end", demo),
    "synth": ("render the synthetic city", lambda argv: _synth_main(argv)),
    "build-shards": ("build place-aware WebDataset shards (Ray Data)", lambda argv: _build_shards_main(argv)),
    "evaluate": ("Recall@N before and after re-ranking, with a report", lambda argv: _evaluate_main(argv)),
    "import-checkpoint": ("convert a released checkpoint (Pair-VPR, MutualVPR) into a placeforge model file",
                          lambda argv: import_checkpoint(argv)),
}

IMPORT_HELP = """Convert a released checkpoint into a placeforge model file, so that
`python -m placeforge.pipelines.evaluate --checkpoint OUT ...` evaluates the published model as it is
(global descriptor, then pair-classifier re-ranking where the model has one).

--from pairvpr: a stage-2 model of csiro-robotics/Pair-VPR: pairvpr-vitB.pth ("speed") or
pairvpr-vitG.pth ("performance"); its trained_models/models_readme.md links the download.
The file is read with torch.load(weights_only=True). Every key is mapped or dropped by name
(the stage-1 masked-image-modelling parts and the fixed position tables:
{dropped}).
Any other key fails the import, naming it.
The model file evaluates at 322 px, squashed, as Pair-VPR does.
Re-rank as published with --rerank-top-k 100 (ViT-B) or 500 (ViT-G); see docs/evaluation.md.

--from mutualvpr: the model of Gucci233/MutualVPR (its README links the download): the state
dict train.py saves (best_model.pth; `module.` prefix or not), or a last_checkpoint.pth, whose
training state is dropped by name:
{mutualvpr_dropped}.
Every tensor is mapped: the DINOv2 ViT-B/14 backbone, the MulConv adapter of every block,
GeM and the Linear to 512; any other key fails the import, naming it.
The model file evaluates squashed to 504 x 504 (--image-size 476 for MutualVPR's Pittsburgh and
Tokyo 24/7 loaders' size), with the global descriptor only, as MutualVPR's test.py does; it has
no pair classifier.
"""


def import_checkpoint(argv: list[str]) -> int:
    """Convert a released checkpoint of a published method into a placeforge model file."""
    from placeforge.models.import_mutualvpr import MUTUALVPR_DROPPED, MUTUALVPR_VARIANTS
    from placeforge.models.import_released import PAIRVPR_DROPPED, PAIRVPR_VARIANTS
    from placeforge.pipelines.shell import run_guarded, script_parser

    parser = script_parser("placeforge import-checkpoint",
                           IMPORT_HELP.format(dropped=", ".join(PAIRVPR_DROPPED),
                                              mutualvpr_dropped=", ".join(MUTUALVPR_DROPPED)),
                           split_epilog=True)
    parser.add_argument("--from", dest="source_format", required=True, choices=["pairvpr", "mutualvpr"],
                        help="whose release FILE is: pairvpr (Pair-VPR stage 2) or mutualvpr (MutualVPR)")
    parser.add_argument("file", type=Path, metavar="FILE", help="the released checkpoint file")
    parser.add_argument("--out", required=True, type=Path, help="the placeforge model file to write")
    parser.add_argument("--variant", choices=sorted({*PAIRVPR_VARIANTS, *MUTUALVPR_VARIANTS}),
                        help="pairvpr: vitb or vitg; mutualvpr: vitb (default: detected from the tensor shapes; "
                             "a mismatch is an error)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="mutualvpr only: the side images are squashed to, a multiple of 14 (default 504)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    setup_logging()

    def run() -> str:
        from placeforge.models.import_mutualvpr import import_mutualvpr
        from placeforge.models.import_released import import_pairvpr

        if args.source_format == "pairvpr":
            if args.image_size is not None:
                raise ValueError("--image-size is for --from mutualvpr; Pair-VPR models evaluate at 322 px")
            return import_pairvpr(args.file, args.out, args.variant, overwrite=args.overwrite).text()
        size = {} if args.image_size is None else {"image_size": args.image_size}
        return import_mutualvpr(args.file, args.out, args.variant, overwrite=args.overwrite, **size).text()

    return run_guarded("placeforge import-checkpoint", run, (ValueError, FileNotFoundError, FileExistsError))


def _evaluate_main(argv: list[str]) -> int:
    from placeforge.pipelines.evaluate import main

    return main(argv)


def _synth_main(argv: list[str]) -> int:
    from synthcity.__main__ import main

    return main(argv)


def _build_shards_main(argv: list[str]) -> int:
    from placeforge.pipelines.build_shards import main

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
