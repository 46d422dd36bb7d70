#!/usr/bin/env bash
# The one script a GPU device call runs: headline benchmarks first, then tests, in < 10 minutes.
#
#   device run tool: timeout_s=600, command:
#   EFFNET_COMMIT=<sha> bash scripts/gpu_session.sh        (run from the repository root)
#
# A 15-minute device allowance holds the machine's start (1-2 min) and one 600 s command;
# this script ends by SESSION_BUDGET (570 s), so $OUT comes back before the command's limit.
#
# Order and time slots (seconds; the default slots add up to SESSION_BUDGET less 20 s for
# the summary = 550; each step must end by the sum of its own and the earlier wanted steps'
# slots, and all by SESSION_BUDGET - 20, so a step that ends early passes its time on to the
# next ones, and one that runs long is stopped at its end and cannot eat a later step's slot):
#   env      15  nvidia-smi, python / torch / CUDA / cuDNN / Triton / nvcc versions
#   build    90  effnet_kernels._C for sm_90 only (EFFNET_KERNELS_CUDA_ARCHS=90); if no
#                usable _C comes out, the fused-cuda* providers (and the ops' cuda) are dropped
#                from every later step, and the tests do not JIT-build it again
#   precompile 40  python -m benchmarks.precompile: every Triton kernel the fused-triton rows of
#                net256, net1 and train will launch (their gate forwards, the tuner's candidates and
#                the training step's backward kernels included), compiled in PRECOMPILE_JOBS worker
#                processes at once into Triton's on-disk cache (each distinct kernel in one worker, no
#                kernel launched), so those steps load kernels instead of compiling them one by one
#                inside their own slots; the plan follows NET_MODELS, NET256_BATCHES and the
#                fused-triton groups of TRAIN_PLAN (PRECOMPILE_PLAN replaces it)
#   pretune  35  python -m benchmarks.tune: the Triton configs of every B0-B7 depthwise, 1x1
#                (expand, projection, head) and stem conv shape at the batches net256, net1 and
#                ops use (TUNE_BATCHES; each batch's heaviest shapes first) into the tuning
#                store (candidates compiled in TUNE_JOBS workers, then timed in one process), so
#                the benchmarks read measured configs instead of tuning within their own 30 s;
#                the store comes back as $OUT/tuning_store.json (rows: triton_tune classes=...)
#   net256  140  the headline: B0-B7 bs256 fp16 channels_last, eager, eager-folded,
#                fused-triton, fused-cuda (model by model, so a cut keeps whole models)
#   compile  80  torch.compile at bs256: B0 with compile, fused-triton+compile,
#                fused-cuda+compile, then B4 with compile (~a minute per compile)
#   net1     30  B0-B7 at batch 1, eager and CUDA-graph replay, the net256 providers
#   train    40  one training step (forward, backward, SGD) of B0 and B4 at bs128 fp16
#                channels_last: eager, fused-triton, fused-cuda (img/s and peak memory), then
#                B0 with torch.compile and fused-triton+compile if the slot has time left
#   tests    60  pytest -m "gpu or adapters": parity files first (test_ops_parity,
#                test_triton_gpu, test_cuda_ops, test_convert_*), then the rest; junit XML
#   ops      20  op benchmarks (dwconv, SE, pointwise 1x1 convs) at B0-B7 layer shapes, batch 32:
#                377 distinct shapes (173 pointwise), more than the slot's ~15 s budget holds (not
#                yet timed on a GPU: each shape times 3 providers for >= 0.07 s each), so
#                --order classes runs first one shape of each auto-table class (36 shapes decide
#                all 37 classes), then the rest in block order until the budget stops starting shapes
#   sanitizer 60, microbench 60: off by default (SANITIZER=1, MICROBENCH=1); they come
#                after ops, so leave other steps out (STEPS) or shrink their slots to make room
# Every step has its own log and runs even if an earlier one failed. The network steps
# append each row to $OUT/results.csv as it is measured; after a sticky CUDA error the
# benchmark exits 75 having recorded the failing job, and the step reruns the same command
# with --resume (same EFFNET_RUN_ID) while its slot has time left.
#
# Results come back in $OUT (at most 8 files; here at most 7): results.csv, ops.csv,
# junit_gpu.xml, microbench.json (if run), tuning_store.json (the Triton tuning store: measured
# configs with every candidate's timing), logs.tar.gz (every step's log, each cut to
# LOG_MAX_KB, refreshed after each step) and summary.txt (rewritten after each step).
# Append the rows to the committed CSVs with `python -m benchmarks.records`; merge the measured
# configs into the shipped table with `python -m benchmarks.tune --promote <returned>/tuning_store.json`.
#
# Knobs (environment variables; defaults in brackets):
#   EFFNET_COMMIT      commit recorded in the CSVs (the device copy has no .git) [unknown]
#   EFFNET_RUN_ID      run id of every row and of --resume [UTC time + random, per session]
#   STEPS              which steps (always run in the order above) [env,build,precompile,pretune,net256,compile,net1,train,tests,ops]
#   SESSION_BUDGET     seconds for the whole script [570] (device tool: timeout_s=600)
#   T_ENV T_BUILD T_PRECOMPILE T_PRETUNE T_NET256 T_COMPILE T_NET1 T_TRAIN T_TESTS T_OPS T_SANITIZER T_MICRO
#                      slots [15, 90, 40, 35, 140, 80, 30, 40, 60, 20, 60, 60]
#   PRECOMPILE_PLAN    MODELS:PROVIDERS:BATCHES:MODES groups [from NET_MODELS, NET256_BATCHES, TRAIN_PLAN]
#   PRECOMPILE_JOBS    precompile's worker processes [8]
#   TRAIN_PLAN ["b0,b4:eager,fused-triton,fused-cuda b0:compile,fused-triton+compile"] (or
#   TRAIN_MODELS [b0,b4] + TRAIN_PROVIDERS [eager,fused-triton,fused-cuda] for one group)  TRAIN_BATCHES [128]
#   TUNE_BATCHES       batches pretune tunes, in order [$NET256_BATCHES,1,32 = 256,1,32]
#   TUNE_JOBS          pretune's compile workers [8]
#   EFFNET_KERNELS_TUNING_CACHE   the tuning store's directory [~/.cache/effnet_kernels/tuning]
#   NET_MODELS         [b0,b1,b2,b3,b4,b5,b6,b7]   (net256 and net1)
#   NET_PROVIDERS      [eager,eager-folded,fused-triton,fused-cuda]  (channels_last; name@nchw for NCHW)
#   NET_DTYPES         [fp16]
#   NET256_BATCHES     [256]   (shrinks to the largest batch that fits)
#   COMPILE_PLAN       space-separated MODELS:PROVIDERS groups, one benchmark run each, in order
#                      ["b0:compile,fused-triton+compile,fused-cuda+compile b4:compile"]
#   COMPILE_MODELS, COMPILE_PROVIDERS   if either is set: one group instead [b0 / compile]
#   COMPILE_BATCHES    [256]
#   NET_ARGS           extra args for every network run, e.g. "--modes infer,train"
#   MAX_RESUMES        reruns with --resume after exit code 75, per benchmark command [5]
#   TESTS_FIRST        test files run first [tests/test_ops_parity.py tests/test_triton_gpu.py
#                      tests/test_cuda_ops.py tests/test_convert_*.py]; then every other tests/test_*.py
#   PYTEST_WORKERS     pytest-xdist workers for the GPU tests, 0 = one process [3; 0 without xdist]
#   PYTEST_TIMEOUT     seconds per test, where pytest-timeout imports [20]
#   PYTEST_ARGS        extra args for the GPU test step, e.g. "-k triton"
#   TESTS_TRITON_TUNE  Triton tuning during the tests step [0]
#   OPS_PROVIDERS      [eager,triton,cuda]   MICROBENCH_PROVIDERS [eager,triton,cuda]
#   OPS_ARGS           args for python -m benchmarks.ops [--models b0,...,b7 --batch 32 --dtypes fp16 --order classes
#                      (fast timing)]
#   SANITIZER=1        add step sanitizer: compute-sanitizer memcheck of benchmarks/cuda_ops_once.py [0]
#   MICROBENCH=1       add step microbench: the pytest-benchmark suite benchmarks/microbench [0]
#   LOG_MAX_KB         each step's log is cut to its first quarter and last three quarters of this [1024]
# The GPU tests stop starting new tests PYTEST_TIMEOUT + 5 s (25 s) before their slot ends
# (benchmarks/pytest_deadline.py), so junit_gpu.xml and the failure summary are always written.
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export EFFNET_KERNELS_CUDA_ARCHS="${EFFNET_KERNELS_CUDA_ARCHS:-90}"
export EFFNET_RUN_ID="${EFFNET_RUN_ID:-$(date -u +%Y%m%dT%H%M%SZ)-$RANDOM$RANDOM}"
[[ -n "${EFFNET_COMMIT:-}" ]] && export EFFNET_COMMIT  # else benchmarks/env.py asks git, then says "unknown"
OUT="${OUT:-$PWD/out}"
PY="${PYTHON:-python3}"
LOGS="$(mktemp -d /tmp/effnet_logs.XXXXXX)/logs"
mkdir -p "$OUT" "$LOGS"
STEPS="${STEPS:-env,build,precompile,pretune,net256,compile,net1,train,tests,ops}"
[[ "${SANITIZER:-0}" != 0 ]] && STEPS+=",sanitizer"
[[ "${MICROBENCH:-0}" != 0 ]] && STEPS+=",microbench"
SESSION_START=$SECONDS
SESSION_BUDGET="${SESSION_BUDGET:-570}"
STEPS_END=$(( SESSION_START + SESSION_BUDGET - 20 ))  # 20 s for the summary and the report
PLAN_END=$SESSION_START  # end of the last step's slot
CUDA_DROPPED=""          # why the fused-cuda providers were dropped ("" = they were not)
SUMMARY=()
NOTES=()

want() { [[ ",$STEPS," == *",$1,"* ]]; }

# write_summary [FINAL]: $OUT/summary.txt, after every step (FINAL adds the report)
write_summary() {
    {
        echo "gpu_session: run ${EFFNET_RUN_ID}, commit ${EFFNET_COMMIT:-unknown}, $((SECONDS - SESSION_START))s of ${SESSION_BUDGET}s${1:+, done}"
        [[ -z "${EFFNET_COMMIT:-}" ]] && echo "WARNING: no EFFNET_COMMIT given: the CSV rows say what git says, or commit=unknown"
        printf '%s\n' "${SUMMARY[@]}"
        (( ${#NOTES[@]} )) && printf 'NOTE: %s\n' "${NOTES[@]}"
        # fused-triton rows after this message ran untuned (default) launch configs
        grep -l "Triton tuning budget used up" "$LOGS"/*.log 2>/dev/null | sed 's|.*/|NOTE: Triton tuning budget used up in |'
        grep -h "^benchmarks.tune: \|time budget of .* shapes not tuned" "$LOGS"/pretune.log 2>/dev/null | cut -c1-300
        for f in "$OUT"/results.csv "$OUT"/ops.csv; do
            [[ -f $f ]] && echo "$(basename "$f"): $(($(wc -l <"$f") - 1)) rows"
        done
        if [[ -n "${1:-}" && -f "$OUT/results.csv" ]]; then
            timeout 15 "$PY" -m benchmarks.report --csv "$OUT/results.csv" --ops-csv /nonexistent --no-plots 2>&1 | tail -n 80
        fi
    } >"$OUT/summary.txt.tmp"
    mv "$OUT/summary.txt.tmp" "$OUT/summary.txt"
}

# bound_log FILE: keep the first quarter and the last three quarters of LOG_MAX_KB
bound_log() {
    local max=$(( ${LOG_MAX_KB:-1024} * 1024 )) size
    size=$(wc -c <"$1" 2>/dev/null) || return 0
    (( size > max )) || return 0
    { head -c $(( max / 4 )) "$1"; printf '\n[... %s bytes cut by gpu_session.sh ...]\n' $(( size - max )); tail -c $(( max * 3 / 4 )) "$1"; } >"$1.cut"
    mv "$1.cut" "$1"
}

# run_until END CMD...: CMD under timeout until SECONDS reaches END, output appended to $LOG
run_until() {
    local end=$1; shift
    local left=$(( end - SECONDS ))
    printf '+ %s\n' "$*" >>"$LOG"
    if (( left < 1 )); then
        echo "not run: no time left in this step" >>"$LOG"
        return 124
    fi
    timeout --signal=TERM --kill-after=5 "$left" "$@" >>"$LOG" 2>&1
}
run() { run_until "$DEADLINE" "$@"; }

# step NAME SLOT FUNCTION ARGS...: FUNCTION runs with $DEADLINE (its slot's end) and $LOG set
step() {
    local name=$1 slot=$2; shift 2
    want "$name" || return 0
    PLAN_END=$(( PLAN_END + slot ))
    DEADLINE=$(( PLAN_END < STEPS_END ? PLAN_END : STEPS_END ))
    local budget=$(( DEADLINE - SECONDS )) t0=$SECONDS rc
    if (( budget < 10 )); then
        SUMMARY+=("$(printf '%-10s skipped: session budget used up' "$name")")
        write_summary
        return
    fi
    LOG="$LOGS/$name.log"
    STEP_NOTE=""
    echo "=== [$((SECONDS - SESSION_START))s] $name (budget ${budget}s)"
    "$@"
    rc=$?
    (( rc == 124 || rc == 137 )) && STEP_NOTE+=" (timed out)"
    SUMMARY+=("$(printf '%-10s rc=%-3s %4ss%s' "$name" "$rc" "$((SECONDS - t0))" "$STEP_NOTE")")
    bound_log "$LOG"
    tail -n 5 "$LOG" | sed 's/^/    /'
    tar czf "$OUT/logs.tar.gz" -C "$(dirname "$LOGS")" logs 2>/dev/null
    write_summary
}

# without_cuda LIST: the comma list without fused-cuda* (network) and cuda (ops) once the build failed
without_cuda() {
    if [[ -z "$CUDA_DROPPED" ]]; then
        echo "$1"
        return
    fi
    local item kept=()
    IFS=, read -ra items <<<"$1"
    for item in "${items[@]}"; do
        [[ "$item" == fused-cuda* || "$item" == cuda ]] || kept+=("$item")
    done
    (IFS=,; echo "${kept[*]}")
}

# net TAIL ARGS...: the network benchmark, told to stop starting jobs TAIL s before the
# step's end; rerun with --resume while it exits 75 (sticky CUDA error, failing job recorded)
net() {
    local tail=$1; shift
    local rc resume=() tries=0 left budget
    while :; do
        left=$(( DEADLINE - SECONDS ))
        if (( left < 10 )); then
            echo "not run: ${left}s left in this step" >>"$LOG"
            return 124
        fi
        budget=$(( left > 2 * tail ? left - tail : left / 2 ))
        run "$PY" -m benchmarks.network --dtypes "${NET_DTYPES:-fp16}" --out "$OUT/results.csv" \
            "$@" --time-budget "$budget" ${resume[@]+"${resume[@]}"} ${NET_ARGS:-}
        rc=$?
        (( rc == 75 )) || return $rc
        if (( tries >= ${MAX_RESUMES:-5} || DEADLINE - SECONDS < 10 )); then
            echo "exit 75 after ${tries} reruns: not rerunning (MAX_RESUMES or no time left)" >>"$LOG"
            STEP_NOTE=" (exit 75: resumed ${tries}x, then gave up)"
            return 75
        fi
        tries=$(( tries + 1 ))
        STEP_NOTE=" (exit 75: resumed ${tries}x)"
        echo "exit 75 (sticky CUDA error): rerunning with --resume" >>"$LOG"
        resume=(--resume)
    done
}

env_step() {
    run bash -c "nvidia-smi; $PY -c 'import torch, triton, sys; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"cudnn\", torch.backends.cudnn.version(), \"triton\", triton.__version__); print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))'; nvcc --version; $PY -m pip list 2>/dev/null | grep -i -E 'torch|triton|timm|pytest|matplotlib'; $PY -c \"from benchmarks.env import git_commit; print('commit', git_commit())\"; echo run_id \$EFFNET_RUN_ID archs \$EFFNET_KERNELS_CUDA_ARCHS"
}

build_step() {
    # setup.py builds effnet_kernels._C in place when it knows how; otherwise the build
    # module does. 15 s of the slot stay for the checks.
    local so compile_end=$(( DEADLINE - 15 ))
    so=$(timeout 30 "$PY" -c 'from effnet_kernels import _build as b; print(b.package_dir() / b.ext_filename())' 2>>"$LOG")
    run_until "$compile_end" "$PY" setup.py build_ext --inplace
    [[ -n "$so" && -f "$so" ]] || run_until "$compile_end" "$PY" effnet_kernels/_build.py
    run "$PY" -m effnet_kernels info
    if [[ -n "$so" && -f "$so" ]] && run "$PY" -c 'import sys, effnet_kernels as ek; s = ek.available_backends()["cuda"]; print("cuda backend usable:", s.available); sys.exit(0 if s.available else 1)'; then
        return 0
    fi
    CUDA_DROPPED="the build step left no usable ${so:-effnet_kernels/_C*.so}"
    NOTES+=("fused-cuda* providers and the ops' cuda provider dropped from later steps: $CUDA_DROPPED (see build.log); the tests do not JIT-build it again")
    return 1
}

# save_store: the tuning store's file for this GPU as $OUT/tuning_store.json
save_store() {
    local dir files
    dir=$(timeout 30 "$PY" -c 'from effnet_kernels.triton import _tuning_store as s; print(s.directory())' 2>/dev/null) || return 0
    files=("$dir"/v1/*.json)
    [[ -f "${files[0]}" ]] && cp "${files[0]}" "$OUT/tuning_store.json"
    return 0
}

# precompile_plan: benchmarks.precompile's --plan for the fused-triton rows net256, net1 and train will run
precompile_plan() {
    local plan="" group
    if [[ ",${NET_PROVIDERS:-eager,eager-folded,fused-triton,fused-cuda}," == *",fused-triton,"* ]]; then
        plan="${NET_MODELS:-b0,b1,b2,b3,b4,b5,b6,b7}:fused-triton:${NET256_BATCHES:-256},1:infer"
    fi
    for group in $(train_plan); do
        [[ ",${group#*:}," == *",fused-triton,"* ]] && plan+="${plan:+ }${group%%:*}:fused-triton:${TRAIN_BATCHES:-128}:train"
    done
    echo "$plan"
}

precompile_step() {
    # the workers are stopped 5 s before the slot ends; what they compiled is in Triton's cache
    local left=$(( DEADLINE - SECONDS )) plan
    plan="${PRECOMPILE_PLAN:-$(precompile_plan)}"
    if [[ -z "$plan" ]]; then
        echo "not run: no fused-triton rows in this session's plan" >>"$LOG"
        return 0
    fi
    run "$PY" -m benchmarks.precompile --plan "$plan" --dtypes "${NET_DTYPES:-fp16}" \
        --jobs "${PRECOMPILE_JOBS:-8}" --time-budget $(( left > 10 ? left - 5 : left / 2 ))
}

pretune_step() {
    # stops starting shapes 10 s before its end: a shape whose candidates did not get compiled by
    # the workers compiles 4-5 kernels (seconds each); what it tuned before is in the store already
    local left=$(( DEADLINE - SECONDS )) rc
    run "$PY" -m benchmarks.tune --models "${NET_MODELS:-b0,b1,b2,b3,b4,b5,b6,b7}" \
        --batches "${TUNE_BATCHES:-${NET256_BATCHES:-256},1,32}" --dtypes "${NET_DTYPES:-fp16}" \
        --time-budget $(( left > 20 ? left - 10 : left / 2 )) --jobs "${TUNE_JOBS:-8}"
    rc=$?
    save_store
    return $rc
}

net256_step() {
    # B7 at 256 takes ~1 s a forward: 2 warm-up calls after the gate's call (which already
    # ran the cuDNN search and the Triton tuning), then >= 5 timed calls of >= 0.5 s in all
    local providers
    providers=$(without_cuda "${NET_PROVIDERS:-eager,eager-folded,fused-triton,fused-cuda}")
    net 40 --models "${NET_MODELS:-b0,b1,b2,b3,b4,b5,b6,b7}" --providers "$providers" \
        --batches "${NET256_BATCHES:-256}" --warmup-iters 2 --warmup-s 0.2 --min-iters 5 --min-time-s 0.5
}

run_groups() {
    # run_groups MARGIN PLAN ARGS...: one network run per "models:providers" group of PLAN, in
    # order, with ARGS; a group whose providers are all dropped (no usable _C) is logged as
    # not run; returns the last failing run's status
    local margin=$1 plan=$2 group models providers rc=0 r
    shift 2
    for group in $plan; do
        models=${group%%:*}
        providers=$(without_cuda "${group#*:}")
        if [[ -z "$providers" ]]; then
            echo "not run: $group (no providers left)" >>"$LOG"
            continue
        fi
        net "$margin" --models "$models" --providers "$providers" "$@"
        r=$?
        (( r )) && rc=$r
    done
    return $rc
}

compile_step() {
    local plan
    if [[ -n "${COMPILE_MODELS:-}${COMPILE_PROVIDERS:-}" ]]; then
        plan="${COMPILE_MODELS:-b0}:${COMPILE_PROVIDERS:-compile}"
    else
        plan="${COMPILE_PLAN:-b0:compile,fused-triton+compile,fused-cuda+compile b4:compile}"
    fi
    run_groups 30 "$plan" --batches "${COMPILE_BATCHES:-256}" \
        --warmup-iters 2 --warmup-s 0.2 --min-iters 5 --min-time-s 0.5
}

net1_step() {
    local providers
    providers=$(without_cuda "${NET_PROVIDERS:-eager,eager-folded,fused-triton,fused-cuda}")
    net 10 --models "${NET_MODELS:-b0,b1,b2,b3,b4,b5,b6,b7}" --providers "$providers" --batches 1 \
        --warmup-s 0.1 --min-iters 10 --min-time-s 0.25
}

# train_plan: the train step's "models:providers" groups, in order
train_plan() {
    if [[ -n "${TRAIN_MODELS:-}${TRAIN_PROVIDERS:-}" ]]; then
        echo "${TRAIN_MODELS:-b0,b4}:${TRAIN_PROVIDERS:-eager,fused-triton,fused-cuda}"
    else
        echo "${TRAIN_PLAN:-b0,b4:eager,fused-triton,fused-cuda b0:compile,fused-triton+compile}"
    fi
}

train_step() {
    # groups "models:providers" in order; torch.compile of a training step (forward and
    # backward graphs, ~a minute) comes last, so the uncompiled rows are measured first and
    # it runs when the slot has time left (TRAIN_PLAN / T_TRAIN to give it the time)
    run_groups 15 "$(train_plan)" --batches "${TRAIN_BATCHES:-128}" \
        --modes train --warmup-iters 2 --warmup-s 0.2 --min-iters 5 --min-time-s 0.5
}

tests_step() {
    # ~1300 GPU tests, many of which compile a Triton kernel first (seconds each, on the
    # host CPU): a few pytest-xdist workers compile in parallel (3: the largest tests hold
    # ~17 GB each in their process's cache); PYTEST_WORKERS=0 runs them in one process
    local workers=() per_test=() first=() files=() f
    if [[ "${PYTEST_WORKERS:-3}" != 0 ]] && "$PY" -c 'import xdist' 2>/dev/null; then
        workers=(-n "${PYTEST_WORKERS:-3}")
    fi
    local margin=25  # a test that starts just before the deadline must end before the step's end
    if "$PY" -c 'import pytest_timeout' 2>/dev/null; then
        per_test=(--timeout "${PYTEST_TIMEOUT:-20}")
        margin=$(( ${PYTEST_TIMEOUT:-20} + 5 ))
    else
        NOTES+=("pytest-timeout not importable: the GPU tests ran without a per-test timeout")
    fi
    # the parity files first (pytest keeps the order of the files it is given)
    for f in ${TESTS_FIRST:-tests/test_ops_parity.py tests/test_triton_gpu.py tests/test_cuda_ops.py tests/test_convert_*.py}; do
        [[ -f $f ]] && first+=("$f")
    done
    files=("${first[@]}")
    for f in tests/test_*.py; do
        [[ " ${first[*]} " == *" $f "* ]] || files+=("$f")
    done
    # stop starting tests `margin` s before the step is killed: a killed pytest writes no junit
    # XML; parity tests need correct kernels, not tuned ones: one config per shape class (the
    # tuner's own test turns tuning back on for itself)
    # (and a tuning store of their own: tests that tune must not find the session's entries)
    run env EFFNET_KERNELS_TRITON_TUNE="${TESTS_TRITON_TUNE:-0}" EFFNET_KERNELS_TUNING_CACHE="$(mktemp -d)" \
        EFFNET_PYTEST_DEADLINE=$(( $(date +%s) + DEADLINE - SECONDS - margin )) \
        EFFNET_PYTEST_NO_CUDA_BUILD="$CUDA_DROPPED" \
        "$PY" -m pytest -m "gpu or adapters" -q --tb=short -rfE --durations=15 -p no:cacheprovider \
        -p benchmarks.pytest_deadline ${workers[@]+"${workers[@]}"} ${per_test[@]+"${per_test[@]}"} \
        --junitxml="$OUT/junit_gpu.xml" ${PYTEST_ARGS:-} "${files[@]}"
}

ops_step() {
    local left=$(( DEADLINE - SECONDS ))
    run "$PY" -m benchmarks.ops --out "$OUT/ops.csv" --time-budget $(( left * 3 / 4 )) \
        --providers "$(without_cuda "${OPS_PROVIDERS:-eager,triton,cuda}")" \
        ${OPS_ARGS:---models b0,b1,b2,b3,b4,b5,b6,b7 --batch 32 --dtypes fp16 --order classes --warmup-s 0.02 --min-time-s 0.05}
}

sanitizer_step() {
    if [[ -n "$CUDA_DROPPED" ]]; then
        echo "not run: $CUDA_DROPPED" >>"$LOG"
        return 1
    fi
    run compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" benchmarks/cuda_ops_once.py
}

microbench_step() {
    run env EFFNET_PYTEST_DEADLINE=$(( $(date +%s) + DEADLINE - SECONDS - 25 )) \
        EFFNET_PYTEST_NO_CUDA_BUILD="$CUDA_DROPPED" \
        MICROBENCH_PROVIDERS="$(without_cuda "${MICROBENCH_PROVIDERS:-eager,triton,cuda}")" \
        "$PY" -m pytest -q --tb=short -p no:cacheprovider -p benchmarks.pytest_deadline benchmarks/microbench \
        --benchmark-json="$OUT/microbench.json"
}

step env "${T_ENV:-15}" env_step
step build "${T_BUILD:-90}" build_step
step precompile "${T_PRECOMPILE:-40}" precompile_step
step pretune "${T_PRETUNE:-35}" pretune_step
step net256 "${T_NET256:-140}" net256_step
step compile "${T_COMPILE:-80}" compile_step
step net1 "${T_NET1:-30}" net1_step
step train "${T_TRAIN:-40}" train_step
step tests "${T_TESTS:-60}" tests_step
step ops "${T_OPS:-20}" ops_step
step sanitizer "${T_SANITIZER:-60}" sanitizer_step
step microbench "${T_MICRO:-60}" microbench_step

want pretune && save_store  # with what the benchmarks tuned themselves
write_summary final
cat "$OUT/summary.txt"
tar czf "$OUT/logs.tar.gz" -C "$(dirname "$LOGS")" logs 2>/dev/null
exit 0
