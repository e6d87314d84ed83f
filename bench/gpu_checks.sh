#!/usr/bin/env bash
# GPU checks for one CUDA machine, as one run that fits a 15-minute device window (start-up included).
#
#   bash bench/gpu_checks.sh [OUTPUT_FOLDER]            (default ./gpu-checks)   on a CUDA machine
#   bash bench/gpu_checks.sh --smoke [OUTPUT_FOLDER]    on a CPU: the same scripts at toy sizes
#
# Without --smoke and without a CUDA device it stops at once (exit 2) and says so. Steps, each under its own
# timeout (caps summing to 760 s, each cut to what is left of GPU_CHECKS_BUDGET, default 700 s; a step is skipped
# under 20 s left), so that one failure or hang does not stop the rest; the most wanted figures first:
#   env            nvidia-smi; torch / CUDA / cuDNN / NCCL versions, device name, capability, bf16 support
#   store          a synthetic training store in the preprocess layout: 264 px, 12 bands, shards of 64 (2,048 samples)
#   steps          bench/gpu_train.py: SoftCon step against the plain supervised step of the same timm backbone,
#                  batch and precision (bf16): ResNet-50, ViT-S/14, ViT-B/14 at batch 128, 256, 512, 224 px crops,
#                  eager; SoftCon / supervised per backbone and batch (steps.json, steps.md)
#   e2e            run_training (the loop `softcon train` runs: production loader on decode threads, GpuAugment, the
#                  step, log windows) on the store, ResNet-50, batch 256, crop 224, against the step alone (e2e.json)
#   loader         the training loader's samples/s per (workers x decode threads), two views, 224 px (loader.json)
#   ddp            under torchrun, one rank: an NCCL all_reduce, DDP-wrapped trainer steps against the plain trainer,
#                  run_training on CUDA with checkpoints and load_encoder (ddp.log)
#   ddp-all        with several GPUs: run_training under torchrun on all of them (DDP), ResNet-50, 128 scenes per
#                  GPU in the global batch (ddp_all.json); with one GPU the ddp step's one rank is all there is
#   compiled       (not in smoke mode) the steps rows under torch.compile at batch 256 (compiling takes 30-60 s per row; rows are
#                  written as they finish, so a timeout keeps the ones done) (compiled.json, compiled.md)
#   pytest-cuda    the CUDA-only tests and the tests whose paths change when CUDA is visible
#   optimizer      bench/bench_softcon_step.py --optimizer: the SoftCon step with AdamW fused (training's), foreach and
#                  the per-tensor loop, ResNet-50 at batch 256, 224 px (optimizer.log)
# The output folder gets: env.log store.log steps.{json,md,log} e2e.{json,log} loader.{json,log} ddp.log
# ddp_all.{json,log} compiled.{json,md,log} pytest.log optimizer.log summary.md. Environment: PYTHON (default python3),
# GPU_CHECKS_BUDGET (seconds for all steps). Exit status 0 when no step failed, 2 without CUDA (no --smoke).
set -u
export PYTHONUNBUFFERED=1

SMOKE=0
if [[ ${1:-} == --smoke ]]; then
    SMOKE=1
    shift
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUTDIR=${1:-./gpu-checks}
PY=${PYTHON:-python3}
if ((!SMOKE)) && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_checks: no CUDA device visible to $PY (torch.cuda.is_available() is False): nothing measured." >&2
    echo "gpu_checks: run it on a GPU machine, or 'bash bench/gpu_checks.sh --smoke OUT' for the CPU smoke mode." >&2
    exit 2
fi
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd) || exit 2
BUDGET=${GPU_CHECKS_BUDGET:-700}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/softcon-gpu-checks.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT
export SOFTCON_HOME="$WORK/home"  # no .softcon folder in the checkout
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT" || exit 2

START=$SECONDS
RESULTS=()
FAILED=0

# step NAME CAP_SECONDS LOGFILE COMMAND...: runs COMMAND under min(CAP, budget left), output to the log and stdout
step() {
    local name=$1 cap=$2 log=$OUTDIR/$3
    shift 3
    local left=$((BUDGET - (SECONDS - START)))
    if ((left < 20)); then
        echo "=== $name: skipped, ${left}s of the ${BUDGET}s budget left" | tee -a "$log"
        RESULTS+=("$(printf '| %s | SKIPPED (time budget spent) | | |' "$name")")
        return
    fi
    local limit=$((cap < left ? cap : left)) began=$SECONDS rc verdict
    echo "=== $name (timeout ${limit}s): $*" | tee -a "$log"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) verdict=PASS ;;
        124 | 137) verdict="TIMEOUT after ${limit}s" FAILED=1 ;;
        *) verdict="FAIL (exit $rc)" FAILED=1 ;;
    esac
    echo "=== $name: $verdict in $((SECONDS - began))s" | tee -a "$log"
    RESULTS+=("$(printf '| %s | %s | %ss | %s |' "$name" "$verdict" "$((SECONDS - began))" "$rc")")
}

skip() {  # skip NAME LOGFILE REASON
    echo "=== $1: skipped ($3)" | tee -a "$OUTDIR/$2"
    RESULTS+=("$(printf '| %s | SKIPPED (%s) | | |' "$1" "$3")")
}

# --- env ------------------------------------------------------------------------------------------------------
env_report() {
    date -u
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
    else
        echo "nvidia-smi: not found"
    fi
    "$PY" - <<'EOF'
import os, platform, torch
print(f"python {platform.python_version()}  torch {torch.__version__}  CUDA build {torch.version.cuda}  "
      f"{len(os.sched_getaffinity(0))} cores")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {torch.cuda.get_device_name(0)}  capability {torch.cuda.get_device_capability(0)}  "
          f"{p.multi_processor_count} SMs  {p.total_memory / 2**30:.1f} GiB  bf16 {torch.cuda.is_bf16_supported()}")
    print(f"cuDNN {torch.backends.cudnn.version()}  NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}  "
          f"devices {torch.cuda.device_count()}")
else:
    print("no CUDA: torch.cuda.is_available() is False (smoke mode)")
EOF
}
export PY WORK
export -f env_report  # timeout runs programs, not shell functions: the steps call them through bash
step env 20 env.log bash -c env_report

# --- sizes: the GPU run, or the smoke run's toy ones ----------------------------------------------------------------
if ((SMOKE)); then
    DEVICE=cpu PX=32 SAMPLES=256 MODELS=resnet18 BATCHES=4,8 BATCH=4 STEPS=(--steps 1 --warmup 1)
    LOADER_COMBOS=0x1,0x2 LOADER_BATCHES=3 E2E_STEPS=(--steps 2 --warmup 1) NGPU=0
else
    DEVICE=cuda PX=264 SAMPLES=2048 MODELS=resnet50,vit_small_patch14_dinov2,vit_base_patch14_dinov2
    BATCHES=128,256,512 BATCH=256 STEPS=(--steps 20 --warmup 5) LOADER_COMBOS=0x1,0x2,0x4,0x8,0x15,2x1,4x1,8x1
    LOADER_BATCHES=20 E2E_STEPS=(--steps 60 --warmup 5)
    NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
fi
SIZE=$((SMOKE ? PX : 224))  # the crop the models see: 224 px from 264 px patches, as SSL4EO-S12 / SoftCon train
STORE=$WORK/store.zarr
export STORE PX SAMPLES

# --- one store in the preprocess layout, shared by every step -------------------------------------------------------
write_store() {
    "$PY" - <<'EOF'
import os, sys, time
from pathlib import Path
sys.path.insert(0, "bench")
from gpu_train import preprocess_layout_store
started = time.perf_counter()
path = preprocess_layout_store(Path(os.environ["STORE"]), int(os.environ["SAMPLES"]), int(os.environ["PX"]))
print(f"store {path}: {os.environ['SAMPLES']} samples of {os.environ['PX']} px in {time.perf_counter() - started:.1f}s")
EOF
}
export -f write_store
step store 45 store.log bash -c write_store
BENCH=("$PY" bench/gpu_train.py --device "$DEVICE" --store "$STORE" --size "$SIZE")

# --- SoftCon step vs the supervised step, eager ----------------------------------------------------------------------
step steps 170 steps.log "${BENCH[@]}" --models "$MODELS" --batch-sizes "$BATCHES" "${STEPS[@]}" \
    --json "$OUTDIR/steps.json" --markdown "$OUTDIR/steps.md"

# --- end to end: the training loop through the production loader, against the step alone ----------------------------
step e2e 90 e2e.log "${BENCH[@]}" --e2e --models "${MODELS%%,*}" --batch-sizes "$BATCH" "${E2E_STEPS[@]}" \
    --json "$OUTDIR/e2e.json"

# --- the loader alone, per workers x decode threads -------------------------------------------------------------------
step loader 70 loader.log "${BENCH[@]}" --models "${MODELS%%,*}" --batch-sizes "$BATCH" \
    --loader-table "$LOADER_COMBOS" --loader-batches "$LOADER_BATCHES" --json "$OUTDIR/loader.json"

# --- NCCL / DDP and the real training loop on CUDA ------------------------------------------------------------
cat >"$WORK/ddp_check.py" <<'EOF'
"""One torchrun process: NCCL all_reduce, DDP-wrapped trainer steps against plain ones, run_training on CUDA."""

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

work, device_name = Path(sys.argv[1]), sys.argv[2]
sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "tests"), os.path.join(os.getcwd(), "bench")]
from gpu_train import load_batches  # noqa: E402
from store_factory import write_store  # noqa: E402

from models.distributed import DistributedContext, init_distributed  # noqa: E402
from softcon.config import TrainConfig  # noqa: E402
from tasks.train import build_trainer, load_encoder, read_checkpoint, run_training, seed_everything  # noqa: E402

device = torch.device(device_name)
cuda = device.type == "cuda"
if cuda and device.index is None:  # as run_training does under DDP: DDP's device_ids needs the index
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
backend = "nccl" if cuda else "gloo"
print(
    f"torchrun env: RANK={os.environ.get('RANK')} WORLD_SIZE={os.environ.get('WORLD_SIZE')} "
    f"LOCAL_RANK={os.environ.get('LOCAL_RANK')} MASTER_PORT={os.environ.get('MASTER_PORT')}"
)
ctx = init_distributed(device.type)  # world size 1: no group (the project's rule); this check makes its own
print(f"init_distributed (world size 1): enabled={ctx.enabled}, group initialised={dist.is_initialized()}")

# 1. an NCCL group of one rank and an all_reduce on the device
if cuda:
    torch.cuda.set_device(device)
dist.init_process_group(backend=backend)
x = torch.full((1024,), 3.0, device=device)
dist.all_reduce(x)
if cuda:
    torch.cuda.synchronize()
assert dist.get_backend() == backend and torch.all(x == 3.0 * dist.get_world_size()), (dist.get_backend(), x[:4])
print(f"all_reduce on {backend}, world size {dist.get_world_size()}: OK")


@dataclass(frozen=True)
class OneRankDDP(DistributedContext):
    """A group of one rank treated as data-parallel, so Trainer wraps the student in DDP and averages the loss's
    gradients with all_reduce, as it does on several GPUs."""

    @property
    def enabled(self) -> bool:
        return True


store = write_store(work / "ddp_store.zarr", n_locations=80, dates_per_location=2, size=64).path
side, batch_size, steps = 64, 32, 4
batches, _ = load_batches(store, side, batch_size, 2, device)
config = TrainConfig(
    store=str(store),
    out=str(work / "ddp_ckpt"),
    backbone="resnet50",
    batch_size=batch_size,
    steps=steps,
    warmup_steps=1,
    device=device_name,
    embed_dim=128,
    mask_patch=8,
)
losses = {}
for name, dist_ctx in (("ddp", OneRankDDP(rank=0, world_size=1, owns_group=False)), ("plain", DistributedContext())):
    seed_everything(0)
    trainer = build_trainer(
        config,
        batches[0]["view_a"].shape[1],
        img_size=side,
        n_classes=batches[0]["labels"].shape[1],
        device=device,
        dist_ctx=dist_ctx,
    )
    wrapped = type(trainer.forward).__name__
    losses[name] = [float(trainer.step(batches[s % 2], s)["loss"]) for s in range(steps)]
    print(f"{name:5s} trainer (forward: {wrapped}): losses {[round(v, 5) for v in losses[name]]}")
    assert all(math.isfinite(v) for v in losses[name]), losses[name]
    del trainer
gap = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(losses["ddp"], losses["plain"], strict=True))
print(
    f"DDP vs plain, largest relative loss difference over {steps} steps: {gap:.2e}"
    + ("" if gap < 0.05 else "  WARNING: over 5 %")
)
dist.destroy_process_group()

# 2. the project's training loop on the device (world size 1 under torchrun: no DDP), checkpoint and reload
started = time.perf_counter()
logged = []
result = run_training(
    config.model_copy(update=dict(backbone="resnet18", steps=6, log_every=3, checkpoint_every=3)),
    on_metrics=lambda step, metrics: logged.append((step, metrics)),
)
for step, metrics in logged:
    print(
        f"run_training step {step}: loss {metrics['loss']:.4f}  samples/s {metrics['samples_per_second']:.0f}  "
        f"GPU peak {metrics.get('gpu_memory_peak_gb', float('nan')):.2f} GiB"
    )
state = read_checkpoint(result.checkpoint)
assert result.steps == 6 and (len(state["rng"]["cuda"]) > 0) == cuda, (result.steps, len(state["rng"]["cuda"]))
encoder, meta = load_encoder(result.checkpoint)
print(
    f"run_training on {device}: {result.steps} steps in {time.perf_counter() - started:.1f}s, checkpoint "
    f"{result.checkpoint.name} ({len(state['rng']['cuda'])} CUDA RNG states), encoder reloaded ({meta['backbone']})"
)
print("ddp check: OK")
EOF
if ((SMOKE)); then
    skip ddp ddp.log "smoke mode: DDP on CPU is tests/test_ddp.py and tests/test_torchrun.py"
else
    step ddp 70 ddp.log "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 \
        "$WORK/ddp_check.py" "$WORK" cuda
fi
if ((NGPU > 1)); then
    step ddp-all 80 ddp_all.log "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NGPU" \
        bench/gpu_train.py --device cuda --store "$STORE" --size "$SIZE" --e2e --models resnet50 \
        --batch-sizes $((128 * NGPU)) "${E2E_STEPS[@]}" --json "$OUTDIR/ddp_all.json"
else
    skip ddp-all ddp_all.log "$NGPU GPU: the ddp step ran one rank"
fi

# --- the step under torch.compile -------------------------------------------------------------------------------------
if ((SMOKE)); then
    skip compiled compiled.log "smoke mode: inductor on CPU compiles for minutes"
else
    step compiled 110 compiled.log "${BENCH[@]}" --models "$MODELS" --batch-sizes "$BATCH" "${STEPS[@]}" --compile \
        --json "$OUTDIR/compiled.json" --markdown "$OUTDIR/compiled.md"
fi

# --- tests that need CUDA, or whose code paths change when CUDA is visible -----------------------------------------
PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider --basetemp "$WORK/pytest")
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 4)  # pytest-xdist, when there: four test processes
if ((SMOKE)); then
    skip pytest-cuda pytest.log "smoke mode"
else
    step pytest-cuda 60 pytest.log "${PYTEST[@]}" "${XDIST[@]}" tests/test_data.py tests/test_train.py \
        tests/test_bench_gpu_train.py
fi

# --- AdamW implementations in the SoftCon step (training uses the fused one) -----------------------------------------
if ((SMOKE)); then
    OPTIMIZER_SIZES=(--backbone resnet18 --size "$SIZE" --batch-size "$BATCH" --rounds 1 --steps-per-round 1)
else
    OPTIMIZER_SIZES=(--backbone resnet50 --size "$SIZE" --batch-size "$BATCH" --rounds 4)
fi
step optimizer 45 optimizer.log "$PY" bench/bench_softcon_step.py --optimizer --device "$DEVICE" --store "$STORE" \
    "${OPTIMIZER_SIZES[@]}"

# --- summary ----------------------------------------------------------------------------------------------------
{
    echo "# softcon GPU checks, $(date -u '+%Y-%m-%d %H:%M UTC'), $((SECONDS - START))s, smoke: $SMOKE"
    echo
    grep -h "^device \|^python \|^cuDNN " "$OUTDIR/env.log" 2>/dev/null | sed 's/^/    /'
    echo
    echo "| step | result | time | exit |"
    echo "|---|---|---|---|"
    printf '%s\n' "${RESULTS[@]}"
    for table in steps.md compiled.md; do
        [[ -f $OUTDIR/$table ]] && { echo; cat "$OUTDIR/$table"; }
    done
    for json in e2e.json loader.json ddp_all.json; do
        [[ -f $OUTDIR/$json ]] && { echo; echo "$json:"; echo '```'; cat "$OUTDIR/$json"; echo; echo '```'; }
    done
    grep -h "^DDP vs plain\|^run_training on\|^all_reduce on" "$OUTDIR/ddp.log" 2>/dev/null
    grep -h -E "^[0-9]+ (passed|failed)|^=+ .*(passed|failed|error)" "$OUTDIR/pytest.log" 2>/dev/null
    grep -h -E "^AdamW|^fused |^foreach |^per-tensor loop " "$OUTDIR/optimizer.log" 2>/dev/null
    echo
    echo "failed steps: $FAILED"
} | tee "$OUTDIR/summary.md"
exit "$FAILED"
