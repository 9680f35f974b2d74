import pytest

from bsnn.config import Config, TrainConfig, apply_overrides, from_dict, load_config, save_config
from bsnn.errors import ConfigError


def test_defaults_validate():
    cfg = load_config(None)
    assert isinstance(cfg, Config) and cfg.data.name == "mnist5k"


def test_yaml_and_dotted_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 7\n  lr: 0.1\ndistill:\n  method: kd\n")
    cfg = load_config(p, ["train.epochs=3", "distill.temperature=2", "data.root=/x", "train.betas=[0.5, 0.9]"])
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.1 and cfg.distill.temperature == 2.0
    assert cfg.data.root == "/x" and cfg.train.betas == (0.5, 0.9)


def test_round_trip(tmp_path):
    cfg = load_config(None, ["train.epochs=2"])
    save_config(cfg, tmp_path / "r.yaml")
    assert load_config(tmp_path / "r.yaml") == cfg


@pytest.mark.parametrize("override, match", [
    ("train.epochs=0", "epochs must be >= 1"),
    ("train.epochs=two", "expected an integer"),
    ("train.optimizer=rmsprop", "optimizer must be"),
    ("train.epocs=3", "unknown config key 'train.epocs'.*epochs"),
    ("bogus.x=1", "unknown config key 'bogus'"),
    ("distill.method=nope", "unknown distillation method 'nope'.*kd"),
    ("model.teacher=nope", "unknown model 'nope'.*small_cnn"),
    ("binary.scale=row", "binary.scale must be"),
    ("data.val_fraction=1.5", "val_fraction"),
    ("run.quiet=maybe", "expected true/false"),
])
def test_validation_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)


def test_override_syntax():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["train.epochs"])
    assert apply_overrides({"a": {"b": 1}}, ["a.c=x"]) == {"a": {"b": 1, "c": "x"}}


def test_section_from_dict():
    t = from_dict({"epochs": 2, "lr": 1}, TrainConfig)
    assert t.lr == 1.0 and isinstance(t.lr, float)


def test_yaml_12_floats_on_the_command_line_and_in_files(tmp_path):
    """``1e30`` / ``1e-3`` are numbers (YAML 1.2), not the strings PyYAML's YAML 1.1 resolver makes of them."""
    assert load_config(None, ["train.lr=1e30"]).train.lr == 1e30
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 2e-3\n  weight_decay: 5E-4\n")
    cfg = load_config(p)
    assert cfg.train.lr == 2e-3 and cfg.train.weight_decay == 5e-4
    assert apply_overrides({}, ["a.b=1e", "a.c=e5", "a.d=1_000"])["a"] == {"b": "1e", "c": "e5", "d": 1000}


@pytest.mark.parametrize("override, match", [
    ("train.lr=.inf", r"train.lr: expected a finite number, got inf"),
    ("train.lr=.nan", r"train.lr: expected a finite number"),
    ("train.betas=[2,3]", r"betas must be two numbers in \[0, 1\)"),
    ("train.betas=[0.9,x]", r"betas must be two numbers"),
    ("train.momentum=1.5", r"momentum must be in \[0, 1\)"),
    ("simulate.timesteps=[true]", r"simulate.timesteps must be a list of positive integers"),
    ("simulate.max_samples=-1", r"simulate.max_samples must be a positive number"),
    ("data.limit_test=0", r"data.limit_test must be a positive number"),
    ("cost.timesteps=0", r"cost.timesteps must be a positive integer"),
])
def test_non_finite_and_out_of_range_values(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_binary_config_file_is_a_config_error(tmp_path):
    p = tmp_path / "model.pt"
    p.write_bytes(b"\x80\x02\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match=r"not a text file.*pass an existing YAML file"):
        load_config(p)
    q = tmp_path / "ctrl.yaml"
    q.write_bytes(b"train:\n  lr: \x07\n")
    with pytest.raises(ConfigError, match="not valid YAML") as e:
        load_config(q)
    assert "\n" not in str(e.value)
