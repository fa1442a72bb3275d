"""Check a DeepSpeed hostfile before a multi-node launch: every host resolves and answers.

    python -m placeforge.trainer.preflight --hostfile hosts            # then: deepspeed --hostfile hosts ...

A hostfile lists one host per line as `HOST slots=N` (DeepSpeed's format; `#` comments and
blank lines allowed).  The launcher reaches each host over ssh; a misspelled or powered-off
host makes it fail (or hang) only after some nodes have started.  This checks, in seconds
and before anything starts: the file parses, host names are unique, slots are positive,
every host resolves, and its ssh port accepts a connection.  Exit 0 when all is well, 2 with
one line per problem otherwise.
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

_LINE = re.compile(r"^(?P<host>[A-Za-z0-9._-]+)\s+slots=(?P<slots>\d+)$")


@dataclass(frozen=True)
class Host:
    name: str
    slots: int  # GPUs (ranks) on the host


def parse_hostfile(text: str) -> tuple[list[Host], list[str]]:
    """DeepSpeed hostfile text -> (hosts in order, problems); pure, no network."""
    hosts: list[Host] = []
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if match is None:
            problems.append(f"line {number}: {raw.strip()!r} is not 'HOST slots=N'")
            continue
        host = Host(match.group("host"), int(match.group("slots")))
        if host.slots < 1:
            problems.append(f"line {number}: {host.name} has slots={host.slots}; needs >= 1")
        elif any(h.name == host.name for h in hosts):
            problems.append(f"line {number}: {host.name} is listed twice")
        else:
            hosts.append(host)
    if not hosts and not problems:
        problems.append("no hosts listed")
    return hosts, problems


def reachability_problem(host: str, port: int, timeout_s: float) -> str | None:
    """None if `host` resolves and `port` accepts a TCP connection within `timeout_s`."""
    try:
        address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4]
    except socket.gaierror as error:
        return f"{host}: does not resolve ({error.strerror})"
    try:
        with socket.create_connection(address[:2], timeout=timeout_s):
            return None
    except OSError as error:
        return f"{host}: port {port} does not answer ({error.strerror or type(error).__name__})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m placeforge.trainer.preflight", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--hostfile", required=True, type=Path, help="DeepSpeed hostfile (HOST slots=N per line)")
    parser.add_argument("--ssh-port", type=int, default=22, help="port the launcher connects to (default: 22)")
    parser.add_argument("--timeout-s", type=float, default=5.0, help="per-host connection timeout")
    args = parser.parse_args(argv)
    # Printed, not logged: the problems (stderr, exit 2) or the all-clear line (stdout) are this check's answer.
    try:
        text = args.hostfile.read_text()
    except OSError as error:
        print(f"preflight: error: {args.hostfile}: {error.strerror}", file=sys.stderr)
        return 2
    hosts, problems = parse_hostfile(text)
    for host in hosts:
        problem = reachability_problem(host.name, args.ssh_port, args.timeout_s)
        if problem:
            problems.append(problem)
    if problems:
        for problem in problems:
            print(f"preflight: error: {args.hostfile}: {problem}", file=sys.stderr)
        print("preflight: fix the hostfile (or the hosts) before launching; nothing was started", file=sys.stderr)
        return 2
    print(f"preflight: {len(hosts)} host(s), {sum(h.slots for h in hosts)} rank(s): all resolve and answer "
          f"on port {args.ssh_port}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
