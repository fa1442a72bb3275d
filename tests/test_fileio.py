"""placeforge.fileio: atomic writes, temporary names unique across hosts, one writer per output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from placeforge.fileio import (
    LOCK_FILE,
    OutputLockedError,
    atomic_write,
    file_sha256,
    is_temp_name,
    output_lock,
    temp_path,
    write_json_atomic,
)


def test_temp_names_are_hidden_unique_and_recognised(tmp_path):
    names = {temp_path(tmp_path / "manifest.json").name for _ in range(100)}
    assert len(names) == 100
    assert all(n.startswith(".manifest.json.tmp-") and is_temp_name(n) for n in names)
    assert not is_temp_name("manifest.json") and not is_temp_name(".hidden")


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_json_atomic(tmp_path / "sub" / "a.json", {"v": 1})

    def explode(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, explode)
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]
    assert len(file_sha256(path)) == 64


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path):
    with output_lock(tmp_path, "build_shards"):
        with pytest.raises(OutputLockedError, match=r"build_shards \(host .*pid \d+"):
            with output_lock(tmp_path, "evaluate"):
                pass
    with output_lock(tmp_path, "evaluate"):  # released on exit
        assert "evaluate" in (tmp_path / LOCK_FILE).read_text()


def test_the_lock_of_a_killed_process_is_free_at_once(tmp_path):
    code = ("import sys, time\nfrom placeforge.fileio import output_lock\n"
            "with output_lock(sys.argv[1], 'holder'):\n    print('held', flush=True)\n    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(OutputLockedError, match=f"holder .*pid {proc.pid}"):
            with output_lock(tmp_path, "second"):
                pass
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    with output_lock(tmp_path, "third"):  # no stale lock: the kernel released the dead holder's
        pass


def test_a_job_that_wrote_nothing_leaves_no_trace(tmp_path):
    with output_lock(tmp_path / "new" / "run", "train"):
        assert (tmp_path / "new" / "run" / LOCK_FILE).is_file()
    assert list(tmp_path.iterdir()) == []  # the lock file and both folders it made are gone
    (tmp_path / "mine").mkdir()
    with pytest.raises(ValueError):
        with output_lock(tmp_path / "mine", "train"):
            raise ValueError("refused after taking the lock")
    assert list((tmp_path / "mine").iterdir()) == []  # the user's folder stays, empty as it was
    with output_lock(tmp_path / "mine", "train"):
        (tmp_path / "mine" / "result.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == [LOCK_FILE, "result.json"]
    with output_lock(tmp_path / "mine", "train"):  # a lock file that was there before stays
        (tmp_path / "mine" / "result.json").unlink()
    assert [p.name for p in (tmp_path / "mine").iterdir()] == [LOCK_FILE]
