import pytest

from skyfed.config import load_config, parse_override
from skyfed.errors import ConfigError


def test_default_preset_has_three_clouds():
    cfg = load_config()
    assert [c.name for c in cfg.federation.clients] == ["aws", "gcp", "azure"]
    assert cfg.model.preset == "gpt2-tiny"
    assert cfg.federation.strategy.name == "fedavg"


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(preset="smoke", overrides=["train.lr=0.01", "federation.rounds=7", "train.betas=[0.8, 0.9]"])
    assert cfg.train.lr == 0.01
    assert cfg.federation.rounds == 7
    assert cfg.train.betas == (0.8, 0.9)
    assert parse_override("data.path=/x/y") == ("data.path", "/x/y")


def test_yaml_file_merges_over_preset(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: mine\ntrain:\n  local_steps: 3\n")
    cfg = load_config(path, preset="smoke")
    assert cfg.name == "mine"
    assert cfg.train.local_steps == 3
    assert cfg.train.batch_size == 4  # still the smoke preset's


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.nonsense=1"], "train.nonsense: unknown key"),
        (["federation.rounds=abc"], "federation.rounds: Input should be a valid integer"),
        (["train.lr=-1"], "train.lr: Input should be greater than 0"),
        (["federation.clients=[{name: a}, {name: a}]"], "client names must be unique"),
        (["rounds"], "expected KEY=VALUE"),
        (["federation.clients=[{name: a, local_steps: 0}]"], "local_steps: Input should be greater than or equal to 1"),
        (["security.secure_aggregation=true", "federation.strategy.name=fedbuff", "federation.steps_by_speed=true"],
         "security.secure_aggregation with fedbuff needs equal local steps"),
    ],
)
def test_bad_config_names_the_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(preset="smoke", overrides=overrides)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'; available: default, smoke"):
        load_config(preset="nope")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_invalid_yaml_reports_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: invalid YAML"):
        load_config(path)
