"""relabel: choosing the export and the skip decision on plain values, the watcher's refusals
on files without Ray, then rounds on a real local Ray and real shards through `main`.
"""

from __future__ import annotations

import fcntl
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from placeforge.clustering.labels import label_table, latest_version, read_manifest, write_label_set
from placeforge.fileio import file_sha256
from placeforge.models.checkpoint import save_model_checkpoint
from placeforge.models.encoders import EncoderConfig, build_model
from placeforge.pipelines import relabel
from placeforge.pipelines.relabel import checkpoint_epoch, main, newest_checkpoint, version_made_from

REPO = Path(__file__).resolve().parents[1]

# --- pure ----------------------------------------------------------------------------------


def test_newest_checkpoint_ignores_temp_mim_and_bad_names():
    names = ["model_epoch0009.pt", "model_epoch0010.pt", ".model_epoch0011.pt.tmp-123", "mim_epoch0012.pt",
             "model_epoch013.pt", "model_epoch0014.pt.bak", "model_epoch0015.pth", "xmodel_epoch0016.pt",
             "model_epoch0017.PT", "model_epoch00a8.pt", "notes.txt"]
    assert newest_checkpoint(names) == "model_epoch0010.pt"
    assert newest_checkpoint(reversed(names)) == "model_epoch0010.pt"
    assert newest_checkpoint(["model_epoch0999.pt", "model_epoch10000.pt"]) == "model_epoch10000.pt"  # not by name
    assert newest_checkpoint([".model_epoch0003.pt.tmp-9", "mim_epoch0003.pt"]) is None
    assert newest_checkpoint([]) is None
    assert checkpoint_epoch("model_epoch0010.pt") == 10 and checkpoint_epoch("model_epoch0010.pt.tmp-1") is None


def test_version_made_from_any_version_the_newest_first():
    made = {0: None, 1: "aa", 2: "bb"}
    assert version_made_from("aa", made) == 1  # not the latest: still skipped
    assert version_made_from("bb", made) == 2
    assert version_made_from("cc", made) is None
    assert version_made_from("aa", {**made, 3: "aa"}) == 3
    assert version_made_from("aa", {}) is None


# --- the watcher's refusals, no Ray ------------------------------------------------------------


@pytest.fixture
def fake_v0(tmp_path) -> Path:
    """A labels folder whose only version is a 3-image initial split (enough for the checks before a round)."""
    labels = tmp_path / "labels"
    table = label_table(np.arange(3), np.zeros(3), np.array(["c"] * 3, object), np.zeros(3), np.arange(3),
                        np.arange(3), None, 0)
    write_label_set(labels, table, k=3, seed=0, cell_size_m=10.0, previous_version=None, retired_class_ids=[],
                    next_class_id=3, images_changed_class=None, images_new=3, method="initial")
    return labels


def once(labels: Path, export: Path, *extra: str | Path, shards: Path | None = None) -> int:
    return main([str(a) for a in ("--shards", shards or labels.parent / "no-shards", "--labels", labels,
                                  "--watch", export, "--once", *extra)])


def test_refuses_a_labels_folder_without_v0_and_a_missing_watch_folder(tmp_path, fake_v0, capsys):
    export = tmp_path / "export"
    export.mkdir()
    assert once(tmp_path / "empty", export) == 2
    assert "holds no label version" in capsys.readouterr().err
    assert not (tmp_path / "empty").exists()  # nothing written outside a labels folder, nor into a new one
    assert once(fake_v0, tmp_path / "exprot") == 2
    assert "--watch" in capsys.readouterr().err
    assert once(fake_v0, export, "--k", "0") == 2  # checked before any poll
    assert "k must be >= 1" in capsys.readouterr().err


def test_no_export_yet_and_a_held_lock_skip(tmp_path, fake_v0, capsys):
    export = tmp_path / "export"
    export.mkdir()
    (export / "mim_epoch0001.pt").write_bytes(b"not ours")
    assert once(fake_v0, export) == 0
    out, err = capsys.readouterr()
    # The watcher's lines go to stderr with their time (cron appends them to one log for days).
    assert out == "" and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO placeforge\.pipelines\.relabel: "
                                      r"skip: no model_epochNNNN\.pt in \S+ yet\n", err), err
    (export / "model_epoch0001.pt").write_bytes(b"garbage: never read while another run holds the lock")
    with open(fake_v0 / relabel.LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert once(fake_v0, export) == 0
    assert "INFO placeforge.pipelines.relabel: skip: another relabel holds" in capsys.readouterr().err
    assert latest_version(fake_v0) == 0


def test_the_script_logs_under_its_module_name_with_timestamps(tmp_path, fake_v0):
    """`python pipelines/relabel.py` runs the module as "__main__"; its lines must still be written."""
    (tmp_path / "export").mkdir()
    result = subprocess.run([sys.executable, "pipelines/relabel.py", "--shards", str(tmp_path), "--labels",
                             str(fake_v0), "--watch", str(tmp_path / "export"), "--once"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout == "", result.stderr[-2000:]
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO placeforge\.pipelines\.relabel: "
                     r"skip: no model_epochNNNN\.pt in ",
                     result.stderr, re.MULTILINE), result.stderr[-2000:]


def test_ctrl_c_ends_the_watch_with_130(tmp_path, fake_v0, monkeypatch, capsys):
    export = tmp_path / "export"
    export.mkdir()

    def interrupt(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(relabel.time, "sleep", interrupt)
    assert main(["--shards", str(tmp_path), "--labels", str(fake_v0), "--watch", str(export)]) == 130
    captured = capsys.readouterr()
    assert captured.err.count("skip: no model_epochNNNN.pt") == 1 and "interrupted after 1 poll" in captured.err


def test_an_export_that_changes_while_hashed_is_skipped(tmp_path, fake_v0, monkeypatch, capsys):
    export = tmp_path / "export"
    export.mkdir()
    path = export / "model_epoch0004.pt"
    path.write_bytes(b"first weights")

    def rewritten_while_hashing(p):
        sha = file_sha256(p)
        path.write_bytes(b"second weights, longer")  # the trainer re-exports the same epoch
        return sha

    monkeypatch.setattr(relabel, "file_sha256", rewritten_while_hashing)
    assert once(fake_v0, export) == 1
    assert "model_epoch0004.pt changed while it was being hashed" in capsys.readouterr().err
    assert sorted(p.name for p in fake_v0.iterdir()) == [relabel.LOCK_FILE, "v0000"]


# --- rounds on a local Ray ------------------------------------------------------------------


@pytest.fixture(scope="module")
def shard_dir(local_ray, tmp_path_factory) -> Path:
    from placeforge.shards.build import BuildConfig, build
    from synthcity import generate
    from synthcity.synth_config import SynthConfig

    root = tmp_path_factory.mktemp("relabel")
    generate(root / "city", SynthConfig.tiny())
    build([("atname", root / "city" / "atname" / "train")], root / "shards",
          BuildConfig(images_per_shard=40, min_shards=2, short_side=64))
    return root / "shards"


def tiny_export(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    cfg = EncoderConfig(name="vit_tiny_test", image_size=56, descriptor_dim=32)
    return save_model_checkpoint(build_model(cfg), cfg, path)


@pytest.mark.ray
def test_each_new_export_makes_one_version(shard_dir, tmp_path, capsys):
    from placeforge.pipelines.recluster import main as recluster_main

    labels, export = tmp_path / "labels", tmp_path / "export"
    assert recluster_main([str(a) for a in ("--shards", shard_dir, "--labels", labels, "--k", "2",
                                            "--plots-cells", "0")]) == 0
    export.mkdir()
    (export / "mim_epoch0002.pt").write_bytes(b"stage-1 weights: not a model export")
    (export / ".model_epoch0002.pt.tmp-123").write_bytes(b"half written")
    first = tiny_export(export / "model_epoch0001.pt", seed=0)
    capsys.readouterr()

    args = ("--num-cpus", "2", "--batch-size", "32", "--n-init", "2", "--partitions", "1", "--plots-cells", "0")
    assert once(labels, export, *args, shards=shard_dir) == 0
    assert "INFO placeforge.pipelines.relabel: label version v0001 (kmeans)" in capsys.readouterr().err
    v1 = read_manifest(labels, 1)
    assert v1.encoder_sha256 == file_sha256(first) and v1.previous_version == 0
    assert v1.k == 2 and v1.params["config"]["n_init"] == 2  # k from v0's config, n_init from the flag

    before = sorted(p.name for p in labels.iterdir())
    assert once(labels, export, *args, shards=shard_dir) == 0
    assert "skip: model_epoch0001.pt" in capsys.readouterr().err
    assert main([str(a) for a in ("--shards", shard_dir, "--labels", labels, "--watch", export, "--max-polls", "2",
                                  "--interval-s", "0.01", *args)]) == 0
    assert capsys.readouterr().err.count("skip: model_epoch0001.pt") == 2
    assert sorted(p.name for p in labels.iterdir()) == before and latest_version(labels) == 1

    second = tiny_export(export / "model_epoch0002.pt", seed=1)
    assert file_sha256(second) != file_sha256(first)
    assert once(labels, export, *args, shards=shard_dir) == 0
    v2 = read_manifest(labels, 2)
    assert v2.encoder_sha256 == file_sha256(second) and v2.previous_version == 1
    assert "label version v0002" in capsys.readouterr().err

    (export / "model_epoch0010.pt").write_bytes(b"\x00garbage, not a torch file" * 10)
    before = sorted(p.name for p in labels.iterdir())
    assert once(labels, export, *args, shards=shard_dir) == 1
    err = capsys.readouterr().err
    assert "model_epoch0010.pt" in err and "v0002 stays the latest version" in err
    assert sorted(p.name for p in labels.iterdir()) == before and latest_version(labels) == 2
