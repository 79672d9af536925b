#!/usr/bin/env bash
# The prepared GPU check (`make gpu-check`): run from a fresh copy of the repository on a GPU machine.
#
#   bash bench/gpu_check.sh            # install the gpu extra, gpu tests, 1B + 8B benchmarks (< 8 min, H100/H200)
#   bash bench/gpu_check.sh --tiny     # dry run: no install, the tiny model, on CUDA if present else the CPU
#   GPU_CHECK_SKIP_INSTALL=1 ...       # use the environment as it is
#
# Assumptions: python3 (or $PYTHON) already has a CUDA build of torch (torch is the machine's business,
# as in the Makefile: pip's resolver must not choose it). The install step adds the project with the
# `gpu` extra and swaps faiss-cpu for faiss-gpu (they ship the same `faiss` module); without network
# it warns and goes on with what is installed. Steps, each under its own timeout:
#   1 install   2 CUDA present (stops here, exit 2, without one, unless --tiny)   3 pytest -m gpu
#   4 bench/fused_generation.py, bf16, random-init Llama-3.2-1B and Llama-3-8B shapes: 64 requests,
#     16 adapters of rank 16 on all projections, 128 new tokens   5 bench/engine_steps.py (the engine alone,
#     continuous vs static admission at saturation)   6 bench/serving_load.py (the same through Serve and gRPC)
# Progress goes to stderr; stdout ends with one table and one JSON line.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
TINY=0
[ "${1:-}" = "--tiny" ] && TINY=1
OUT=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
STOPPED=""
log() { echo "[gpu-check $(date -u +%H:%M:%S) +${SECONDS}s] $*" >&2; }

step_install() {
    if [ "$TINY" = 1 ] || [ -n "${GPU_CHECK_SKIP_INSTALL:-}" ]; then
        log "1 install: skipped (--tiny or GPU_CHECK_SKIP_INSTALL)"; echo skipped > "$OUT/install"; return
    fi
    log "1 install: pip install -e .[gpu,dev], then faiss-gpu in place of faiss-cpu"
    if timeout 300 "$PY" -m pip install -q --disable-pip-version-check -e ".[gpu,dev]" >&2 \
        && timeout 120 "$PY" -m pip uninstall -q -y faiss-cpu >&2 \
        && timeout 180 "$PY" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps faiss-gpu >&2
    then echo ok > "$OUT/install"
    else log "1 install FAILED (offline?): going on with what is installed"; echo failed > "$OUT/install"; fi
}

step_cuda() {
    log "2 CUDA"
    "$PY" - > "$OUT/env.json" <<'EOF'
import json, torch
try:
    import faiss
    faiss_gpus = int(getattr(faiss, "get_num_gpus", lambda: 0)())
except ImportError:
    faiss_gpus = None
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = None
cuda = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda": cuda,
                  "gpu": torch.cuda.get_device_name(0) if cuda else None,
                  "gpu_mem_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
                  "faiss_gpus": faiss_gpus, "triton": triton_version}))
EOF
    cat "$OUT/env.json" >&2
    if ! grep -q '"cuda": true' "$OUT/env.json"; then
        if [ "$TINY" = 1 ]; then log "2 no CUDA: --tiny goes on, on the CPU"
        else log "2 STOP: torch sees no CUDA device; nothing below can run"; STOPPED="no CUDA (step 2)"; fi
    fi
}

step_tests() {
    local files
    files=$(grep -l "mark.gpu" tests/test_*.py)  # only the modules with gpu tests: collecting all costs a minute
    log "3 pytest -m gpu" $files
    timeout 240 "$PY" -m pytest -m gpu -q -p no:cacheprovider $files > "$OUT/pytest.txt" 2>&1
    echo $? > "$OUT/pytest.rc"
    tail -3 "$OUT/pytest.txt" >&2
}

bench() {  # name, timeout, args...
    local name=$1 limit=$2; shift 2
    log "4 fused_generation $name: $*"
    PYTHONPATH=$PWD timeout "$limit" "$PY" bench/fused_generation.py "$@" > "$OUT/$name.txt" 2> "$OUT/$name.err"
    local rc=$?
    [ $rc = 0 ] || { log "4 $name exited $rc:"; tail -5 "$OUT/$name.err" >&2; }
    tail -1 "$OUT/$name.txt" > "$OUT/$name.json"
}

step_bench() {
    if [ "$TINY" = 1 ]; then
        local dev=cpu; grep -q '"cuda": true' "$OUT/env.json" && dev=cuda
        bench tiny 300 --shape tiny --device "$dev" --adapters 4 --rank 8 --requests 8 --new-tokens 8 --repeats 1 \
            --peft-loop-requests 2
        return
    fi
    local common=(--device cuda --dtype bfloat16 --adapters 16 --rank 16 --requests 64 --new-tokens 128 --repeats 1
                  --peft-loop-requests 4)
    bench llama-1b 120 --shape llama-1b "${common[@]}"
    bench llama-8b 260 --shape llama-8b "${common[@]}"  # ~75 GB of GPU memory: 4 copies of the base (bare,
                                                         # fused, merged, peft), the adapters, the KV cache
}

step_engine() {
    log "5 engine_steps"
    local model=(--base-model smollm2 --repeats 2)
    [ "$TINY" = 1 ] && model=(--base-model tiny --requests 100 --repeats 1)
    PYTHONPATH=$PWD timeout 150 "$PY" bench/engine_steps.py "${model[@]}" \
        > "$OUT/engine.txt" 2> "$OUT/engine.err" || log "5 engine_steps failed: $(tail -2 "$OUT/engine.err")"
    tail -1 "$OUT/engine.txt" > "$OUT/engine.json"
}

step_serving() {
    if [ -f bench/serving_load.py ]; then
        log "6 serving_load"
        PYTHONPATH=$PWD timeout 150 "$PY" bench/serving_load.py --base-model smollm2 --rates 4,16,64 --duration 10 \
            $([ "$TINY" = 1 ] || echo --num-gpus 0.5) > "$OUT/serving.txt" 2> "$OUT/serving.err" \
            || log "6 serving_load failed: $(tail -2 "$OUT/serving.err")"
        tail -1 "$OUT/serving.txt" > "$OUT/serving.json"
    else
        log "6 bench/serving_load.py not present: skipped"
    fi
}

step_install
step_cuda
if [ -z "$STOPPED" ]; then step_tests; step_bench; step_engine; step_serving; fi

STOPPED="$STOPPED" SECONDS_TOTAL=$SECONDS "$PY" - "$OUT" <<'EOF'
import json, os, sys
from pathlib import Path

out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None
env = load("env.json") or {}
pytest_tail = (out / "pytest.txt").read_text().strip().splitlines()[-1] if (out / "pytest.txt").exists() else None
benches = {n: load(f"{n}.json") for n in ("tiny", "llama-1b", "llama-8b") if (out / f"{n}.txt").exists()}
cols = ["mixed_vs_bare", "mixed_vs_merged", "k3_vs_k1", "mixed_vs_peft_loop", "mixed_vs_peft_adapter_names",
        "lora_path_vs_adapter_bytes"]
print(f"\ngpu-check on {env.get('gpu') or 'no GPU'} (torch {env.get('torch')}, CUDA {env.get('torch_cuda')}, "
      f"triton {env.get('triton')}, faiss GPUs {env.get('faiss_gpus')}); install: "
      f"{(out / 'install').read_text().strip() if (out / 'install').exists() else '-'}; pytest -m gpu: {pytest_tail}")
if os.environ["STOPPED"]:
    print(f"STOPPED: {os.environ['STOPPED']}")
print(f"{'model':<10} {'backend':<15} {'mixed_k1 tok/s':>14} {'bare tok/s':>11} " + " ".join(f"{c:>{max(len(c), 8)}}" for c in cols))
for name, b in benches.items():
    if b is None:
        print(f"{name:<10} failed (see stderr)")
        continue
    print(f"{name:<10} {b['backend']:<15} {b['tokens_per_s']['mixed_k1']:>14.1f} {b['tokens_per_s']['bare']:>11.1f} "
          + " ".join(f"{b[c]:>{max(len(c), 8)}.3f}" for c in cols))
print("targets: mixed_vs_bare >= 0.85, k3_vs_k1 >= 0.7, mixed_vs_peft_loop >= 10, lora_path_vs_adapter_bytes <= 1.10")
print(json.dumps({"env": env, "install": (out / "install").read_text().strip() if (out / "install").exists() else None,
                  "stopped": os.environ["STOPPED"] or None, "pytest_gpu": pytest_tail,
                  "pytest_rc": int((out / "pytest.rc").read_text()) if (out / "pytest.rc").exists() else None,
                  "fused_generation": benches, "engine_steps": load("engine.json"), "serving_load": load("serving.json"),
                  "seconds": int(os.environ["SECONDS_TOTAL"]), "logs": str(out)}))
EOF
[ -z "$STOPPED" ] || exit 2
