"""Training: the loop handed its parts (:mod:`.loop`), the fast step (:mod:`.step`), the learning-rate
schedule (:mod:`.schedule`), data-parallel plumbing (:mod:`.distributed`) and the hooks the loop calls
(:mod:`.hooks`). Nothing here knows about configs, data sets, probes or the command line."""

from .distributed import distributed_info
from .hooks import Callback, Checkpointer, DivergenceError, Hook, MetricsLog
from .loop import FitOptions, TrainState, batch_functions, describe, describe_run, fit
from .schedule import LR_SCHEDULES, learning_rate
from .step import PRECISIONS, ema_update_
from .tensorboard import TensorBoardLog

#: e <- decay * e + (1 - decay) * theta for every parameter, buffers copied (:func:`.step.ema_update_`).
ema_update = ema_update_

__all__ = ["fit", "FitOptions", "TrainState", "Hook", "MetricsLog", "Checkpointer", "Callback", "DivergenceError",
           "TensorBoardLog",
           "learning_rate", "LR_SCHEDULES", "PRECISIONS", "distributed_info", "describe", "describe_run",
           "batch_functions",
           "ema_update"]
