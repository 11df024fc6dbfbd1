"""cluster.yaml is checked against Ray's own cluster-launcher schema (no cloud is contacted),
and everything it tells a user to run exists: casd-ray subcommands, experiment files, the
torch pair the Makefile installs."""

import re
from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from casd_ray.cli import build_parser

ROOT = Path(__file__).parent.parent
CLUSTER_YAML = ROOT / "cluster.yaml"


def test_cluster_yaml_is_valid_for_the_launcher():
    config = prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))
    validate_config(config)
    assert config["head_node_type"] in config["available_node_types"]
    workers = [t for t in config["available_node_types"] if t != config["head_node_type"]]
    assert workers and all(config["available_node_types"][w]["min_workers"] == 0 for w in workers)
    # the project and its torch pair are installed on every node, the token reaches every node
    setup = " ".join(config["setup_commands"])
    torch_spec = re.search(r"TORCH_SPEC \?= (.+)", (ROOT / "Makefile").read_text()).group(1)
    assert "casd-ray" in setup and torch_spec.strip() in setup
    assert "~/.ray/auth_token" in config["file_mounts"]
    for cmds in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token" in c for c in config[cmds])


def test_every_command_it_names_exists():
    text = CLUSTER_YAML.read_text()
    subcommands = set(build_parser()._subparsers._group_actions[0].choices)
    named = re.findall(r"casd-ray (\w+) (\S+)", text)
    assert named
    for sub, arg in named:
        assert sub in subcommands, sub
        if arg.endswith(".yaml"):
            assert (ROOT / arg).is_file(), arg
