#!/usr/bin/env bash
# The GPU benchmark: TRL (anchor harness) and midpo's step on the same machine, one process per mode.
# Run from the repo root on the GPU machine, with bench_anchor.py copied into .gpu/ (see docs/benchmarks.md).
set -u
log=${1:-bench.log}
(cd .gpu && for m in trl trl_precompute; do python3 bench_anchor.py $m 2>&1 | grep RESULT; done) | tee "$log"
for p in tdpo dpo simpo; do python3 benchmarks/bench_step.py $p 2>&1 | grep RESULT; done | tee -a "$log"
CACHED=1 python3 benchmarks/bench_step.py dpo 2>&1 | grep RESULT | tee -a "$log"
LORA=16 python3 benchmarks/bench_step.py dpo 2>&1 | grep RESULT | tee -a "$log"
LORA=16 TWO_COPIES=1 python3 benchmarks/bench_step.py dpo 2>&1 | grep RESULT | tee -a "$log"
python3 benchmarks/summarize.py "$log"
