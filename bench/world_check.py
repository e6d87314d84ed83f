"""Is the structured sample world learnable from structure and not from per-band statistics?

Writes the structured sample world (``write_sample_data(world="structured")``), reads its BigEarthNet-format
evaluation folder with the project's reader (``tasks/bigearthnet.py``: patches, 19-class labels, the folder's
split lists by location block), then scores two models on the test blocks, training on the train and val
blocks:

- the image-statistics baseline: per-band mean and std of each patch, standardised, a one-vs-rest logistic
  regression per class;
- a supervised CNN: timm ResNet-18 with 12 input bands, from scratch, BCE, flips and right-angle rotations.

Both report micro mAP (``sklearn.metrics.average_precision_score(average="micro")``) over the classes that
have a training positive. The world passes when the baseline is at most 0.75 and the CNN at least 0.15 above
it (docs/sample_world.md). Sized for about 5 minutes on 2 free CPU cores (16 epochs of ~15 s):

    python bench/world_check.py --out /tmp/world_check
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import StandardScaler

from softcon.tasks.bigearthnet import S2_BANDS, BigEarthNetDataset, assign_splits, find_patches, read_patch
from softcon.tasks.sample_data import write_sample_data
from softcon.tasks.schemes import CORINE_BIGEARTHNET19

BASELINE_MAX = 0.75
CNN_MARGIN = 0.15


def image_stats_map(images: np.ndarray, labels: np.ndarray, train: np.ndarray) -> float:
    """Micro mAP on the test patches of a linear probe on per-band mean and std (standardised)."""
    features = np.concatenate([images.mean(axis=(2, 3)), images.std(axis=(2, 3))], axis=1)  # (N, 2C)
    scaler = StandardScaler().fit(features[train])
    probe = OneVsRestClassifier(LogisticRegression(max_iter=5000)).fit(scaler.transform(features[train]), labels[train])
    scores = probe.predict_proba(scaler.transform(features[~train]))
    return float(average_precision_score(labels[~train], scores, average="micro"))


def cnn_map(
    images: np.ndarray, labels: np.ndarray, train: np.ndarray, *, epochs: int, batch_size: int, lr: float, seed: int
) -> tuple[float, list[dict[str, float]]]:
    """Micro mAP on the test patches of a ResNet-18 trained from scratch on the train patches; and its history."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    mean = images[train].mean(axis=(0, 2, 3), keepdims=True)
    std = images[train].std(axis=(0, 2, 3), keepdims=True)
    x_all = torch.from_numpy((images - mean) / std)  # (N, C, H, W)
    y_all = torch.from_numpy(labels.astype(np.float32))  # (N, K)
    train_index, test_index = np.flatnonzero(train), np.flatnonzero(~train)
    model = timm.create_model("resnet18", pretrained=False, in_chans=images.shape[1], num_classes=labels.shape[1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * -(-len(train_index) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    history = []
    for epoch in range(epochs):
        started, total = time.perf_counter(), 0.0
        model.train()
        order = rng.permutation(train_index)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            x = torch.rot90(x_all[batch], int(rng.integers(4)), dims=(2, 3))  # land cover has no up
            if rng.random() < 0.5:
                x = torch.flip(x, dims=(3,))
            loss = F.binary_cross_entropy_with_logits(model(x), y_all[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        model.eval()
        with torch.no_grad():
            scores = torch.cat(
                [torch.sigmoid(model(x_all[test_index[i : i + 64]])) for i in range(0, len(test_index), 64)]
            )
        test_map = float(average_precision_score(labels[test_index], scores.numpy(), average="micro"))
        test_macro = float(average_precision_score(labels[test_index], scores.numpy(), average="macro"))
        history.append({"epoch": epoch, "loss": total / len(train_index), "test_map_micro": test_map,
                        "test_map_macro": test_macro, "seconds": time.perf_counter() - started})  # fmt: skip
        print(f"epoch {epoch}: loss {history[-1]['loss']:.3f}, test micro mAP {test_map:.3f}", flush=True)
    return history[-1]["test_map_micro"], history


def main(argv: list[str] | None = None) -> dict:
    """Run the check; the result (also written to ``<out>/world_check.json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".softcon/world_check"))
    parser.add_argument("--tiles", type=int, default=4)
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--dates", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the world and of the CNN.")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    timings: dict[str, float] = {}
    total = time.perf_counter()

    started = time.perf_counter()
    sample = write_sample_data(args.out / "sample", tiles=args.tiles, tile_size=args.tile_size, dates=args.dates,
                               seed=args.seed, world="structured")  # fmt: skip
    timings["sample_data"] = time.perf_counter() - started
    assert sample.bigearthnet is not None  # the structured world always writes it

    started = time.perf_counter()
    patches = find_patches(sample.bigearthnet, "s2")
    splits = assign_splits(sample.bigearthnet, [patch.name for patch in patches])
    images = np.stack([read_patch(patch) for patch in patches])  # (N, 12, 120, 120), the reader's 10 m grid
    labels = np.stack([patch.labels for patch in patches])  # (N, 19)
    stats = {"mean": images.mean(axis=(0, 2, 3)).tolist(), "std": images.std(axis=(0, 2, 3)).tolist()}
    item = BigEarthNetDataset(patches[:1], S2_BANDS, stats)[0]  # the evaluate stage's dataset reads them too
    timings["read"] = time.perf_counter() - started
    train = splits != "test"  # train and val blocks train; the test blocks score
    present = labels[train].sum(axis=0) > 0
    labels = labels[:, present]
    class_names = [n for n, keep in zip(CORINE_BIGEARTHNET19.class_names, present, strict=True) if keep]
    print(f"{len(patches)} patches ({train.sum()} train, {(~train).sum()} test), image {tuple(item['image'].shape)}, "
          f"{labels.sum(axis=1).mean():.2f} labels per patch over {len(class_names)} classes")  # fmt: skip

    started = time.perf_counter()
    baseline = image_stats_map(images, labels, train)
    timings["image_stats"] = time.perf_counter() - started
    print(f"image-statistics baseline: test micro mAP {baseline:.3f}")
    started = time.perf_counter()
    cnn, history = cnn_map(images, labels, train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                           seed=args.seed)  # fmt: skip
    timings["cnn"] = time.perf_counter() - started
    timings["total"] = time.perf_counter() - total

    passed = {
        "baseline_at_most_0.75": baseline <= BASELINE_MAX,
        "cnn_at_least_0.15_above": cnn >= baseline + CNN_MARGIN,
    }
    result = {
        "args": {k: str(v) for k, v in vars(args).items()}, "patches": len(patches), "train": int(train.sum()),
        "test": int((~train).sum()), "classes": class_names, "label_frequency": labels.mean(axis=0).round(3).tolist(),
        "image_stats_map_micro": baseline, "cnn_map_micro": cnn, "cnn_history": history, "passed": passed,
        "timings": timings,
    }  # fmt: skip
    (args.out / "world_check.json").write_text(json.dumps(result, indent=1))
    print(f"\nimage-statistics baseline {baseline:.3f} (target <= {BASELINE_MAX}), CNN {cnn:.3f} "
          f"(target >= {baseline + CNN_MARGIN:.3f}): {'PASS' if all(passed.values()) else 'FAIL'}")  # fmt: skip
    print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    return result


if __name__ == "__main__":
    main()
