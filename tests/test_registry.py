"""The experiment registry: every experiment has a configs/NAME.yaml equal to its defaults, and the
--config / --set / --quick layers apply in order."""

from pathlib import Path

import pytest
import yaml

from flowprobe.config import ConfigError, from_dict
from flowprobe.experiments import REGISTRY, run_experiment
from flowprobe.experiments.registry import _load_all, default_config_yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
_load_all()


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_experiment_has_a_config_file_equal_to_its_defaults(name):
    exp = REGISTRY[name]
    path = CONFIGS / f"{name}.yaml"
    assert path.is_file(), f"configs/{name}.yaml is missing (flowprobe reproduce {name} --print-config)"
    assert from_dict(exp.config_cls, yaml.safe_load(path.read_text())) == exp.config_cls()
    # the generated text reads back to the defaults too
    assert from_dict(exp.config_cls, yaml.safe_load(default_config_yaml(name))) == exp.config_cls()


def test_config_file_then_overrides(tmp_path):
    cfg = tmp_path / "g.yaml"
    cfg.write_text("chunk_size: 5000\nrk4_draws: 500\n")
    res = run_experiment("gaussian-gradvar", tmp_path / "out", quick=True, config_file=cfg,
                         overrides=["rk4_draws=400"], device="cpu", verbose=False)
    assert res["config"]["chunk_size"] == 5000                 # from the file
    assert res["config"]["rk4_draws"] == 400                   # --set wins over the file
    quick = REGISTRY["gaussian-gradvar"].quick
    for k, v in quick.items():                                 # --quick sizes still apply
        if k != "rk4_draws":
            assert res["config"][k] == v
    assert (tmp_path / "out" / "report.md").is_file()


def test_bad_config_key_names_it(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("no_such_key: 1\n")
    with pytest.raises(ConfigError, match="no_such_key"):
        run_experiment("gaussian-gradvar", tmp_path / "out", quick=True, config_file=cfg, device="cpu", verbose=False)
