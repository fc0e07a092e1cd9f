#!/usr/bin/env bash
# GPU checks in one lease (../shared/GPU.md). Two halves:
#   scripts/gpu-check.sh bundle   here: build with --features cuda, copy stripped executables and
#                                 this script into .device/ (gitignored, carried by the device tool)
#   bash .device/gpu-check.sh     on the GPU machine: (1) kernel parity on the GPU against the CPU
#                                 reference (the simulator tests, SD2_KERNEL_BACKENDS=gpu: fresh
#                                 inputs, poisoned outputs), (2) compute-sanitizer memcheck and
#                                 (3) racecheck, synccheck, initcheck on the same small sizes,
#                                 (also over the engine's tests on cuda:0), a short `sd2 demo`
#                                 on the GPU and the CPU, (4) flash attention
#                                 timings beside PyTorch SDPA on the same shapes; a table last.
#                                 Under $OUT: summary.txt (a line per step, written as it
#                                 ends), the tables, and logs.tar.gz (every log and JSON,
#                                 re-packed after each step): at most 5 files (the device
#                                 tool brings back 8).
#                                 QUICK=1: kernel parity, sanitizers on the kernel tests, and
#                                 the LoRA GEMM benchmark only. LORA_ONLY=1: kernel parity of
#                                 the LoRA GEMMs, the engine's LoRA tests and the LoRA table.
#                                 SD2_ONLY=1 (at most $BUDGET = 500 s, one device command):
#                                 LoRA GEMM and tensor-core flash backward parity on the GPU
#                                 first (a failure switches that piece to its fallback,
#                                 SD2_LORA_GEMM=cublas / SD2_FLASH_BWD=v1, so the end-to-end
#                                 numbers still come out), `sd2 bench train` at micro-batch 128,
#                                 the PyTorch SD2 (eager, then torch.compile) at the same sizes,
#                                 `sd2 bench infer` at 256, the flash table (v1 vs the tensor-core
#                                 backward vs SDPA, batch 128), the bf16 step on cuda:0 vs the CPU,
#                                 NCCL on one rank (tests/dist_nccl.rs);
#                                 then, while time is left, --recompute, a short demo and the
#                                 loader at 1-16 cores.
#                                 Each step has its own timeout, cut to the time left; each writes
#                                 its line to summary.txt as it ends, and the tables
#                                 (sd2_vs_torch.txt, flash.txt) are rewritten after each step.
#                                 Every log and JSON goes into logs.tar.gz, re-packed after each
#                                 step: at most 5 files under $OUT.
set -uo pipefail

if [ "${1:-}" = bundle ]; then
    set -e
    cd "$(dirname "$0")/.."
    cargo build --release --features cuda,nccl --bin sd2
    rm -rf .device && mkdir -p .device
    strip -o .device/sd2 target/release/sd2
    # The kernel tests and the engine's device-generic tests (forward, backward + AdamW).
    for t in sim_kernels ops_forward backward_backends mixed_precision; do
        exe=$(cargo test --release --features cuda --test $t --no-run --message-format=json 2>/dev/null |
            T=$t python3 -c 'import sys, json, os
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") \
            and m["target"]["name"] == os.environ["T"]:
        print(m["executable"])' | tail -1)
        strip -o .device/$t "$exe"
    done
    # NCCL on one rank (the collectives and training steps through them).
    exe=$(cargo test --release --features cuda,nccl --test dist_nccl --no-run --message-format=json 2>/dev/null |
        python3 -c 'import sys, json
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") \
            and m["target"]["name"] == "dist_nccl":
        print(m["executable"])' | tail -1)
    strip -o .device/dist_nccl "$exe"
    # Compressed (the fatbins compress ~3x): the carry limit is 64 MiB with the working tree.
    gzip -9 .device/sd2 .device/sim_kernels .device/ops_forward .device/backward_backends \
        .device/mixed_precision .device/dist_nccl
    cp scripts/gpu-check.sh scripts/bench/sdpa_attention.py scripts/reference/sd2_torch_bench.py .device/
    echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo -dirty)" >.device/COMMIT
    du -sh .device
    echo "now: device run, carry [.device], command: bash .device/gpu-check.sh"
    exit 0
fi

D=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/sd2-gpu-check}
mkdir -p "$OUT"
# The executables: gzipped in the bundle, unpacked once here (X); plain ones are used in place.
X=$D
if ls "$D"/*.gz >/dev/null 2>&1; then
    X=$(mktemp -d /tmp/sd2-bin.XXXXXX)
    for f in "$D"/*.gz; do
        gunzip -c "$f" >"$X/$(basename "$f" .gz)" && chmod +x "$X/$(basename "$f" .gz)"
    done
fi
export PATH=/usr/local/cuda/bin:$PATH
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
# cuBLAS (plain matmuls) may live only in the Python wheels here.
NV=$(python3 -c "import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))" 2>/dev/null || true)
CUBLAS=$( (find "$NV/nvidia" /usr/local/cuda/lib64 -name "libcublas.so*" 2>/dev/null || true) | head -1)
[ -n "$CUBLAS" ] && export LD_LIBRARY_PATH=$(dirname "$CUBLAS"):$LD_LIBRARY_PATH
echo "cublas: ${CUBLAS:-not found}"
NCCL=$( (find "$NV/nvidia" /usr/local/cuda/lib64 /usr/lib/x86_64-linux-gnu -name "libnccl.so*" 2>/dev/null || true) | head -1)
# Found: the NCCL tests must run, not skip (SD2_REQUIRE_NCCL), on exactly this file.
[ -n "$NCCL" ] && export LD_LIBRARY_PATH=$(dirname "$NCCL"):$LD_LIBRARY_PATH SD2_NCCL_LIB=$NCCL SD2_REQUIRE_NCCL=1
echo "nccl: ${NCCL:-not found}"
export SD2_KERNEL_BACKENDS=gpu RUST_BACKTRACE=1
status=()
step() { # name rc [note]: recorded at once, so a cut-short run still says how far it got
    local r
    case "$2" in 0) r=ok ;; skipped) r="skipped (no time left)" ;; 124) r="TIMED OUT" ;; *) r="FAILED (rc $2)" ;; esac
    status+=("$(printf '%-26s %s %s' "$1" "$r" "${3:-}")")
    printf '%-26s %s %s\n' "$1" "$r" "${3:-}" >>"$OUT/summary.txt"
    pack
}
# The time budget of SD2_ONLY (one device command is at most 570 s, start-up not included).
T0=$(date +%s)
BUDGET=${BUDGET:-500}
left() { echo $((BUDGET - ($(date +%s) - T0))); }
W=$(mktemp -d /tmp/sd2-gpu-work.XXXXXX) # logs and JSON; packed into $OUT/logs.tar.gz
pack() {
    tar -czf /tmp/sd2-logs.tar.gz -C "$W" . 2>/dev/null && cp /tmp/sd2-logs.tar.gz "$OUT/logs.tar.gz"
}
# run_step NAME CAP LOG CMD...: CMD with the timeout min(CAP, time left − 10 s), output appended
# to $W/LOG (not echoed); skipped when under 15 s are left. Records the step, re-packs the logs.
run_step() {
    local name=$1 cap=$2 log=$3 t rc l
    shift 3
    l=$(($(left) - 10))
    if [ "$l" -lt 15 ]; then
        step "$name" skipped
        return 1
    fi
    [ "$cap" -gt "$l" ] && cap=$l
    t=$(date +%s)
    echo "== $name (timeout ${cap}s)" | tee -a "$W/$log"
    timeout "$cap" "$@" >>"$W/$log" 2>&1
    rc=$?
    step "$name" $rc "$(($(date +%s) - t)) s"
    return $rc
}

# flash_table SD2_JSON SDPA_JSON: forward v1/v3/v4 and backward v1/v2/v3 beside SDPA.
flash_table() {
    python3 - "$1" "$2" <<'PY'
import json, sys
try:
    a, b = (json.load(open(p)) for p in sys.argv[1:3])
except Exception as e:
    print("no flash timing table:", e); sys.exit()
print(f"{a['device']}  torch {b['torch']}  sdpa backends {b['backends']}")
print(f"{'shape':<7} {'B':>4} | {'fwd v1':>7} {'fwd v3':>7} {'fwd v4':>7} {'TF/s':>6} {'sdpa':>7} {'TF/s':>6} {'v4/sdpa':>7} "
      f"| {'bwd v1':>7} {'bwd v2':>7} {'bwd v3':>7} {'TF/s':>6} {'sdpa':>7} {'TF/s':>6} {'v2/sdpa':>7} {'v3/sdpa':>7} {'v3 diff':>8}")
for x, y in zip(a["timings"], b["timings"]):
    print(f"{x['shape']['name']:<7} {x['shape']['batch']:>4} | {x['fwd_ms']:>7.3f} {x['fwd_tc3_ms']:>7.3f} {x['fwd_tc4_ms']:>7.3f} "
          f"{x['fwd_tc4_tflops']:>6.1f} {y['fwd_ms']:>7.3f} {y['fwd_tflops']:>6.1f} {x['fwd_tc4_ms'] / y['fwd_ms']:>7.2f} "
          f"| {x['bwd_ms']:>7.3f} {x['bwd_tc2_ms']:>7.3f} {x['bwd_tc3_ms']:>7.3f} {x['bwd_tc3_tflops']:>6.1f} "
          f"{y['bwd_ms']:>7.3f} {y['bwd_tflops']:>6.1f} {x['bwd_tc2_ms'] / y['bwd_ms']:>7.2f} {x['bwd_tc3_ms'] / y['bwd_ms']:>7.2f} "
          f"{x['bwd_tc3_rel_diff']:>8.1e}")
print("ms, median; ratio = sd2 time / SDPA time (lower is better for sd2); diff = max |dX_v3 - dX_v1| / max |dX_v1|")
PY
}

echo "== sd2 $(cat "$D/COMMIT" 2>/dev/null) on $(hostname)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
    --format=csv | tee "$OUT/summary.txt"

if [ -n "${LORA_ONLY:-}" ]; then
    echo "== LoRA GEMM parity on the GPU (v1, v2 mma.sync; v3 wgmma+TMA) vs the f64 reference"
    timeout 120 "$X/sim_kernels" --test-threads=1 --nocapture lora >"$W/parity.log" 2>&1
    step "lora parity" $?
    grep -E "^\[gpu\]|^test |test result|panicked|skipped" "$W/parity.log" | tail -40
    for v in v3 v2; do
        SD2_LORA_GEMM=$v timeout 60 "$X/backward_backends" --test-threads=1 --nocapture cuda::lora \
            >>"$W/engine.log" 2>&1
        step "engine lora ($v)" $?
    done
    grep -E "cuda:0 bf16 vs f64|panicked" "$W/engine.log" | tail -14
    for tool in memcheck racecheck synccheck; do
        timeout 90 compute-sanitizer --tool "$tool" --error-exitcode 9 --print-limit 20 \
            "$X/sim_kernels" --test-threads=1 lora >>"$W/sanitizer.log" 2>&1
        step "$tool lora" $?
    done
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$W/sanitizer.log" | tail -4
    timeout 240 "$X/sd2" bench lora --json "$W/lora.json"
    step "sd2 bench lora" $?
    echo "== summary ($(cat "$D/COMMIT" 2>/dev/null))"
    printf '%s\n' "${status[@]}"
    exit 0
fi

if [ -n "${SD2_ONLY:-}" ]; then
    compare() { # the end-to-end table from whatever JSON exists so far
        python3 - "$W" <<'PY' >"$OUT/sd2_vs_torch.txt" 2>&1
import json, os, sys
d = sys.argv[1]
def load(n):
    try:
        return json.load(open(os.path.join(d, n)))
    except Exception as e:
        print(f"{n}: not there yet ({type(e).__name__})")
        return None
tr, rc, inf, tb = (load(n) for n in ("sd2_train.json", "sd2_train_recompute.json", "sd2_infer.json", "torch.json"))
rows = {r["what"]: r for r in (tb or {}).get("rows", [])}
def line(name, r, ips, peak):
    print(f"{name:<26} batch {r.get('batch', '?'):>4}  {ips:9.1f} img/s  peak {peak / 2**30 if peak else float('nan'):6.2f} GiB")
for name, r in (("sd2 train", tr), ("sd2 train --recompute", rc), ("sd2 infer", inf)):
    if r:
        line(name, r, r["images_per_s"], r.get("peak_device_bytes"))
for k, r in rows.items():
    line("torch " + k, r, r["images_per_s"], r.get("peak_bytes"))
def ratio(a, b):
    return a / b if a and b else float("nan")
if tr:
    e, c = rows.get("train eager"), rows.get("train torch.compile")
    print(f"train: {tr['images_per_s']:.0f} img/s (goal >= 1400); vs eager {ratio(tr['images_per_s'], e and e['images_per_s']):.2f}x (goal >= 1.6); "
          f"vs compile {ratio(tr['images_per_s'], c and c['images_per_s']):.2f}x (goal >= 1.2); "
          f"peak mem vs eager {ratio(tr.get('peak_device_bytes'), e and e['peak_bytes']):.2f}x (goal <= 0.7)")
if inf:
    c = rows.get("infer torch.compile")
    print(f"infer: {inf['images_per_s']:.0f} img/s (goal >= 3900); vs compile {ratio(inf['images_per_s'], c and c['images_per_s']):.2f}x (goal >= 1.3)")
PY
        cat "$OUT/sd2_vs_torch.txt"
    }
    # Parity first, so the first process to meet the LoRA v3 kernel (and the tensor-core flash
    # backward) on this GPU is a short one; a failure switches that piece to its fallback.
    if ! run_step "lora parity (v1-v3, lora_grads)" 30 parity.log "$X/sim_kernels" --test-threads=1 --nocapture lora; then
        export SD2_LORA_GEMM=cublas
        echo "LoRA kernel parity failed: the benches below run SD2_LORA_GEMM=cublas (PEFT's GEMMs for dX and the LoRA gradients too)" | tee -a "$OUT/summary.txt"
    fi
    if ! run_step "flash bwd parity (tc)" 30 parity.log "$X/sim_kernels" --test-threads=1 --nocapture \
        flash_attention_tensor_core; then
        export SD2_FLASH_BWD=v1
        echo "flash parity failed: the benches below run SD2_FLASH_BWD=v1" | tee -a "$OUT/summary.txt"
    fi
    grep -E "^\[gpu\].*(v3|bwd tc3 d64 b1 h1 sq257)|test result|panicked" "$W/parity.log" | tail -14
    echo "== sd2 bench train/infer, ViT-L/14, random weights, bf16 + f32 masters"
    run_step "sd2 bench train 128" 90 engine.log "$X/sd2" bench train --preset vit-l14 --device cuda \
        --batch 128 --steps 5 --warmup 2 --trace "$W/train_trace.json" --top 12 --json "$W/sd2_train.json"
    grep -A14 -E "images/s" "$W/engine.log" | tail -22
    compare
    run_step "torch sd2 (eager, compile)" 160 torch.log env PYTHONUNBUFFERED=1 python3 "$D/sd2_torch_bench.py" \
        --preset vit-l14 --batch 128 --infer-batch 256 --steps 5 --warmup 2 --json "$W/torch.json"
    compare
    run_step "sd2 bench infer 256" 40 engine.log "$X/sd2" bench infer --preset vit-l14 --device cuda \
        --batch 256 --steps 5 --top 8 --json "$W/sd2_infer.json"
    compare
    run_step "sd2 bench flash 128" 30 flash.log "$X/sd2" bench flash --batch 128 --warmup 3 --iters 20 \
        --json "$W/flash_sd2.json"
    run_step "sdpa baseline 128" 30 flash.log env PYTHONUNBUFFERED=1 python3 "$D/sdpa_attention.py" \
        --batch 128 --warmup 3 --iters 20 --json "$W/flash_sdpa.json"
    flash_table "$W/flash_sd2.json" "$W/flash_sdpa.json" >"$OUT/flash.txt" 2>&1
    cat "$OUT/flash.txt"
    run_step "bf16 step cuda vs cpu" 50 step.log "$X/mixed_precision" --test-threads=1 --nocapture gpu
    # NCCL on one GPU: its collectives, and three training steps through them, with NCCL on its
    # own stream and on the compute stream (SD2_REQUIRE_NCCL: a libnccl that was found but
    # does not open fails; "skipped" in the log means libnccl was not found at all: no pass).
    run_step "nccl one rank" 40 nccl.log "$X/dist_nccl" --test-threads=1 --nocapture
    # The gradient all-reduce on one GPU over NCCL, beside the step it belongs to.
    run_step "sd2 bench train --nproc 1" 70 nccl.log "$X/sd2" bench train --preset vit-l14 \
        --device cuda --batch 128 --steps 3 --warmup 1 --top 5 --nproc 1 --json "$W/nccl_bench.json"
    grep -E "all-reduce|ranks \(|collectives on|buckets|skipped|panicked|error" "$W/nccl.log" | tail -12
    grep -E "vs cpu loss|loss curve|host syncs|cosine|skipped|panicked" "$W/step.log" | tail -10
    # While time is left: the memory option and the demo.
    run_step "sd2 bench train recompute" 50 engine.log "$X/sd2" bench train --preset vit-l14 --device cuda \
        --batch 128 --steps 3 --warmup 1 --recompute --top 5 --json "$W/sd2_train_recompute.json"
    compare >/dev/null
    run_step "demo cuda" 30 demo.log "$X/sd2" demo --device cuda --images 1200 --epochs 1 --out /tmp/demo-cuda
    grep -E "AUC|error" "$W/demo.log" | tail -3
    # The loader's scaling with cores on the GPU machine's 16 (224 px JPEGs, SD2's augmentations).
    run_step "loader data" 20 loader.log "$X/sd2" synth --out /tmp/loader-jpeg --n 4096 --size 224 --jpeg 90
    for c in 1 2 4 8 16; do
        run_step "sd2 bench loader ($c cores)" 15 loader.log env RAYON_NUM_THREADS=$c "$X/sd2" bench loader \
            --manifest /tmp/loader-jpeg/manifest.jsonl --limit 4096 --json "$W/loader_$c.json"
    done
    grep -E "cores|augmentations" "$W/loader.log" | tail -10
    pack
    echo "== summary ($(cat "$D/COMMIT" 2>/dev/null)), $(( $(date +%s) - T0 )) s"
    printf '%s\n' "${status[@]}"
    cat "$OUT/sd2_vs_torch.txt"
    exit 0
fi

echo "== 1. kernel parity on the GPU (vs the CPU reference)"
timeout 180 "$X/sim_kernels" --test-threads=1 --nocapture >"$W/parity.log" 2>&1
rc=$?
step "parity" $rc
grep -E "^\[gpu\]|^test |test result|panicked|skipped" "$W/parity.log" | grep -v "^test .* ok$" | tail -70

if [ -z "${QUICK:-}" ]; then
echo "== 2. the engine's tests on cuda:0 (CUDA tensor storage vs the CPU reference)"
for t in ops_forward backward_backends; do
    timeout 120 "$X/$t" --test-threads=1 --nocapture cuda:: >>"$W/engine.log" 2>&1
    rc=$?
    step "engine $t" $rc
    grep -E "^test |test result|panicked|skipped" "$W/engine.log" | grep -v " ok$" | tail -12
done
# The same matmul gradients through the SIMT GEMM kernel instead of cuBLAS.
SD2_GEMM=simt timeout 60 "$X/backward_backends" --test-threads=1 --nocapture cuda::matmul \
    >>"$W/engine.log" 2>&1
step "engine matmul (simt)" $?
# bf16 mixed precision: one SD2 step on cuda:0 against the CPU's bf16 step (losses, every
# trainable gradient), then 20 steps on both whose loss curves must agree.
timeout 150 "$X/mixed_precision" --test-threads=1 --nocapture gpu >>"$W/engine.log" 2>&1
step "bf16 step cuda vs cpu" $?
grep -E "cuda:0 vs cpu loss|loss curve|skipped|panicked" "$W/engine.log" | tail -8
# The LoRA-linear through each fused kernel (auto may pick cuBLAS on this GPU).
for v in v3 v2; do
    SD2_LORA_GEMM=$v timeout 60 "$X/backward_backends" --test-threads=1 --nocapture cuda::lora \
        >>"$W/engine.log" 2>&1
    step "engine lora ($v)" $?
done
grep -E "fused|panicked" "$W/engine.log" | tail -8
fi  # QUICK

# The bad-launch tests make an invalid launch on purpose; the sanitizer would count it.
for tool in memcheck racecheck synccheck initcheck; do
    echo "== compute-sanitizer $tool" | tee -a "$W/sanitizer.log"
    for t in sim_kernels $([ -z "${QUICK:-}" ] && echo backward_backends); do
        filter=$([ $t = sim_kernels ] && echo "--skip bad_launches" || echo "cuda::")
        timeout 90 compute-sanitizer --tool "$tool" --error-exitcode 9 --print-limit 20 \
            "$X/$t" --test-threads=1 $filter >"$W/one.log" 2>&1
        rc=$?
        cat "$W/one.log" >>"$W/sanitizer.log"
        step "$tool $t" $rc
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|test result|panicked" "$W/one.log" | tail -3
    done
done
rm -f "$W/one.log"

if [ -z "${QUICK:-}" ]; then
echo "== 3. end to end: sd2 demo (synthetic data, tiny SD2, train + eval) on cuda:0 and on the CPU"
for dev in cuda cpu; do
    t0=$(date +%s.%N)
    timeout 150 "$X/sd2" demo --device $dev --images 3000 --epochs 2 --out /tmp/demo-$dev \
        >>"$W/engine.log" 2>&1
    rc=$?
    echo "demo $dev wall $(python3 -c "import time; print(round(time.time() - $t0, 1))") s" | tee -a "$W/engine.log"
    step "demo $dev" $rc
    grep -E "AUC|wall|error" "$W/engine.log" | tail -4
done
fi  # QUICK

if [ -n "${QUICK:-}" ]; then
echo "== LoRA-linear GEMM: sd2 fused vs cuBLAS plain and 3-GEMM (CLIP projection shapes)"
timeout 200 "$X/sd2" bench lora --json "$W/lora.json"
step "sd2 bench lora" $?
else
echo "== GEMM: cuBLAS vs the SIMT kernel, then the LoRA-linear table (fused vs cuBLAS)"
timeout 240 "$X/sd2" bench gemm --json "$W/gemm.json"
step "sd2 bench gemm" $?
fi

if [ -z "${SKIP_FLASH_BENCH:-}${QUICK:-}" ]; then
    echo "== flash attention timings: sd2 vs PyTorch SDPA (same shapes, same lease)"
    timeout 150 "$X/sd2" bench flash --json "$W/flash_sd2.json"
    step "sd2 bench flash" $?
    PYTHONUNBUFFERED=1 timeout 150 python3 "$D/sdpa_attention.py" --json "$W/flash_sdpa.json"
    step "sdpa baseline" $?
fi

if [ -z "${QUICK:-}" ]; then
    echo "== SD2 at ViT-L/14 size, random weights, bf16 + f32 masters: train step and inference, profiled"
    timeout 240 "$X/sd2" bench train --preset vit-l14 --device cuda --batch 32 --steps 3 \
        --trace "$W/train_trace.json" --top 12 2>&1 | tee -a "$W/engine.log"
    step "sd2 bench train" ${PIPESTATUS[0]}
    timeout 120 "$X/sd2" bench infer --preset vit-l14 --device cuda --batch 64 --steps 5 \
        --top 8 2>&1 | tee -a "$W/engine.log"
    step "sd2 bench infer" ${PIPESTATUS[0]}
    echo "== the same SD2 in PyTorch (HF CLIP + peft, bf16 autocast, SDPA): eager and torch.compile"
    PYTHONUNBUFFERED=1 timeout 300 python3 "$D/sd2_torch_bench.py" --preset vit-l14 --batch 32 \
        --infer-batch 64 --steps 3 --warmup 2 2>&1 | grep -v Warning | tee -a "$W/engine.log"
    step "torch sd2 baseline" ${PIPESTATUS[0]}
fi

echo "== summary ($(cat "$D/COMMIT" 2>/dev/null))"
printf '%s\n' "${status[@]}"
flash_table "$W/flash_sd2.json" "$W/flash_sdpa.json" | tee "$OUT/flash.txt"
pack
