"""cluster.yaml is checked against Ray's own cluster-launcher schema (no cloud is contacted)."""

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).parent.parent / "cluster.yaml"


def test_cluster_yaml_is_valid_for_the_launcher():
    config = prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))
    validate_config(config)
    assert config["head_node_type"] in config["available_node_types"]
    workers = [t for t in config["available_node_types"] if t != config["head_node_type"]]
    assert workers and all(config["available_node_types"][w]["min_workers"] == 0 for w in workers)
    # the project itself is installed on every node
    assert any("casd-ray" in cmd for cmd in config["setup_commands"])
