"""cluster.yaml against Ray's own cluster-launcher code, offline (no cloud is contacted): it passes
Ray's schema, and it is closed by default: token auth on every node, one SSH range, instance
profiles with only what the autoscaler calls, and no .venv/, runs/ or secrets in the synced
checkout. The scripts of scripts/cluster/ run for real, against a stub `aws` and a temporary HOME.
"""

import copy
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.command_runner import SSHCommandRunner
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
SCRIPTS = ROOT / "scripts" / "cluster"
HEAD_POLICY = SCRIPTS / "iam" / "head-policy.json"
TRUST_POLICY = SCRIPTS / "iam" / "ec2-trust-policy.json"
TOKEN_ON_NODE = "/home/ubuntu/.ray/auth_token"  # Ray's default token path for the ssh user
RSYNC = shutil.which("rsync")
needs_rsync = pytest.mark.skipif(RSYNC is None, reason="rsync is not installed (ray up needs it too)")


def load_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def worker_node_types(config: dict) -> dict:
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


def test_cluster_yaml_matches_rays_schema():
    config = load_config()
    validate_config(prepare_config(config))  # fills the provider's defaults as `ray up` does, then the schema
    types = config["available_node_types"]
    assert types["gpu_workers"]["resources"]["GPU"] > 0 and "GPU" not in types["cpu_workers"]["resources"]
    assert config["head_node_type"] in types
    assert all("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"] if "--head" in c)


def test_schema_check_really_rejects_a_broken_config():
    config = load_config()
    config["available_node_types"]["cpu_workers"]["min_workers"] = "several"
    with pytest.raises(Exception, match="several"):
        validate_config(prepare_config(config))


# --- Ray token authentication ---------------------------------------------------------------


def test_every_ray_start_turns_token_auth_on():
    config = load_config()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts, key
        for command in starts:
            assert re.search(r"(^|[\s;])RAY_AUTH_MODE=token \S*ray start\b", command), command


def test_the_token_script_writes_the_file_every_node_gets(tmp_path):
    local_path = load_config()["file_mounts"][TOKEN_ON_NODE]
    assert local_path.startswith("~/")  # outside the checkout: never committed, never synced with it
    token_path = tmp_path / local_path[2:]
    make_token = ["bash", str(SCRIPTS / "make_auth_token.sh")]
    env = {**os.environ, "HOME": str(tmp_path)}

    subprocess.run(make_token, env=env, check=True, capture_output=True)
    token = token_path.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    assert stat.S_IMODE(token_path.stat().st_mode) == 0o600
    subprocess.run(make_token, env=env, check=True, capture_output=True)
    assert token_path.read_text() == token  # kept: nodes and clients keep agreeing
    assert sorted(p.name for p in token_path.parent.iterdir()) == [token_path.name]  # no temp file left


def test_the_documented_client_settings_send_the_token(tmp_path):
    """The header `ray job submit` adds to its requests (dashboard_sdk.py) with docs/cluster.md's
    two exports, in a fresh process each time: Ray reads the mode and the token once per process."""
    token_file = tmp_path / "placeforge_auth_token"
    token_file.write_text("ab" * 32)
    probe = (
        "import json\n"
        "from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled\n"
        "print(json.dumps(get_auth_headers_if_auth_enabled({})))\n"
    )

    def headers(**settings: str) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        env.update(HOME=str(tmp_path), **settings)  # no ~/.ray/auth_token to fall back on
        run = subprocess.run([sys.executable, "-c", probe], env=env, check=True, capture_output=True, text=True)
        return json.loads(run.stdout.splitlines()[-1])

    sent = headers(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    assert sent == {"authorization": "Bearer " + "ab" * 32}
    assert headers(RAY_AUTH_TOKEN_PATH=str(token_file)) == {}  # without the mode nothing is sent


# --- What file_mounts ships ------------------------------------------------------------------


def rsync_as_ray_does(config: dict, source: str, target: str) -> None:
    """The copy `ray up` makes of one file mount (command_runner.run_rsync_up), run locally."""
    options = {"rsync_exclude": config.get("rsync_exclude"), "rsync_filter": config.get("rsync_filter")}
    filter_args = SSHCommandRunner._create_rsync_filter_args(None, options)
    subprocess.run([RSYNC, "-avz", *filter_args, source, target], check=True, capture_output=True)


SHIPPED = ["cluster.yaml", "pipelines/build_shards.py", "docs/runs.md", "evaluation/runs/table.py"]
LEFT_BEHIND = [
    ".venv/bin/python", "runs/demo/checkpoints/latest", ".git/config", "placeforge/__pycache__/geo.pyc",
    "build/lib/x.py", ".env", ".env.local", "deploy.pem", "tls/server.key", ".aws/credentials",
    ".ssh/id_ed25519", ".netrc",
]


@needs_rsync
def test_the_synced_checkout_leaves_venv_runs_and_secrets_behind(tmp_path):
    config = load_config()
    assert config["file_mounts"]["/home/ubuntu/placeforge"] == "."
    checkout, node = tmp_path / "checkout", tmp_path / "node"
    for name in SHIPPED + LEFT_BEHIND:
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        (checkout / name).write_text(name)
    shutil.copy(ROOT / ".gitignore", checkout / ".gitignore")

    rsync_as_ray_does(config, f"{checkout}/", f"{node}/")  # a folder mount gets a trailing slash
    arrived = {p.relative_to(node).as_posix() for p in node.rglob("*") if p.is_file()}
    assert set(SHIPPED) <= arrived
    assert arrived & set(LEFT_BEHIND) == set()


@needs_rsync
def test_the_token_mount_gets_through_the_rsync_filter(tmp_path):
    config = load_config()
    local_name, node_name = Path(config["file_mounts"][TOKEN_ON_NODE]).name, Path(TOKEN_ON_NODE).name
    for hop, name in (("ray up to the head", local_name), ("head to a worker", node_name)):
        source, target = tmp_path / hop / "from" / name, tmp_path / hop / "to" / node_name
        source.parent.mkdir(parents=True)
        target.parent.mkdir(parents=True)
        source.write_text("f" * 64)
        source.chmod(0o600)
        rsync_as_ray_does(config, str(source), str(target))
        assert target.read_text() == "f" * 64, hop
        assert stat.S_IMODE(target.stat().st_mode) == 0o600, hop


# --- Network: one security group, SSH from one range -----------------------------------------


def test_every_node_is_in_the_prepared_security_group():
    config = load_config()
    groups = [t["node_config"].get("SecurityGroupIds") for t in config["available_node_types"].values()]
    assert groups[0] and all(g == groups[0] for g in groups)
    assert "security_group" not in config["provider"]  # the rules Ray writes into its own group admit SSH from anywhere


def run_security_group_script(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Runs create_security_group.sh with a stub `aws` that records each call's arguments."""
    calls_log, stub = tmp_path / "aws_calls.jsonl", tmp_path / "bin" / "aws"
    stub.parent.mkdir()
    stub.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(calls_log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "if sys.argv[1:3] == ['ec2', 'create-security-group']:\n    print('sg-0fedcba9876543210')\n"
    )
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}"}
    script = ["bash", str(SCRIPTS / "create_security_group.sh"), *args]
    result = subprocess.run(script, check=False, env=env, capture_output=True, text=True)
    calls = [json.loads(line) for line in calls_log.read_text().splitlines()] if calls_log.exists() else []
    return result, calls


def option(call: list[str], name: str) -> str:
    return call[call.index(name) + 1]


def test_the_security_group_admits_ssh_from_one_range_and_cluster_traffic_only(tmp_path):
    result, calls = run_security_group_script(tmp_path, "vpc-0abc1234", "203.0.113.0/24")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "sg-0fedcba9876543210"
    create, authorize = calls  # no other call opens anything
    assert create[:2] == ["ec2", "create-security-group"] and option(create, "--vpc-id") == "vpc-0abc1234"
    cluster_tag = f"Key=ray-cluster-name,Value={load_config()['cluster_name']}"
    assert cluster_tag in option(create, "--tag-specifications")  # what the head policy's launch condition asks
    assert authorize[:2] == ["ec2", "authorize-security-group-ingress"]
    ssh, between_nodes = json.loads(option(authorize, "--ip-permissions"))
    assert (ssh["IpProtocol"], ssh["FromPort"], ssh["ToPort"]) == ("tcp", 22, 22)
    assert ssh.keys() == {"IpProtocol", "FromPort", "ToPort", "IpRanges"}
    assert [r["CidrIp"] for r in ssh["IpRanges"]] == ["203.0.113.0/24"]
    assert between_nodes["IpProtocol"] == "-1" and between_nodes.keys() == {"IpProtocol", "UserIdGroupPairs"}
    assert [p["GroupId"] for p in between_nodes["UserIdGroupPairs"]] == ["sg-0fedcba9876543210"]


@pytest.mark.parametrize("cidr", ["0.0.0.0/0", "10.0.0.0/0", "::/0", "203.0.113.0", "203.0.113.0/33", "office"])
def test_the_security_group_script_refuses_an_open_or_malformed_range(tmp_path, cidr):
    result, calls = run_security_group_script(tmp_path, "vpc-0abc1234", cidr)
    assert result.returncode == 2 and calls == []


# --- IAM: instance profiles and their policies ------------------------------------------------


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def policy_statements(path: Path) -> list[dict]:
    policy = json.loads(path.read_text())
    assert policy["Version"] == "2012-10-17"
    for s in policy["Statement"]:
        assert s["Effect"] == "Allow" and not s.keys() & {"NotAction", "NotResource", "NotPrincipal"}, s
    return policy["Statement"]


def test_every_node_type_has_a_named_instance_profile():
    config = load_config()
    profiles = {name: t["node_config"]["IamInstanceProfile"] for name, t in config["available_node_types"].items()}
    assert profiles.pop(config["head_node_type"]) == {"Name": "placeforge-head"}
    assert all(p == {"Name": "placeforge-worker"} for p in profiles.values())


def test_the_head_policy_grants_only_the_calls_of_rays_aws_autoscaler():
    config = load_config()
    statements = policy_statements(HEAD_POLICY)
    actions = {a for s in statements for a in as_list(s["Action"])}
    # AWSNodeProvider with cache_stopped_nodes off (no Stop/StartInstances) and no CloudWatch
    # (no DescribeImages); the head never runs Ray's bootstrap, which makes groups and roles.
    assert actions == {"ec2:DescribeInstances", "ec2:RunInstances", "ec2:CreateTags", "ec2:TerminateInstances",
                       "iam:PassRole"}
    assert config["provider"]["cache_stopped_nodes"] is False and "cloudwatch" not in config["provider"]
    for s in statements:
        if "*" in as_list(s["Resource"]):
            assert as_list(s["Action"]) == ["ec2:DescribeInstances"]  # has no resource-level permissions
    arns = [r for s in statements for r in as_list(s["Resource"]) if r.startswith("arn:aws:ec2:")]
    assert arns and all(r.split(":")[3] == config["provider"]["region"] for r in arns)


def test_the_head_may_launch_tag_end_and_pass_roles_only_for_this_clusters_workers():
    config = load_config()
    cluster, workers = config["cluster_name"], worker_node_types(config)
    statements = policy_statements(HEAD_POLICY)

    def conditions(action: str, resource_kind: str) -> list[dict]:
        found = [s.get("Condition", {}).get("StringEquals", {}) for s in statements
                 if s["Action"] == action and any(f":{resource_kind}/" in r for r in as_list(s["Resource"]))]
        assert found, (action, resource_kind)
        return found

    for launch in conditions("ec2:RunInstances", "instance"):
        assert launch["aws:RequestTag/ray-cluster-name"] == cluster
        assert launch["aws:RequestTag/ray-node-type"] == "worker"
        assert set(launch["ec2:InstanceType"]) == {t["node_config"]["InstanceType"] for t in workers.values()}
    for group in conditions("ec2:RunInstances", "security-group"):
        assert group == {"aws:ResourceTag/ray-cluster-name": cluster}
    for tag in conditions("ec2:CreateTags", "instance"):
        assert tag in ({"ec2:CreateAction": "RunInstances"}, {"aws:ResourceTag/ray-cluster-name": cluster})
    for end in conditions("ec2:TerminateInstances", "instance"):
        assert end == {"aws:ResourceTag/ray-cluster-name": cluster, "aws:ResourceTag/ray-node-type": "worker"}

    (pass_role,) = [s for s in statements if s["Action"] == "iam:PassRole"]
    worker_profiles = {t["node_config"]["IamInstanceProfile"]["Name"] for t in workers.values()}
    assert set(as_list(pass_role["Resource"])) == {f"arn:aws:iam::*:role/{name}" for name in worker_profiles}
    assert pass_role["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}


def test_the_roles_can_be_assumed_by_ec2_instances_only():
    (trust,) = policy_statements(TRUST_POLICY)
    assert trust["Principal"] == {"Service": "ec2.amazonaws.com"} and trust["Action"] == "sts:AssumeRole"


# --- What `ray up` does with this config (Ray's AWS bootstrap needs boto3, as `ray up` does) ---


def test_ray_up_keeps_the_configured_profiles_and_group_and_creates_neither(monkeypatch):
    pytest.importorskip("boto3", reason="Ray's AWS bootstrap imports boto3")
    from ray.autoscaler._private.aws import config as aws_bootstrap

    def no_aws(*args, **kwargs):
        raise AssertionError("the bootstrap step called AWS")

    monkeypatch.setattr(aws_bootstrap, "_client", no_aws)
    monkeypatch.setattr(aws_bootstrap, "_resource", no_aws)
    config = prepare_config(load_config())
    config["head_node"] = {}  # where bootstrap_aws puts its default role (EC2 and S3 full access)
    node_types = copy.deepcopy(config["available_node_types"])
    config = aws_bootstrap._configure_iam_role(config)
    config = aws_bootstrap._configure_security_group(config)
    assert config["head_node"] == {}
    assert config["available_node_types"] == node_types  # the configured profiles and group, untouched


def test_rays_own_security_group_would_admit_ssh_from_anywhere():
    """Why cluster.yaml names a prepared group rather than provider.security_group.IpPermissions."""
    pytest.importorskip("boto3", reason="Ray's AWS bootstrap imports boto3")
    from ray.autoscaler._private.aws import config as aws_bootstrap

    ssh_from_one_range = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "203.0.113.0/24"}]}
    rules = aws_bootstrap._create_default_inbound_rules({"sg-1"}, [ssh_from_one_range])
    assert {"CidrIp": "0.0.0.0/0"} in [r for rule in rules for r in rule.get("IpRanges", [])]
