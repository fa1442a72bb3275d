"""How every placeforge job connects to Ray: one place, so all jobs behave alike."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Iterator

log = logging.getLogger(__name__)


class RayAddressError(ValueError):
    """A Ray address that does not answer; raised before Ray spends minutes retrying it."""


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast when a HOST:PORT Ray address (GCS) accepts no connection.

    `ray.init` would retry an unreachable GCS for minutes; a wrong address should cost
    seconds and say which address was tried.  "auto", "local" and ray:// client addresses
    are left to Ray.
    """

    if address in ("auto", "local") or "://" in address:
        return
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit():
        raise RayAddressError(f"Ray address {address!r}: expected HOST:PORT of the head's GCS (e.g. 10.0.0.1:6379)")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            pass
    except OSError as error:
        raise RayAddressError(f"Ray address {address} does not answer ({error.strerror or error}); "
                              f"is the head running (`ray start --head`), and is the port right?") from error


def parse_resources(text: str | None) -> dict[str, float] | None:
    """"placeforge_cpu_node=0.01,decode=1" -> {"placeforge_cpu_node": 0.01, "decode": 1.0}; None/"" -> None.

    Custom Ray resources a job's tasks or actors ask for, so they run only on nodes that
    offer them (cluster.yaml gives each node kind one: placeforge_cpu_node, placeforge_gpu_node).
    A small amount (0.01) pins work to a node kind without limiting how much runs there.
    """
    if not text:
        return None
    resources = {}
    for item in text.split(","):
        name, eq, amount = item.strip().partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if not eq or not name or value <= 0:
            raise ValueError(f"resource {item.strip()!r}: expected NAME=AMOUNT with AMOUNT > 0, "
                             f"e.g. placeforge_cpu_node=0.01")
        resources[name.strip()] = value
    return resources


def running_local_ray(temp_dir: str | os.PathLike | None = None) -> str | None:
    """The GCS address of a Ray already running on this machine, if it answers: `ray start --head`
    records it in TEMP_DIR/ray_current_cluster (default /tmp/ray, where a plain `ray.init()` looks);
    None when there is no record or the Ray it names has stopped."""
    from ray._private.utils import read_ray_address  # Ray's own reader of that record

    address = read_ray_address(None if temp_dir is None else str(temp_dir))
    if not address:
        return None
    try:
        check_reachable(address, timeout_s=1.0)
    except RayAddressError:
        return None
    return address


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int | None) -> Iterator[None]:
    """Use the running Ray, else join `address` / $RAY_ADDRESS (set by `ray job submit`), else
    join a Ray already running on this machine (`ray start --head`; its GCS must answer), else
    start a local Ray (dashboard off; Ray binds it to 127.0.0.1 when on).

    Joining a running Ray saves its start-up (seconds) in every job; `num_cpus` sizes only a
    Ray started here.  A session started here is shut down on exit; one that was already
    running is left alone.
    """
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        if address:
            check_reachable(address)
            ray.init(address=address, log_to_driver=False)
        elif os.environ.get("RAY_ADDRESS"):
            check_reachable(os.environ["RAY_ADDRESS"])
            ray.init(log_to_driver=False)
        elif local := running_local_ray():
            if num_cpus is not None:
                log.warning("joining the Ray running at %s: --num-cpus %d does not apply to it", local, num_cpus)
            ray.init(address=local, log_to_driver=False)
        else:
            # "local": a new Ray even where a stale record of a stopped one would make ray.init() try to join it
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        if started_here:
            ray.shutdown()


def quiet_data_context() -> None:
    """Ray Data settings every placeforge job uses: no Ray progress bars or start-up banner
    (jobs draw their own tqdm bar and log lines instead)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a rendezvous or a test node)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
