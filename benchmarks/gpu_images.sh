#!/usr/bin/env bash
# GPU runs of the image experiments (CelebA pairs / reflow, CIFAR-10 gradient variance) on one H100.
#
# Usage (from the repository root):   bash benchmarks/gpu_images.sh [MODE]
#
#   MODE = pairs         (default) celeba-pairs, the core claim: N = 1000, sigma in {0, 0.05}, 2000 steps each
#                        [run 2026-11-23 on an H100: 490 s; docs/reproduction.md]
#          pairs-rest    the rest of the sigma x N grid at the same 2000-step budget, two processes side by side:
#                        N = 1000 with sigma in {0.2, 0.5}, and N = 5000 with sigma in {0, 0.05} (Euler-20 final
#                        evaluation); ~9 min
#          cifar-sigma05 cifar-gradvar, sigma = 0.05, forward and backward side by side, 2500 steps each (the
#                        sigma = 0 fields were run at 2500 steps on 2026-11-23); ~6-8 min
#          steps         benchmarks/train_step.py on the experiments' own nets (cifar10-64, celeba64; batch 128):
#                        eager fp32 / tf32 / bf16 / bf16 + channels_last, and compiled with CUDA graphs; ~5 min.
#                        Decides which precision and layout "auto" should mean for eager image training
#          gvbench       the CIFAR-10 UNet gradient-variance benchmark alone on the GPU (ghost with the auto
#                        rule and with each convolution rule forced, naive, exact; ~5 min): re-measures ghost
#                        vs exact after the centred-variance change, and grouped vs im2col weight gradients
#          reflow        celeba-reflow: first flow, reflow pairs (N = 2000), second flows sigma in {0, 0.05}
#          pairs-sigmas  celeba-pairs: N = 1000 with sigma in {0.2, 0.5}, the same 2000-step budget as `pairs`
#          pairs-n5000   celeba-pairs: N = 5000 with sigma in {0, 0.05}, 1600 steps (Euler-20 final evaluation)
#          cifar         cifar-gradvar, all four fields at 4000 steps: ~25 min at the measured step time, so it
#                        does NOT fit one call; kept for machines with a faster host (or with compile)
#          smoke         every experiment at a few steps (about 3 min; checks the CUDA path end to end)
#          compile-smoke celeba-pairs at N = 256, 300 steps, eager and then compile=reduce-overhead (CUDA graphs):
#                        compare train_s in the two reports before using compile in the long runs; ~4 min
#          gvbench-cifar gvbench (limit 180 s), then cifar-gradvar at 2500 steps per field
#          sweep32       celeba-pairs at 32x32 (four sigmas at N = 1000, two at N = 5000) beside the
#                        pair-memorization phase diagram, three processes side by side; ~9 min
#
# DEVICE (default cuda) and EXTRA (arguments appended to every command) allow a CPU dry run of the
# script itself, e.g.  DEVICE=cpu EXTRA="--quick --set steps=20 --set curve_every=10" bash benchmarks/gpu_images.sh
#
# Each mode is one invocation of at most ~9 minutes (every command has its own timeout). `pairs` ran on
# 2026-11-23; left, in order: compile-smoke (~4 min; if CUDA graphs work inside fit, add
# EXTRA="--set compile=reduce-overhead" to the long runs), gvbench (~5 min), pairs-rest, cifar-sigma05,
# steps, reflow. Budgets come from step times measured on an H100 inside `fit` (bf16
# autocast, batch 128, eager): celeba64 UNet (9.6M parameters) at 64x64 ~105 ms/step, cifar10 UNet at
# 64 channels (9.0M) at 32x32 ~88 ms/step (2026-11-23). Both appear bound by the host's kernel launches
# rather than the GPU (the larger image costs little more), which is why two runs side by side on one
# GPU take about the time of one; `--set compile=reduce-overhead` (CUDA graphs; 3.4x in
# benchmarks/train_step.py) is the next thing to try, after a short smoke run. Euler evaluation ~0.28 ms
# per image per step at 64x64.
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
  pairs-rest)
    run 560 celeba-pairs-sigmas celeba-pairs --set "sigmas=[0.2, 0.5]" > /dev/null &
    run 560 celeba-pairs-n5000 celeba-pairs --set "n_list=[5000]" --set "sigmas=[0.0, 0.05]" --set solver_steps=20 > /dev/null &
    wait
    for d in celeba-pairs-sigmas celeba-pairs-n5000; do echo "== $d"; grep -v -i warn "$RESULTS/$d/log.txt" | tail -n 12; done
    ;;
  cifar-sigma05)
    for dir in forward backward; do
      run 560 "cifar-gradvar-$dir-sigma0.05" cifar-gradvar --set steps=2500 --set "directions=[$dir]" \
        --set "sigmas=[0.05]" > /dev/null &
    done
    wait
    for dir in forward backward; do echo "== $dir"; grep -v -i warn "$RESULTS/cifar-gradvar-$dir-sigma0.05/log.txt" | tail -n 6; done
    ;;
  steps)
    mkdir -p "$RESULTS/train-step"
    for net in cifar10-64 celeba64; do
      timeout --signal=INT 280 python benchmarks/train_step.py --net "$net" --device "${DEVICE:-cuda}" \
        --variants ours-fp32,ours-tf32,ours-bf16,ours-bf16-cl,ours-bf16-cl-compile-cudagraphs \
        --json "$RESULTS/train-step/$net.json" ${BENCH_EXTRA:-} 2>&1 | grep -v -i warn | tee "$RESULTS/train-step/$net.txt"
    done
    ;;
  gvbench)
    mkdir -p "$RESULTS/gradvar-bench"
    timeout --signal=INT 330 python benchmarks/gradvar.py --model unet --device "${DEVICE:-cuda}" --repeat 1 \
      --methods ghost,ghost-unfold,ghost-grouped,exact,naive --json "$RESULTS/gradvar-bench/gv_unet.json" ${BENCH_EXTRA:-} 2>&1 \
      | tee "$RESULTS/gradvar-bench/log.txt"
    ;;
  gvbench-cifar)
    mkdir -p "$RESULTS/gradvar-bench"
    echo "=== gradvar benchmark (limit 180 s)"
    timeout --signal=INT 180 python benchmarks/gradvar.py --model unet --device "${DEVICE:-cuda}" --repeat 1 \
      --json "$RESULTS/gradvar-bench/gv_unet.json" ${BENCH_EXTRA:-} 2>&1 | tee "$RESULTS/gradvar-bench/log.txt"
    run 390 cifar-gradvar cifar-gradvar --set steps=2500
    ;;
  sweep32)
    run 540 celeba32-n1000 celeba-pairs --set resolution=32 --set "n_list=[1000]" \
      --set "sigmas=[0.0, 0.05, 0.2, 0.5]" --set steps=2000 --set curve_every=200 > /dev/null &
    run 540 celeba32-n5000 celeba-pairs --set resolution=32 --set "n_list=[5000]" \
      --set "sigmas=[0.0, 0.05]" --set steps=4000 --set curve_every=400 --set solver_steps=20 > /dev/null &
    run 540 pair-memorization-phase pair-memorization > /dev/null &
    wait
    for d in celeba32-n1000 celeba32-n5000 pair-memorization-phase; do echo "== $d"; tail -n 15 "$RESULTS/$d/log.txt"; done
    ;;
  compile-smoke)
    run 150 compile-smoke-eager celeba-pairs --set steps=300 --set curve_every=300 --set "n_list=[256]"
    run 240 compile-smoke-graphs celeba-pairs --set steps=300 --set curve_every=300 --set "n_list=[256]" \
      --set compile=reduce-overhead
    grep -h "train .* s, eval" "$RESULTS"/compile-smoke-*/log.txt || true
    ;;
  smoke)
    run 120 smoke-celeba-pairs celeba-pairs --set steps=100 --set curve_every=50 --set n_list=[256]
    run 100 smoke-celeba-reflow celeba-reflow --set first_steps=60 --set steps=60 --set n=256
    run 120 smoke-cifar-gradvar cifar-gradvar --set steps=100 --set gv_samples=64 --set n_train=5000
    ;;
  *)
    echo "unknown mode '$MODE'; choose pairs, pairs-rest, cifar-sigma05, steps, gvbench, reflow, pairs-sigmas, pairs-n5000, cifar, smoke, compile-smoke, gvbench-cifar or sweep32" >&2
    exit 2
    ;;
esac
echo "results in $RESULTS"
