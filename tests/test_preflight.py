"""trainer.preflight: a hostfile naming a missing host fails before any launch, saying which."""

from __future__ import annotations

import socket

from placeforge.trainer.preflight import Host, main, parse_hostfile


def test_hostfile_parsing_reports_every_bad_line():
    hosts, problems = parse_hostfile("# two nodes\nnode-a slots=8\n\nnode-b slots=8  # spare\n")
    assert hosts == [Host("node-a", 8), Host("node-b", 8)] and problems == []
    _, problems = parse_hostfile("node-a slots=8\nnode-a slots=8\nnode-c slots=0\nnode-d 8\n")
    assert problems == ["line 2: node-a is listed twice", "line 3: node-c has slots=0; needs >= 1",
                        "line 4: 'node-d 8' is not 'HOST slots=N'"]
    assert parse_hostfile("# nothing\n") == ([], ["no hosts listed"])


def test_a_missing_host_fails_with_its_name_and_a_reachable_one_passes(tmp_path, capsys):
    with socket.socket() as listening:  # stands in for a node's sshd
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        good = tmp_path / "good"
        good.write_text("127.0.0.1 slots=2\n")
        assert main(["--hostfile", str(good), "--ssh-port", str(port)]) == 0
        assert "1 host(s), 2 rank(s)" in capsys.readouterr().out

        bad = tmp_path / "bad"
        bad.write_text("127.0.0.1 slots=2\nno-such-node.invalid slots=8\n")  # .invalid never resolves (RFC 2606)
        assert main(["--hostfile", str(bad), "--ssh-port", str(port)]) == 2
        err = capsys.readouterr().err
        problems = [line for line in err.splitlines() if "nothing was started" not in line]
        assert len(problems) == 1 and "no-such-node.invalid: does not resolve" in problems[0]
        assert "nothing was started" in err
