"""The GPU training benchmark's CPU smoke mode: both paper backbones train on store batches and report."""

from __future__ import annotations

import importlib
import json
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
    rows = module.main(["--device", "cpu", "--steps", "2", "--size", "64", "--json", str(tmp_path / "rows.json")])
    assert [row.model for row in rows] == ["resnet50", "vit_small_patch14_dinov2"]
    assert [row.size for row in rows] == [64, 56]  # ViT-S/14: floored to a multiple of the 14 px patch
    for row in rows:
        assert row.samples_per_second > 0 and row.gflops_per_step > 1  # counted forward + backward FLOPs
        assert row.peak_memory_gib is None and row.mfu is None  # no CUDA device, no peak to compare with
    assert len(json.loads((tmp_path / "rows.json").read_text())) == 2


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
