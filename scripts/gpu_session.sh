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
#   STEPS              which steps, comma list [env,build,tests,sanitizer,ops,net256,net1]
#   SANITIZER=1        run compute-sanitizer memcheck on benchmarks/cuda_ops_once.py [0]
#   MICROBENCH=1       run the pytest-benchmark suite benchmarks/microbench [0]
#   SESSION_BUDGET     seconds for the whole script; a step gets at most what is left [540]
#   T_BUILD T_TESTS T_SANITIZER T_OPS T_NET256 T_NET1 T_MICRO   per-step seconds
#   OPS_ARGS           args for python -m benchmarks.ops [--models b0,...,b7 --batch 32 --dtypes fp16 (fast timing)]
#   NET_MODELS         [b0,b1,b2,b3,b4,b5,b6,b7]
#   NET_PROVIDERS      [eager,compile,fused-triton,fused-cuda]
#   NET_DTYPES         [fp16]
#   NET256_BATCHES     [256]   (shrinks to the largest batch that fits)
#   NET_ARGS           extra args for both network runs, e.g. "--modes infer,train"
#   PYTEST_ARGS        extra args for the GPU test step
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export EFFNET_KERNELS_CUDA_ARCHS="${EFFNET_KERNELS_CUDA_ARCHS:-90}"
[[ -n "${EFFNET_COMMIT:-}" ]] && export EFFNET_COMMIT  # else benchmarks/env.py asks git, then says "unknown"
OUT="${OUT:-$PWD/out}"
PY="${PYTHON:-python3}"
LOGS="$(mktemp -d /tmp/effnet_logs.XXXXXX)/logs"
mkdir -p "$OUT" "$LOGS"
STEPS="${STEPS:-env,build,tests,sanitizer,ops,net256,net1}"
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
    step tests "${T_TESTS:-100}" "$PY" -m pytest -m "gpu or adapters" -q -p no:cacheprovider --junitxml="$OUT/junit_gpu.xml" ${PYTEST_ARGS:-} tests
fi

if want sanitizer && [[ "${SANITIZER:-0}" != 0 ]]; then
    step sanitizer "${T_SANITIZER:-90}" compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" benchmarks/cuda_ops_once.py
fi

if want ops; then
    budget=$(budget_for "${T_OPS:-70}")
    step ops "$budget" "$PY" -m benchmarks.ops --out "$OUT/ops.csv" --time-budget $((budget * 3 / 4)) \
        ${OPS_ARGS:---models b0,b1,b2,b3,b4,b5,b6,b7 --batch 32 --dtypes fp16 --warmup-s 0.02 --min-time-s 0.05}
fi

if [[ "${MICROBENCH:-0}" != 0 ]]; then
    step microbench "${T_MICRO:-90}" "$PY" -m pytest -q -p no:cacheprovider benchmarks/microbench --benchmark-json="$OUT/microbench.json"
fi

NET_COMMON=(--models "${NET_MODELS:-b0,b1,b2,b3,b4,b5,b6,b7}" --providers "${NET_PROVIDERS:-eager,compile,fused-triton,fused-cuda}"
            --dtypes "${NET_DTYPES:-fp16}" --out "$OUT/results.csv" --warmup-s 0.2 --min-time-s 0.5 --min-iters 10)
if want net256; then
    budget=$(budget_for "${T_NET256:-150}")
    step net256 "$budget" "$PY" -m benchmarks.network "${NET_COMMON[@]}" --batches "${NET256_BATCHES:-256}" \
        --time-budget $((budget > 80 ? budget - 40 : budget / 2)) ${NET_ARGS:-}
fi
if want net1; then
    budget=$(budget_for "${T_NET1:-60}")
    step net1 "$budget" "$PY" -m benchmarks.network "${NET_COMMON[@]}" --batches 1 --time-budget $((budget > 60 ? budget - 30 : budget / 2)) ${NET_ARGS:-}
fi

{
    echo "gpu_session: commit $("$PY" -c 'from benchmarks.env import git_commit; print(git_commit())'), $((SECONDS - SESSION_START))s"
    printf '%s\n' "${SUMMARY[@]}"
    for f in "$OUT"/results.csv "$OUT"/ops.csv; do
        [[ -f $f ]] && echo "$(basename "$f"): $(($(wc -l <"$f") - 1)) rows"
    done
    if [[ -f "$OUT/results.csv" ]]; then
        "$PY" -m benchmarks.report --csv "$OUT/results.csv" --ops-csv /nonexistent --no-plots 2>&1 | tail -n 40
    fi
} | tee "$OUT/summary.txt"
tar czf "$OUT/logs.tar.gz" -C "$(dirname "$LOGS")" logs 2>/dev/null
exit 0
