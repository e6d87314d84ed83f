"""The GPU benchmarks' CPU smoke modes: gpu_train.py's rows and tables, and gpu_checks.sh as one run."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def gpu_train(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("gpu_train")


@pytest.mark.slow
def test_gpu_train_smoke_mode_runs_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = gpu_train(monkeypatch)
    rows = module.main(
        ["--device", "cpu", "--steps", "2", "--size", "64", "--models", "resnet50,vit_small_patch14_dinov2",
         "--json", str(tmp_path / "rows.json"), "--markdown", str(tmp_path / "rows.md")]
    )  # fmt: skip
    assert [(row.model, row.objective) for row in rows] == [
        ("resnet50", "softcon"), ("resnet50", "supervised"),
        ("vit_small_patch14_dinov2", "softcon"), ("vit_small_patch14_dinov2", "supervised"),
    ]  # fmt: skip
    assert [row.size for row in rows] == [64, 64, 56, 56]  # ViT-S/14: floored to a multiple of the 14 px patch
    for row in rows:
        assert row.samples_per_second > 0 and row.gflops_per_step > 1  # counted forward + backward FLOPs
        assert row.peak_memory_gib is None and row.mfu is None  # no CUDA device, no peak to compare with
    softcon, supervised = rows[0].gflops_per_step, rows[1].gflops_per_step
    assert softcon > supervised  # the teacher's forward on the second view
    assert len(json.loads((tmp_path / "rows.json").read_text())) == 4
    assert "| resnet50 | 4 | False |" in (tmp_path / "rows.md").read_text()  # the SoftCon / supervised table


def test_gpu_train_refuses_cuda_without_a_gpu(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    module = gpu_train(monkeypatch)
    with pytest.raises(SystemExit):
        module.main(["--device", "cuda"])
    assert "--device cpu --steps 2 --size 64" in capsys.readouterr().err


def test_gpu_checks_without_cuda_stop_at_once_and_say_why(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = subprocess.run(
        ["bash", str(BENCH / "gpu_checks.sh"), str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr and "--smoke" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing measured, nothing written


@pytest.mark.slow
def test_gpu_checks_smoke_mode_runs_every_cpu_step(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", str(BENCH / "gpu_checks.sh"), "--smoke", str(out)], capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    for name in ("env", "store", "steps", "e2e", "loader"):
        assert f"| {name} | PASS |" in summary, summary
    assert "SoftCon / supervised" in summary
    assert json.loads((out / "e2e.json").read_text())["e2e_over_step"] > 0
    assert [(row["workers"], row["decode_threads"]) for row in json.loads((out / "loader.json").read_text())] == [
        (0, 1), (0, 2),
    ]  # fmt: skip
