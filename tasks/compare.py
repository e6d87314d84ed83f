"""The comparison report of an evaluation: a markdown/JSON table and plots, written to a folder.

Files (per dataset ``<d>``: ``store`` or ``bigearthnet``):

    comparison.md, comparison.json      one row per encoder and dataset; collapsed encoders marked
    per_class_ap-<d>.png                linear-probe AP of each class, one bar per encoder
    pr_curves-<d>.png                   micro-averaged precision-recall curve of each encoder's linear probe
    embedding-<d>.png                   2-D PCA map of each encoder's features, coloured by dominant class
                                        (the class with the largest area fraction where fractions are known,
                                        else the rarest present class, which is the most informative one)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from softcon.tasks.evaluate import EncoderResult, EvaluationResult

TABLE_COLUMNS = (
    ("linear_map_micro", "linear mAP micro"),
    ("linear_map_macro", "linear mAP macro"),
    ("knn_map_micro", "kNN mAP micro"),
    ("knn_map_macro", "kNN mAP macro"),
    ("linear_f1", "linear F1"),
    ("feature_std", "feature std"),
    ("feature_nan_fraction", "NaN fraction"),
    ("feature_spread", "spread"),
)


def _cell(value: float) -> str:
    if not np.isfinite(value):
        return "nan"
    return f"{100 * value:.1f}" if abs(value) <= 1 else f"{value:.3g}"


def comparison_table(results: list[EncoderResult] | tuple[EncoderResult, ...]) -> str:
    """Markdown table, one row per (dataset, encoder); mAP and F1 in percent; collapsed rows flagged."""
    header = ["dataset", "encoder", *[title for _, title in TABLE_COLUMNS], "n train / eval", "check"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        metrics = result.metrics
        check = "**COLLAPSED**" if result.collapsed else "ok"
        if metrics["feature_nan_fraction"] > 0:
            check = "**NaN features**" + (" / collapsed" if result.collapsed else "")
        cells = [result.dataset, result.encoder]
        for key, _ in TABLE_COLUMNS:
            value = metrics[key]
            cells.append(f"{value:.3g}" if key in ("feature_std", "feature_spread") else _cell(value))
            if key == "feature_nan_fraction":
                cells[-1] = f"{value:.3g}"
        cells += [f"{int(metrics['n_train'])} / {int(metrics['n_eval'])}", check]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nmAP and F1 in percent; spread = root total variance of L2-normalised features.\n"


def _dominant_class(y: np.ndarray, fractions: np.ndarray | None) -> np.ndarray:
    if fractions is not None and fractions.shape == y.shape and fractions.sum() > 0:
        return fractions.argmax(1)
    frequency = y.sum(0)  # (K,)
    rarity = np.where(y > 0, frequency[None, :], np.inf)  # (N, K)
    return rarity.argmin(1)


def write_report(result: EvaluationResult, out: str | Path, *, plots: bool = True) -> list[Path]:
    """Write the comparison table and (with ``plots``) the figures to ``out``; returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    table = out / "comparison.md"
    table.write_text(comparison_table(result.results))
    rows = [
        {"dataset": r.dataset, "encoder": r.encoder, "kind": r.kind, "collapsed": r.collapsed, **r.metrics}
        for r in result.results
    ]
    (out / "comparison.json").write_text(json.dumps(rows, indent=1))
    written += [table, out / "comparison.json"]
    if not plots:
        return written

    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA
    from sklearn.metrics import precision_recall_curve

    for dataset, class_names in result.class_names.items():
        rows_of = [r for r in result.results if r.dataset == dataset]
        scores = {r.encoder: np.load(r.scores_file) for r in rows_of}

        # per-class AP bars
        figure, axes = plt.subplots(figsize=(max(6, 0.5 * len(class_names) * len(rows_of) ** 0.5), 6))
        width = 0.8 / len(rows_of)
        for i, r in enumerate(rows_of):
            values = [r.per_class_ap.get(name, np.nan) for name in class_names]
            axes.bar(np.arange(len(class_names)) + i * width, values, width, label=r.encoder)
        short = [name if len(name) <= 28 else name[:26] + "…" for name in class_names]
        axes.set_xticks(np.arange(len(class_names)) + 0.4 - width / 2, short, rotation=60, ha="right")
        axes.set_ylabel("linear-probe AP")
        axes.set_ylim(0, 1)
        axes.set_title(f"per-class AP ({dataset})")
        axes.legend(fontsize="small")
        written.append(out / f"per_class_ap-{dataset}.png")
        figure.savefig(written[-1], dpi=100, bbox_inches="tight")  # long class names need the room
        plt.close(figure)

        # micro-averaged precision-recall curves
        figure, axes = plt.subplots(figsize=(5.5, 4.5))
        for r in rows_of:
            y, linear = scores[r.encoder]["y"], scores[r.encoder]["linear"]
            if y.any():
                precision, recall, _ = precision_recall_curve(y.ravel().astype(int), linear.ravel())
                axes.plot(recall, precision, label=f"{r.encoder} (AP {100 * r.metrics['linear_map_micro']:.1f})")
        axes.set_xlabel("recall")
        axes.set_ylabel("precision")
        axes.set_title(f"linear probe, micro-averaged ({dataset})")
        axes.legend(fontsize="small")
        figure.tight_layout()
        written.append(out / f"pr_curves-{dataset}.png")
        figure.savefig(written[-1], dpi=100)
        plt.close(figure)

        # 2-D embedding map (PCA of standardised features) coloured by dominant class
        figure, all_axes = plt.subplots(1, len(rows_of), figsize=(4 * len(rows_of), 4), squeeze=False)
        cmap = plt.get_cmap("tab20", max(len(class_names), 1))
        for axes, r in zip(all_axes[0], rows_of, strict=True):
            data = scores[r.encoder]
            x = np.nan_to_num(data["x"].astype(np.float64))
            x = (x - x.mean(0)) / (x.std(0) + 1e-9)
            points = PCA(n_components=2).fit_transform(x) if len(x) > 2 and x.shape[1] > 1 else np.zeros((len(x), 2))
            fractions = data.get("fractions", None)
            dominant = _dominant_class(data["y"], fractions)
            axes.scatter(points[:, 0], points[:, 1], c=dominant, cmap=cmap, vmin=0, vmax=len(class_names), s=8)
            axes.set_title(r.encoder, fontsize="small")
            axes.set_xticks([])
            axes.set_yticks([])
        present = sorted(set(np.concatenate([_dominant_class(s["y"], None) for s in scores.values()]).tolist()))
        handles = [plt.Line2D([], [], marker="o", ls="", color=cmap(c), label=class_names[c]) for c in present]
        figure.legend(handles=handles, loc="lower center", ncol=min(4, len(handles) or 1), fontsize="small")
        figure.suptitle(f"PCA of frozen features, coloured by dominant class ({dataset})")
        figure.tight_layout(rect=(0, 0.12, 1, 0.95))
        written.append(out / f"embedding-{dataset}.png")
        figure.savefig(written[-1], dpi=100)
        plt.close(figure)
    return written
