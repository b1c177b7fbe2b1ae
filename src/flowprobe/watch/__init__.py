"""The online memorisation watch: the diagnosis checks on a small fixed probe set, read while training runs.

:class:`MemorizationWatch` holds ``n_probe`` training and ``n_probe`` held-out samples chosen once, and at every
reading runs on the current net

- the membership check (:func:`flowprobe.diagnosis.membership.membership_check`): per-sample losses of the
  training and held-out probes at the times ``times``, their AUC with DeLong intervals (Bonferroni over t);
- the gradient-variance check (:func:`flowprobe.diagnosis.membership.gradvar_check`): the geometric mean over t
  of GV(train) / GV(held-out), ghost per-sample gradients where they apply, else exact;
- every ``copy_every`` steps, the copy check (:func:`flowprobe.diagnosis.copies.copies_check`) on ``n_copy``
  samples pushed forward from the source with a cheap Euler solver, against the held-out probes as baseline (its
  excess copy fraction, and its closeness: how much nearer to training samples the generated samples sit than real
  unseen ones, which moves before copies appear); and, for paired training (``train_sources``), the pairing check
  (:func:`flowprobe.diagnosis.transport.pairing_check`) on the probe pairs with the same solver: how often a training
  source lands nearest its own training partner, over chance. For pairs of a deterministic map (reflow's
  (x0, G(x0))) ``heldout_sources`` gives the held-out targets their own sources, the pairing check is not read, and
  the map check (:func:`flowprobe.diagnosis.transport.map_check`) runs instead on the probe pairs: the share of
  training sources that land on their partners against the share of held-out sources of the same map.

Every generator is re-seeded from ``seed`` at each reading, so the probe samples, the source draws x0, the noise
z and the times are the same at every reading (the readings are comparable along training), the watch keeps no
random state to checkpoint, and the training generators are never touched. The readings are exactly what the
diagnosis functions return on the same net with the same probe set and seed (``tests/test_watch.py``).

The detector (:mod:`flowprobe.watch.detector`; its constants are module constants there) fires at a reading when

1. the reading's memorisation score :func:`memorisation_score` reaches :data:`WATCH_SCORE_THRESHOLD` (with
   ``early=True``, the early-warning threshold of the kind of training, :func:`score_threshold`); the score is the
   log-odds, fitted by logistic regression on the tune half of ``benchmarks/detector.py``, that the run memorises,
   from the reading's max_t membership AUC and -log GV(train) / GV(held-out), and the latest copy closeness and
   pairing excess measured so far (:func:`score_inputs`; their null values 0.5 and 0 before the first copy check or
   without paired sources) (without gradient variance, from the others with their own weights and threshold); or
2. the copy check's excess copy fraction (generated over held-out) has its lower bound above
   :data:`WATCH_COPY_EXCESS` (one reading suffices: a copy is direct evidence); or
3. (held-out pairs of a map) the map check votes memorises (direct evidence too).

When it first fires it warns once (``warnings.warn`` with :class:`MemorizationWarning`, one line: what it saw
and at which step). With ``on_fire="stop"`` a fired reading has ``stop=True``; as a :func:`flowprobe.train.fit`
hook the watch then raises :class:`MemorizationDetected` from ``step(state)`` (checkpoints already written stay
as they are). Readings go to ``log_path`` (JSON lines) and, when TensorBoard is installed, to ``tensorboard_dir``.

Use: ``watch.update(step, net)`` from any loop; ``fit(..., hooks=[watch])``; ``lightning_callback(watch)``.
"""

from .detector import (KINDS, NULL_INPUTS, WATCH_COPY_EXCESS, WATCH_SCORE_THRESHOLD, WATCH_SCORE_THRESHOLD_MEMBERSHIP,
                       WATCH_SCORE_THRESHOLDS, WATCH_SCORE_WEIGHTS, WATCH_SCORE_WEIGHTS_MEMBERSHIP, WatchReading,
                       detect, memorisation_score, score_inputs, score_terms, score_threshold)
from .lightning import LIGHTNING_PACKAGES, lightning_callback, lightning_callback_bases
from .monitor import (DEFAULT_EVERY, DEFAULT_TIMES, WATCH_FAR_FACTOR, MemorizationDetected, MemorizationWarning,
                      MemorizationWatch)

__all__ = ["MemorizationWatch", "WatchReading", "MemorizationDetected", "MemorizationWarning", "lightning_callback",
           "lightning_callback_bases", "LIGHTNING_PACKAGES",
           "memorisation_score", "score_inputs", "score_terms", "detect", "WATCH_SCORE_WEIGHTS", "NULL_INPUTS",
           "WATCH_SCORE_WEIGHTS_MEMBERSHIP",
           "WATCH_SCORE_THRESHOLD", "WATCH_SCORE_THRESHOLD_MEMBERSHIP", "WATCH_FAR_FACTOR", "WATCH_COPY_EXCESS",
           "WATCH_SCORE_THRESHOLDS", "score_threshold", "KINDS",
           "DEFAULT_EVERY", "DEFAULT_TIMES"]
