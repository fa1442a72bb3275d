"""How every placeforge job connects to Ray: one place, so all jobs behave alike."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int | None) -> Iterator[None]:
    """Use the running Ray, else join `address` / $RAY_ADDRESS (set by `ray job submit`),
    else start a local Ray (dashboard off; Ray binds it to 127.0.0.1 when on).

    A session started here is shut down on exit; one that was already running is left alone.
    """
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, log_to_driver=False)
        elif os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        if started_here:
            ray.shutdown()
