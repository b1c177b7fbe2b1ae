"""Config loading: types, constraints, nested keys and overrides fail with one line naming the key."""

from dataclasses import dataclass, field

import pytest

from flowprobe.config import ConfigError, from_dict, load_config, option, to_dict


@dataclass
class Inner:
    width: int = option(64, ge=1)
    act: str = option("silu", choices=("silu", "relu"))


@dataclass
class Outer:
    lr: float = option(1e-3, gt=0)
    steps: int = 10
    sigmas: list[float] = field(default_factory=lambda: [0.0, 0.05])
    name: str | None = None
    model: Inner = field(default_factory=Inner)


def test_defaults_overrides_and_round_trip(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 1e-2\nmodel:\n  width: 32\n")
    cfg = load_config(Outer, p, ["model.act=relu", "sigmas=[0, 0.5]", "steps=20"])
    assert cfg.lr == 0.01 and cfg.model.width == 32 and cfg.model.act == "relu"
    assert cfg.sigmas == [0.0, 0.5] and cfg.steps == 20
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize("overrides, key", [
    (["model.widht=3"], "model.widht"),
    (["model.width=0"], "model.width"),
    (["model.act=tanh"], "model.act"),
    (["lr=-1"], "lr"),
    (["steps=abc"], "steps"),
    (["sigmas=[0, x]"], "sigmas[1]"),
    (["steps"], "steps"),
])
def test_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(Outer, None, overrides)
    msg = str(e.value)
    assert msg.startswith(key + ":") or msg.startswith(key)
    assert "\n" not in msg


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Outer, bad)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("lr: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(Outer, unsafe)

