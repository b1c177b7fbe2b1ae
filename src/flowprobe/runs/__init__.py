"""Runs: the config schema (:mod:`.config`), building a run from a config (:mod:`.build`), loading a model or a
run from a checkpoint (:mod:`.load`), sampling (:mod:`.sampling`), the hooks that bring probes into the loop
(:mod:`.hooks`) and the train / sample jobs (:mod:`.jobs`)."""

from .build import build_data, build_objective, build_run, run_model_spec
from .config import (CouplingConfig, DataConfig, ModelConfig, ObjectiveConfig, OptimConfig, PathConfig, SampleConfig,
                     TrainConfig, default_config_path, resolve_auto)
from .hooks import GradVarHook
from .jobs import TrainResult, fit_options, sample_checkpoint, train_from_config
from .load import LoadedRun, checkpoint_config, load_model, load_run

__all__ = ["TrainConfig", "DataConfig", "ModelConfig", "PathConfig", "CouplingConfig", "OptimConfig",
           "ObjectiveConfig", "SampleConfig", "resolve_auto", "default_config_path", "build_data", "build_objective",
           "build_run", "run_model_spec", "load_model", "load_run", "LoadedRun", "checkpoint_config",
           "train_from_config", "sample_checkpoint", "fit_options", "TrainResult", "GradVarHook"]
