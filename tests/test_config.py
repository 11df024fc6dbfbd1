"""Config: YAML + --set overrides, errors that name the field, resolved config written out."""

from pathlib import Path

import pytest
import yaml

from casd_ray.cli import main
from casd_ray.config import ExperimentConfig
from casd_ray.config_file import load_config, save_config
from casd_ray.errors import ConfigError

EXPERIMENTS = sorted(Path(__file__).parent.parent.joinpath("experiments").glob("*.yaml"))


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: demo\nsearch:\n  num_samples: 3\n")
    cfg = load_config(path, ["search.max_epochs=7", "data.root=/tmp/x", "space.budget.target=0.4"])
    assert cfg.name == "demo" and cfg.search.num_samples == 3 and cfg.search.max_epochs == 7
    assert cfg.data.root == "/tmp/x" and cfg.space.budget.target == 0.4
    assert cfg.run_dir == Path("runs") / "demo"


@pytest.mark.parametrize(
    "text, overrides, needle",
    [
        ("search:\n  max_epoch: 3\n", [], "search.max_epoch: unknown key"),
        ("name: t\n", ["search.max_epochs=0"], "search.max_epochs"),
        ("name: t\n", ["space.budget.target=1.5"], "space.budget.target"),
        ("name: t\n", ["search.algorithm=bayes"], "search.algorithm"),
        ("name: t\n", ["nonsense"], "expected key=value"),
        ("name: t\n", ["search.num_samples=[1"], "search.num_samples: "),
        ("name: t\n", ["space.ignore=[stem"], "--set space.ignore: value '[stem' is not valid"),
        ("name: t\n", ["model.arch=resnet7"], "model.arch: unknown architecture"),
        ("name: ../../x\n", [], "name: must be a plain folder name"),
        ("", [], "the config file is empty"),
        ("[1, 2]\n", [], "mapping"),
        ("space:\n  min_ratio: 0.9\n  max_ratio: 0.5\n", [], "min_ratio"),
    ],
)
def test_bad_values_name_the_field(tmp_path, text, overrides, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")) as err:
        load_config(path, overrides)
    assert "\n" not in str(err.value)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["name=x", "seed=3"])
    save_config(cfg, tmp_path / "config.yaml")
    raw = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert raw["seed"] == 3 and raw["search"]["algorithm"] == "optuna-tpe"
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.name for p in EXPERIMENTS])
def test_every_experiment_file_validates(path):
    load_config(path)


def test_cli_bad_config_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("teacher:\n  epochs: -1\n")
    assert main(["teacher", str(path), "--set", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("casd-ray: error: teacher.epochs") and "\n" not in err
    assert main(["teacher", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_a_setting_added_later_keeps_older_run_folders_valid():
    """precise_bn_batches did not exist when older run folders were searched: while off it is
    left out of the search fingerprint (those folders are reused), and once set it counts."""
    from casd_ray.pipeline.plan import fingerprints

    cfg = ExperimentConfig.model_validate({"search": {"precise_bn_batches": 0}})
    off = fingerprints(cfg)["search"]["search"]
    assert "precise_bn_batches" not in off
    on = cfg.model_copy(update={"search": cfg.search.model_copy(update={"precise_bn_batches": 5})})
    assert fingerprints(on)["search"]["search"] == {**off, "precise_bn_batches": 5}


def test_the_configuration_reference_is_current():
    """docs/configuration.md is generated from the models; regenerate it after a change with
    `python -m casd_ray.config_reference > docs/configuration.md`."""
    from casd_ray.config_reference import reference_markdown

    doc = Path(__file__).parent.parent / "docs" / "configuration.md"
    assert doc.read_text() == reference_markdown(), "regenerate docs/configuration.md"
    for key in ("search.precise_bn_batches", "space.budget.target", "finetune.epochs"):
        assert f"`{key}`" in doc.read_text()


def test_duplicate_yaml_keys_are_refused(tmp_path):
    """D8: a second `search:` block must not silently replace the first."""
    path = tmp_path / "c.yaml"
    path.write_text("search:\n  num_samples: 4\nname: x\nsearch:\n  max_epochs: 2\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'search' \(line 4\)"):
        load_config(path)
    path.write_text("search:\n  num_samples: 4\n  num_samples: 5\n")
    with pytest.raises(ConfigError, match="duplicate key 'num_samples'"):
        load_config(path)


@pytest.mark.parametrize(
    "override, field, value",
    [
        ("name=42", "name", "42"),
        ("name=yes", "name", "yes"),
        ("search.num_samples=7", "search.num_samples", 7),
        ("search.lr=1e-3", "search.lr", 1e-3),
        ("search.amp=false", "search.amp", False),
        ("data.split_seed=null", "data.split_seed", None),
        ("teacher.checkpoint=null", "teacher.checkpoint", None),
        ("space.ignore=[stem, head]", "space.ignore", ["stem", "head"]),
        ("model.kwargs={depth: 2}", "model.kwargs", {"depth": 2}),
    ],
)
def test_set_values_take_the_fields_type(override, field, value):
    """D15: `--set` values are read by the field's type, not by YAML's guess."""
    cfg = load_config(None, [override])
    got = cfg
    for key in field.split("."):
        got = getattr(got, key)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("override", ["search.num_samples=true", "search.max_epochs=1.5"])
def test_set_values_of_the_wrong_type_are_refused(override):
    """D15: `search.num_samples=true` ran one trial (YAML's True taken as 1)."""
    with pytest.raises(ConfigError, match=override.split("=")[0] + ":"):
        load_config(None, [override])


@pytest.mark.parametrize("seed", ["-1", str(2**64), str(2**32)])
def test_seeds_out_of_range_are_refused_before_anything_runs(seed):
    """D6: `--set seed=-1` trained the teacher, then failed without naming `seed`."""
    with pytest.raises(ConfigError, match="^seed:"):
        load_config(None, [f"seed={seed}"])
    with pytest.raises(ConfigError, match="^data.split_seed:"):
        load_config(None, [f"data.split_seed={seed}"])


def test_version(capsys):
    """Also seen: there was no `casd-ray --version`."""
    import casd_ray

    with pytest.raises(SystemExit) as code:
        main(["--version"])
    assert code.value.code == 0
    assert capsys.readouterr().out.strip() == f"casd-ray {casd_ray.__version__}"


@pytest.mark.parametrize(
    "command", ["teacher", "search", "finetune", "audit", "run", "compare", "report"]
)
def test_every_subcommand_help_has_a_description_and_an_example(capsys, command):
    """Also seen: subcommand `--help` had neither a description nor an example."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "example:" in out.lower() and f"casd-ray {command} " in out
    assert out.split("\n\n")[1].strip(), "no description under the usage line"


def test_set_a_list_of_names_keeps_them_text():
    """D15: `space.ignore=[0]` (a Sequential's first module) was refused as not a string."""
    assert load_config(None, ["space.ignore=[0, fc, 1e3]"]).space.ignore == ["0", "fc", "1e3"]
