"""A lost training process: two CPU ranks (gloo), one killed mid-run, the job resumed from its
last checkpoint, and the result compared with an uninterrupted run over the same steps."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_train import TINY, free_port, launch, run_two_ranks, write_shards

pytestmark = pytest.mark.slow


def digest_of(outputs: list[str]) -> str:
    digests = {line.split()[-1] for out in outputs for line in out.splitlines() if "final weights sha256" in line}
    assert len(digests) == 1, digests  # both ranks hold the same weights
    return digests.pop()


def latest_step(checkpoints: Path) -> tuple[int, int] | None:
    """(epoch, step) of the tag `checkpoints/latest` names, None before the first checkpoint."""
    try:
        match = re.fullmatch(r"epoch(\d+)-step(\d+)", (checkpoints / "latest").read_text().strip())
    except OSError:
        return None
    return (int(match.group(1)), int(match.group(2))) if match else None


def losses_by_step(out: Path) -> dict[int, float]:
    """Last logged loss of every global step (a resumed run logs the re-run steps again)."""
    losses = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "step" in record and "loss" in record:
            losses[record["step"]] = record["loss"]
    return losses


def test_a_killed_rank_resumes_from_the_last_checkpoint_with_the_same_result(tmp_path):
    ids = write_shards(tmp_path / "shards", [[(s * 6 + p, 4) for p in range(6)] for s in range(4)])
    assert len(ids) == 96
    common = ["--stage", "pretrain", "--shards", str(tmp_path / "shards"), "--batch.pairs-per-batch", "2",
              "--epochs", "3", "--max-steps-per-epoch", "6", "--checkpoint-every-steps", "2", *TINY,
              "--num-workers", "1", "--weights-digest"]
    straight = tmp_path / "straight"
    expected = digest_of(run_two_ranks([*common, "--out", str(straight)]))

    faulty = tmp_path / "faulty"
    port = free_port()
    processes = [launch([*common, "--out", str(faulty)], rank, 2, port) for rank in (0, 1)]
    try:
        deadline = time.monotonic() + 150
        while (latest_step(faulty / "checkpoints") or (0, 0)) < (0, 4):
            assert time.monotonic() < deadline, "no checkpoint at step 4 in time"
            assert processes[1].poll() is None, "the run finished before the kill: make it longer"
            time.sleep(0.05)
        processes[1].send_signal(signal.SIGKILL)  # a lost node: no clean shutdown
        processes[1].wait(timeout=30)
        # The survivor's next collective fails (gloo sees the closed connection); a launcher
        # would then stop the job. It must not finish the run on its own.
        try:
            processes[0].wait(timeout=60)
        except subprocess.TimeoutExpired:
            processes[0].kill()
            processes[0].wait()
        assert processes[0].returncode != 0
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
            p.communicate()
    killed_at = latest_step(faulty / "checkpoints")
    assert killed_at is not None and killed_at < (3, 0)
    assert not (faulty / "export" / "model_epoch0002.pt").exists()

    resumed = digest_of(run_two_ranks([*common, "--out", str(faulty), "--resume"]))
    assert resumed == expected  # the same weights as a run that was never interrupted
    assert losses_by_step(faulty) == losses_by_step(straight)  # and the same loss at every step
