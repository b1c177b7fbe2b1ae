#!/usr/bin/env bash
# GPU runs of the image experiments (CelebA pairs / reflow, CIFAR-10 gradient variance) on one H100.
#
# Usage (from the repository root):   bash benchmarks/gpu_images.sh [MODE]
#
#   MODE = pairs         (default) celeba-pairs, the core claim: N = 1000, sigma in {0, 0.05}, 2000 steps each
#          cifar         cifar-gradvar: forward and backward fields, sigma in {0, 0.05}, 4000 steps each
#          reflow        celeba-reflow: first flow, reflow pairs (N = 2000), second flows sigma in {0, 0.05}
#          pairs-sigmas  celeba-pairs: N = 1000 with sigma in {0.2, 0.5}, the same 2000-step budget as `pairs`
#          pairs-n5000   celeba-pairs: N = 5000 with sigma in {0, 0.05}, 1600 steps (Euler-20 final evaluation)
#          smoke         every experiment at a few steps (about 3 min; checks the CUDA path end to end)
#
# DEVICE (default cuda) and EXTRA (arguments appended to every command) allow a CPU dry run of the
# script itself, e.g.  DEVICE=cpu EXTRA="--quick --set steps=20 --set curve_every=10" bash benchmarks/gpu_images.sh
#
# Each mode is one invocation of at most ~9 minutes (every command has its own timeout), ordered by
# importance: run `pairs` first. Budgets come from step times measured on an H100 (bf16 autocast,
# batch 128, eager): celeba64 UNet (9.6M parameters) ~110 ms/step, cifar10 UNet at 64 channels (9.0M)
# ~22 ms/step; Euler evaluation ~0.28 ms per image per step at 64x64.
#
# Data: the machine has no internet. The tars travel in the git-ignored folder .devdata/
# (.devdata/celeba/images.tar.gz, .devdata/cifar10/train.tar.gz); FLOWPROBE_DATA points there unless set.
# Results go to $OUT/<experiment> when OUT is set, else results/gpu/<experiment>. Every experiment also
# writes partial.json after each trained model, so a run cut by its timeout still leaves its numbers.
set -u
cd "$(dirname "$0")/.."
MODE="${1:-pairs}"
export FLOWPROBE_DATA="${FLOWPROBE_DATA:-.devdata}"
export FLOWPROBE_CACHE="${FLOWPROBE_CACHE:-${TMPDIR:-/tmp}/flowprobe-cache}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"   # works without `pip install -e .`
RESULTS="${OUT:-results/gpu}"
mkdir -p "$RESULTS"
FP="python -m flowprobe.cli"

run() {  # run SECONDS NAME ARGS...: one experiment with a wall-clock limit, its log beside its results
  local limit="$1" name="$2"; shift 2
  mkdir -p "$RESULTS/$name"
  echo "=== $name (limit ${limit} s): $*"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" $FP reproduce "$@" --out "$RESULTS/$name" --device "${DEVICE:-cuda}" ${EXTRA:-} \
    2>&1 | tee "$RESULTS/$name/log.txt" | grep -v -i "warn" | tail -n 25
  echo "=== $name finished in $((SECONDS - t0)) s (exit ${PIPESTATUS[0]})"
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

case "$MODE" in
  pairs)
    # ~8.5 min: 2 x (2000 steps x 0.11 s + Euler-50 evaluation of 1000 sources + 8 curve points)
    run 540 celeba-pairs celeba-pairs
    ;;
  cifar)
    # ~8 min: 4 x (4000 steps x 0.022 s + gradient variance at 13 times x 256 per-sample gradients)
    run 540 cifar-gradvar cifar-gradvar
    ;;
  reflow)
    # ~8 min: first flow 1200 steps, G(x0) for 2000 sources (Euler 50), 2 reflow models x 1000 steps
    run 540 celeba-reflow celeba-reflow
    ;;
  pairs-sigmas)
    # ~8.5 min, comparable with `pairs` (same N, steps and solver)
    run 540 celeba-pairs-sigmas celeba-pairs --set "sigmas=[0.2, 0.5]"
    ;;
  pairs-n5000)
    # ~7.5 min: OT assignment of 5000 x 5000, 2 x (1600 steps + Euler-20 evaluation of 5000 sources)
    run 540 celeba-pairs-n5000 celeba-pairs --set "n_list=[5000]" --set steps=1600 --set solver_steps=20
    ;;
  smoke)
    run 120 smoke-celeba-pairs celeba-pairs --set steps=100 --set curve_every=50 --set n_list=[256]
    run 100 smoke-celeba-reflow celeba-reflow --set first_steps=60 --set steps=60 --set n=256
    run 120 smoke-cifar-gradvar cifar-gradvar --set steps=100 --set gv_samples=64 --set n_train=5000
    ;;
  *)
    echo "unknown mode '$MODE'; choose pairs, cifar, reflow, pairs-sigmas, pairs-n5000 or smoke" >&2
    exit 2
    ;;
esac
echo "results in $RESULTS"
