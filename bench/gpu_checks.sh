#!/usr/bin/env bash
# GPU checks for one CUDA machine: what the CPU-only test suite cannot show.
#
#   bash bench/gpu_checks.sh [OUTPUT_FOLDER]        (default ./gpu-checks)
#
# Steps, each under its own timeout so that one failure or hang does not stop the rest:
#   env            nvidia-smi; torch / CUDA / cuDNN / NCCL versions, device name, capability, bf16 support
#   pytest-cuda    the CUDA-only tests (GPU augmentation equals the CPU path; pinned memory follows CUDA)
#   train          bench/gpu_train.py: ResNet-50 and ViT-S/14 SoftCon steps, 224 px, bf16 (+ rows as JSON), and
#                  the training loader's rate with DataLoader workers next to the step's
#   loader-threads the same loader decoding on threads in the main process instead of workers
#   ddp            under torchrun: an NCCL all_reduce, DDP-wrapped trainer steps (NCCL, one rank) against the
#                  plain trainer, and run_training's own loop on CUDA with checkpoints and load_encoder
#   compile        the training step of ResNet-50 under torch.compile
#   pytest-gpu-sensitive  tests whose paths change when CUDA is visible (pinned loaders, CUDA RNG state in
#                  checkpoints, the benchmark's smoke mode): tests/test_data.py, test_train.py, test_bench_gpu_train.py
# Without CUDA the GPU steps are reported as skipped and the benchmark's CPU smoke mode runs instead.
#
# The output folder gets at most 7 files: env.log pytest.log train.log train.json compile.log ddp.log summary.txt.
# Environment: PYTHON (default python3); GPU_CHECKS_BUDGET, seconds for all steps (default 330): a step never
# gets more than what is left, and is skipped when under 20 s are left. Exit status 0 when no step failed.
set -u
export PYTHONUNBUFFERED=1

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUTDIR=${1:-./gpu-checks}
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd) || exit 2
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECKS_BUDGET:-330}
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
        RESULTS+=("$(printf '%-22s SKIPPED (time budget spent)' "$name")")
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
    RESULTS+=("$(printf '%-22s %-26s %4ss  exit %s' "$name" "$verdict" "$((SECONDS - began))" "$rc")")
}

skip() {  # skip NAME LOGFILE REASON
    echo "=== $1: skipped ($3)" | tee -a "$OUTDIR/$2"
    RESULTS+=("$(printf '%-22s SKIPPED (%s)' "$1" "$3")")
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
import platform, torch
print(f"python {platform.python_version()}  torch {torch.__version__}  CUDA build {torch.version.cuda}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {torch.cuda.get_device_name(0)}  capability {torch.cuda.get_device_capability(0)}  "
          f"{p.multi_processor_count} SMs  {p.total_memory / 2**30:.1f} GiB  bf16 {torch.cuda.is_bf16_supported()}")
    print(f"cuDNN {torch.backends.cudnn.version()}  NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}  "
          f"devices {torch.cuda.device_count()}")
else:
    print("no CUDA: torch.cuda.is_available() is False")
EOF
}
export PY WORK
export -f env_report  # timeout runs programs, not shell functions: the steps call them through bash
step env 60 env.log bash -c env_report

CUDA=0
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null && CUDA=1

# --- CUDA-only tests --------------------------------------------------------------------------------------------
PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider --basetemp "$WORK/pytest")
if ((CUDA)); then
    step pytest-cuda 120 pytest.log "${PYTEST[@]}" \
        tests/test_data.py::test_gpu_augment_on_cuda_equals_cpu tests/test_data.py::test_pin_memory_follows_cuda_by_default
else
    skip pytest-cuda pytest.log "no CUDA"
fi

# --- training throughput ----------------------------------------------------------------------------------------
# One synthetic 264 px store in the preprocess stage's layout (cropped to 224 on the GPU, as in training; one batch
# of 128 two-view scenes is kept on the device and cycled, the step's speed not depending on the data) shared by the
# eager, the compiled and the loader runs; the loader's own rate is timed over 20 batches, repeating epochs.
write_store() {
    "$PY" - "$WORK/store" <<'EOF'
import sys, time
from pathlib import Path
sys.path.insert(0, "bench")
from gpu_train import synthetic_store
started = time.perf_counter()
path = synthetic_store(Path(sys.argv[1]), 264, 128)
print(f"synthetic store {path} written in {time.perf_counter() - started:.1f}s")
EOF
}
export -f write_store
if ((CUDA)); then
    step store 90 train.log bash -c write_store
    STORE=()
    [[ -d $WORK/store/store.zarr ]] && STORE=(--store "$WORK/store/store.zarr")
    step train 200 train.log "$PY" bench/gpu_train.py "${STORE[@]}" --n-batches 1 --steps 100 --warmup 10 \
        --json "$OUTDIR/train.json"
    # the loader in the main process on decode threads (no shared-memory batches) against the workers above
    step loader-threads 90 train.log "$PY" bench/gpu_train.py "${STORE[@]}" --models resnet50 --n-batches 1 \
        --steps 20 --workers 0 --decode-threads "$(($(nproc) > 9 ? 8 : $(nproc) - 1))"
else
    skip train train.log "no CUDA"
    step train-cpu-smoke 240 train.log "$PY" bench/gpu_train.py --device cpu --steps 2 --size 64 \
        --json "$OUTDIR/train.json"
fi

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
if ((CUDA)); then
    step ddp 150 ddp.log "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 \
        "$WORK/ddp_check.py" "$WORK" cuda
else
    skip ddp ddp.log "no CUDA"
fi

# --- the training step under torch.compile (compiling takes 1-2 minutes) -------------------------------------------
if ((CUDA)); then
    step compile 160 compile.log "$PY" bench/gpu_train.py "${STORE[@]}" --n-batches 1 --steps 100 --warmup 10 \
        --models resnet50 --compile
else
    skip compile compile.log "no CUDA"
fi

# --- tests whose code paths change when CUDA is visible ----------------------------------------------------------
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 4)  # pytest-xdist, when there: four test processes
if ((CUDA)); then
    step pytest-gpu-sensitive 150 pytest.log "${PYTEST[@]}" "${XDIST[@]}" tests/test_data.py tests/test_train.py \
        tests/test_bench_gpu_train.py
else
    skip pytest-gpu-sensitive pytest.log "no CUDA"
fi

# --- summary ----------------------------------------------------------------------------------------------------
{
    echo "softcon GPU checks, $(date -u '+%Y-%m-%d %H:%M UTC'), $((SECONDS - START))s, CUDA visible: $CUDA"
    grep -h "^device \|^python " "$OUTDIR/env.log" 2>/dev/null
    printf '%s\n' "${RESULTS[@]}"
    for log in train.log compile.log; do
        [[ -f $OUTDIR/$log ]] && grep -h -A5 "^SoftCon training step on" "$OUTDIR/$log"
    done
    grep -h "^DDP vs plain\|^run_training on\|^all_reduce on" "$OUTDIR/ddp.log" 2>/dev/null
    grep -h -E "^[0-9]+ (passed|failed)|^=+ .*(passed|failed|error)" "$OUTDIR/pytest.log" 2>/dev/null
    echo "failed steps: $FAILED"
} | tee "$OUTDIR/summary.txt"
exit "$FAILED"
