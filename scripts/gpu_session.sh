#!/usr/bin/env bash
# The one script a GPU device call runs: build, test, sanitize, benchmark, in ~9 minutes.
#
#   EFFNET_COMMIT=<sha> bash scripts/gpu_session.sh        (run from the repository root)
#
# Each step has its own time budget and log, and runs even if an earlier step failed.
# Results come back in $OUT (at most 8 files): results.csv, ops.csv, junit_gpu.xml,
# microbench.json (if run), logs.tar.gz (every step's log, refreshed after each step) and
# summary.txt. Copy results.csv / ops.csv rows into benchmarks/results/ and commit them.
#
# Knobs (environment variables; defaults in brackets):
#   EFFNET_COMMIT      commit recorded in the CSVs (the device copy has no .git) [unknown]
#   STEPS              which steps, comma list [env,build,tests,sanitizer,ops,net256,net1,compile]
#   SANITIZER=1        run compute-sanitizer memcheck on benchmarks/cuda_ops_once.py [0]
#   MICROBENCH=1       run the pytest-benchmark suite benchmarks/microbench [0]
#   SESSION_BUDGET     seconds for the whole script; a step gets at most what is left [540]
#                      (run it with the device tool's timeout_s=600)
#   TESTS_TRITON_TUNE  Triton tuning during the tests step [0]
#   T_BUILD T_TESTS T_SANITIZER T_OPS T_NET256 T_NET1 T_COMPILE T_MICRO   per-step seconds
#                      [150, 90, 90, 50, 170, 60, 100, 90]
#   OPS_ARGS           args for python -m benchmarks.ops [--models b0,...,b7 --batch 32 --dtypes fp16 (fast timing)]
#   NET_MODELS         [b0,b1,b2,b3,b4,b5,b6,b7]
#   NET_PROVIDERS      [eager,fused-triton,fused-cuda]   (channels_last; eager@nchw for NCHW)
#   NET_DTYPES         [fp16]
#   NET256_BATCHES     [256]   (shrinks to the largest batch that fits)
#   COMPILE_MODELS     [b0]    step "compile", last: torch.compile is slow to build (~a minute
#   COMPILE_PROVIDERS  [compile]          per model and batch), so the first session compiles B0
#   COMPILE_BATCHES    [256]              only; later sessions: COMPILE_MODELS=b1,b2 ...,
#                                          COMPILE_PROVIDERS=compile,compile-max-autotune
#   NET_ARGS           extra args for every network run, e.g. "--modes infer,train"
#   PYTEST_WORKERS     pytest-xdist workers for the GPU tests, 0 = one process [3; 0 without xdist]
#   PYTEST_ARGS        extra args for the GPU test step, e.g. "-k triton"
# The GPU tests stop starting new tests 25 s before their step's budget runs out
# (benchmarks/pytest_deadline.py), so junit_gpu.xml and the failure summary are always written.
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export EFFNET_KERNELS_CUDA_ARCHS="${EFFNET_KERNELS_CUDA_ARCHS:-90}"
[[ -n "${EFFNET_COMMIT:-}" ]] && export EFFNET_COMMIT  # else benchmarks/env.py asks git, then says "unknown"
OUT="${OUT:-$PWD/out}"
PY="${PYTHON:-python3}"
LOGS="$(mktemp -d /tmp/effnet_logs.XXXXXX)/logs"
mkdir -p "$OUT" "$LOGS"
STEPS="${STEPS:-env,build,tests,sanitizer,ops,net256,net1,compile}"
SESSION_START=$SECONDS
SUMMARY=()

want() { [[ ",$STEPS," == *",$1,"* ]]; }

# budget_for SECONDS: that, or what is left of SESSION_BUDGET (less 15 s for the summary)
budget_for() {
    local left=$(( ${SESSION_BUDGET:-540} - (SECONDS - SESSION_START) - 15 ))
    (( left < $1 )) && echo "$left" || echo "$1"
}

# step NAME BUDGET_SECONDS COMMAND...   (the command runs under timeout; its output goes to $LOGS/NAME.log)
step() {
    local name=$1 budget; budget=$(budget_for "$2"); shift 2
    local t0=$SECONDS rc
    if (( budget < 10 )); then
        SUMMARY+=("$(printf '%-10s skipped: session budget used up' "$name")")
        return
    fi
    echo "=== [$((SECONDS - SESSION_START))s] $name (budget ${budget}s): $*"
    timeout --signal=TERM --kill-after=15 "$budget" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    local note=""
    [[ $rc -eq 124 || $rc -eq 137 ]] && note=" (timed out)"
    SUMMARY+=("$(printf '%-10s rc=%-3s %4ss%s' "$name" "$rc" "$((SECONDS - t0))" "$note")")
    tail -n 5 "$LOGS/$name.log" | sed 's/^/    /'
    tar czf "$OUT/logs.tar.gz" -C "$(dirname "$LOGS")" logs 2>/dev/null
}

if want env; then
    step env 20 bash -c "nvidia-smi; $PY -c 'import torch, triton, sys; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"cudnn\", torch.backends.cudnn.version(), \"triton\", triton.__version__); print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))'; nvcc --version; $PY -m pip list 2>/dev/null | grep -i -E 'torch|triton|timm|pytest|matplotlib'; $PY -c \"from benchmarks.env import git_commit; print('commit', git_commit())\""
fi

if want build; then
    # setup.py builds effnet_kernels._C in place when it knows how; otherwise the build
    # module does; either way import the package and list the backends afterwards
    step build "${T_BUILD:-150}" bash -c "$PY setup.py build_ext --inplace; \
        ls effnet_kernels/_C*.so >/dev/null 2>&1 || $PY effnet_kernels/_build.py; \
        $PY -c 'import effnet_kernels; [print(s) for s in effnet_kernels.available_backends().values()]'; \
        $PY -m effnet_kernels info 2>/dev/null || true"
fi

if want tests; then
    budget=$(budget_for "${T_TESTS:-90}")
    # ~1300 GPU tests, many of which compile a Triton kernel first (seconds each, on the
    # host CPU): a few pytest-xdist workers compile in parallel (3: the largest tests hold
    # ~17 GB each in their process's cache); PYTEST_WORKERS=0 runs them in one process
    workers=()
    if [[ "${PYTEST_WORKERS:-3}" != 0 ]] && "$PY" -c 'import xdist' 2>/dev/null; then
        workers=(-n "${PYTEST_WORKERS:-3}")
    fi
    # stop starting tests 25 s before the step is killed: a killed pytest writes no junit XML
    # parity tests need correct kernels, not tuned ones: one config per shape class (the
    # tuner's own test turns tuning back on for itself)
    step tests "$budget" env EFFNET_KERNELS_TRITON_TUNE="${TESTS_TRITON_TUNE:-0}" \
        EFFNET_PYTEST_DEADLINE=$(( $(date +%s) + budget - 25 )) \
        "$PY" -m pytest -m "gpu or adapters" -q -rfE --durations=15 -p no:cacheprovider -p benchmarks.pytest_deadline \
        "${workers[@]}" --junitxml="$OUT/junit_gpu.xml" ${PYTEST_ARGS:-} tests
fi

if want sanitizer && [[ "${SANITIZER:-0}" != 0 ]]; then
    step sanitizer "${T_SANITIZER:-90}" compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" benchmarks/cuda_ops_once.py
fi

if want ops; then
    budget=$(budget_for "${T_OPS:-50}")
    step ops "$budget" "$PY" -m benchmarks.ops --out "$OUT/ops.csv" --time-budget $((budget * 3 / 4)) \
        ${OPS_ARGS:---models b0,b1,b2,b3,b4,b5,b6,b7 --batch 32 --dtypes fp16 --warmup-s 0.02 --min-time-s 0.05}
fi

if [[ "${MICROBENCH:-0}" != 0 ]]; then
    budget=$(budget_for "${T_MICRO:-90}")
    step microbench "$budget" env EFFNET_PYTEST_DEADLINE=$(( $(date +%s) + budget - 25 )) \
        "$PY" -m pytest -q -p no:cacheprovider -p benchmarks.pytest_deadline benchmarks/microbench \
        --benchmark-json="$OUT/microbench.json"
fi

NET_COMMON=(--dtypes "${NET_DTYPES:-fp16}" --out "$OUT/results.csv" --warmup-s 0.2 --min-time-s 0.5)
NET_MODELS="${NET_MODELS:-b0,b1,b2,b3,b4,b5,b6,b7}"
NET_PROVIDERS="${NET_PROVIDERS:-eager,fused-triton,fused-cuda}"
if want net256; then
    # B7 at 256 takes ~1 s a forward: 2 warm-up calls after the gate's call (which already
    # ran the cuDNN search and the Triton tuning), then >= 5 timed calls of >= 0.5 s in all
    budget=$(budget_for "${T_NET256:-170}")
    step net256 "$budget" "$PY" -m benchmarks.network "${NET_COMMON[@]}" --models "$NET_MODELS" \
        --providers "$NET_PROVIDERS" --batches "${NET256_BATCHES:-256}" --warmup-iters 2 --min-iters 5 \
        --time-budget $((budget > 90 ? budget - 45 : budget / 2)) ${NET_ARGS:-}
fi
if want net1; then
    budget=$(budget_for "${T_NET1:-60}")
    step net1 "$budget" "$PY" -m benchmarks.network "${NET_COMMON[@]}" --models "$NET_MODELS" \
        --providers "$NET_PROVIDERS" --batches 1 --min-iters 10 \
        --time-budget $((budget > 40 ? budget - 20 : budget / 2)) ${NET_ARGS:-}
fi
if want compile; then
    budget=$(budget_for "${T_COMPILE:-100}")
    step compile "$budget" "$PY" -m benchmarks.network "${NET_COMMON[@]}" --models "${COMPILE_MODELS:-b0}" \
        --providers "${COMPILE_PROVIDERS:-compile}" --batches "${COMPILE_BATCHES:-256}" --warmup-iters 2 --min-iters 5 \
        --time-budget $((budget / 2)) ${NET_ARGS:-}
fi

{
    commit=$(timeout 15 "$PY" -c 'from benchmarks.env import git_commit; print(git_commit())' 2>/dev/null)
    echo "gpu_session: commit ${commit:-unknown}, $((SECONDS - SESSION_START))s"
    [[ "${commit:-unknown}" == unknown ]] && echo "WARNING: no EFFNET_COMMIT given: the CSV rows say commit=unknown"
    printf '%s\n' "${SUMMARY[@]}"
    # fused-triton rows after this message ran untuned (default) launch configs
    grep -l "Triton tuning budget used up" "$LOGS"/*.log 2>/dev/null | sed 's|.*/|NOTE: Triton tuning budget used up in |'
    for f in "$OUT"/results.csv "$OUT"/ops.csv; do
        [[ -f $f ]] && echo "$(basename "$f"): $(($(wc -l <"$f") - 1)) rows"
    done
    if [[ -f "$OUT/results.csv" ]]; then
        timeout 30 "$PY" -m benchmarks.report --csv "$OUT/results.csv" --ops-csv /nonexistent --no-plots 2>&1 | tail -n 80
    fi
} | tee "$OUT/summary.txt"
tar czf "$OUT/logs.tar.gz" -C "$(dirname "$LOGS")" logs 2>/dev/null
exit 0
