"""Did pretraining help: fine-tuning of the pretrained encoder, of a random init and of image statistics at fixed
label budgets, over seeds, as one table and one plot.

For each label budget (a fraction of the train split) and seed, ``run_budgets`` fine-tunes, with the same
``FinetuneConfig`` but ``train_fraction`` = the budget and ``seed`` = the seed, so that every row at one budget and
seed trains on the same label subset, drawn as ``softcon finetune`` draws it (``tasks.finetune.finetune_data``):

- ``pretrained``: the encoder given (``run_finetune``);
- ``random init``: the same backbone from random weights (``run_finetune`` with ``model=random``; the store's
  statistics normalise its input, as ``softcon finetune random`` does);
- ``image statistics`` (multilabel only): a logistic head on the per-band mean and std of each patch
  (``models.probe.BandStatistics``, evaluate's ``image-stats`` baseline), trained by the same ``fit`` (AdamW, epochs,
  early stopping on val) on the same subset. A per-patch statistic gives no per-pixel classes: for segmentation the
  table says it does not apply.

The fine-tuned models are deleted once their metrics are read (the table is the result; a bench run makes dozens).
``budget_table`` gives each encoder and budget the task's test metrics as mean ± half-width of the 95 % Student t
interval over the seeds (as ``bench/paper_claim.py``), ``budget_figure`` the metrics against the budget on a log axis.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from scipy import stats

from softcon.config import FINETUNE_RANDOM, FinetuneConfig
from softcon.models.finetune import FinetuneModel, evaluate, fit
from softcon.models.probe import BandStatistics
from softcon.tasks.evaluate import slug
from softcon.tasks.finetune import encoder_and_meta, finetune_data, run_finetune, split_loader
from softcon.tasks.train import resolve_device, seed_everything

PRETRAINED = "pretrained"
RANDOM_INIT = "random init"
IMAGE_STATISTICS = "image statistics"
ENCODERS = (PRETRAINED, RANDOM_INIT, IMAGE_STATISTICS)
TASK_METRICS: dict[str, tuple[tuple[str, str], ...]] = {
    "segmentation": (("miou", "mIoU"), ("pixel_accuracy", "pixel accuracy")),
    "multilabel": (("map_micro", "mAP micro"), ("map_macro", "mAP macro")),
}
"""Per task, the test metrics of the table (name in ``run_finetune``'s metrics, column title)."""
NOT_APPLICABLE = "does not apply"
FILES = ("finetune_budgets.md", "finetune_budgets.json", "finetune_budgets.png")
"""The report: the table, the per-seed runs, the figure."""


@dataclass(frozen=True)
class BudgetRun:
    """One fine-tuning of one encoder at one label budget and seed."""

    encoder: str
    budget: float
    seed: int
    metrics: dict[str, float]
    """The task's test metrics (``TASK_METRICS`` names, without ``test/``), n_train, epochs_run, seconds."""


def budget_config(config: FinetuneConfig, budget: float, seed: int, out: Path, **changes: Any) -> FinetuneConfig:
    """``config`` at one label budget and seed, writing to ``out`` (and ``changes``), validated again."""
    values = config.model_dump() | {"train_fraction": budget, "seed": seed, "out": str(out)} | changes
    return FinetuneConfig.model_validate(values)


def _test_metrics(metrics: dict[str, float], task: str) -> dict[str, float]:
    """The table's metrics of a ``run_finetune`` report (NaN without a test split) and its run facts."""
    named = {name: metrics.get(f"test/{name}", math.nan) for name, _ in TASK_METRICS[task]}
    return named | {key: metrics[key] for key in ("n_train", "epochs_run", "seconds")}


def image_statistics_finetune(config: FinetuneConfig, meta: dict[str, Any]) -> dict[str, float]:
    """Test metrics of a logistic head on per-band mean and std, fit as ``run_finetune`` fits (same subset, epochs,
    lr, early stopping), on images normalised by ``meta`` (the random-init row's)."""
    started = time.perf_counter()
    device = resolve_device(config.device)
    seed_everything(config.seed)
    data = finetune_data(config, meta)
    n_classes = len(data.class_names)
    model = FinetuneModel(BandStatistics(int(meta["in_chans"])), "multilabel", n_classes)
    result = fit(
        model, split_loader(data.train, config, shuffle=True), split_loader(data.val, config), n_classes=n_classes,
        epochs=config.epochs, lr=config.lr, weight_decay=config.weight_decay, patience=config.patience,
        device=device, set_epoch=data.set_epoch,
    )  # fmt: skip
    metrics = {"n_train": float(len(data.train)), "epochs_run": float(result.epochs_run)}
    if len(data.test):
        tested = evaluate(model, split_loader(data.test, config), n_classes, device).metrics
        metrics |= {f"test/{name}": value for name, value in tested.items()}
    return _test_metrics(metrics | {"seconds": time.perf_counter() - started}, "multilabel")


def run_budgets(
    config: FinetuneConfig,
    checkpoint: str | Path | None,
    budgets: Iterable[float],
    seeds: Iterable[int],
    out: str | Path,
    *,
    on_run: Callable[[BudgetRun], None] | None = None,
) -> list[BudgetRun]:
    """Fine-tune each encoder (module doc) at each budget and seed; their test metrics, one ``BudgetRun`` each.

    Args:
        config: the fine-tuning of every row; ``config.model`` (resolved to ``checkpoint`` as ``run_finetune`` takes
            it) is the pretrained encoder, whose backbone the random-init row builds.
        out: folder of the runs (``<encoder>/budget-<b>/seed-<s>``).
        on_run: called with each run as it finishes.

    Example:
        >>> runs = run_budgets(FinetuneConfig(model="ckpt.pt", store="store.zarr"), "ckpt.pt", [0.1, 1], [0, 1], "out")
        >>> print(budget_table(runs, "segmentation"))
    """
    _, meta = encoder_and_meta(config, checkpoint)
    sensor = meta["sensor"] if meta["sensor"] in ("s1", "s2") else config.sensor
    random_config = budget_config(config, config.train_fraction, config.seed, Path(config.out), model=FINETUNE_RANDOM,
                                  backbone=meta["backbone"], sensor=sensor)  # fmt: skip
    _, random_meta = encoder_and_meta(random_config, None)
    encoders = [(PRETRAINED, config, checkpoint), (RANDOM_INIT, random_config, None)]
    runs: list[BudgetRun] = []
    for budget in budgets:
        for seed in seeds:
            for name, base, source in encoders:
                folder = Path(out) / slug(name) / f"budget-{budget:g}" / f"seed-{seed}"
                report = run_finetune(budget_config(base, budget, seed, folder), source)
                report.checkpoint.unlink()
                runs.append(BudgetRun(name, budget, seed, _test_metrics(report.metrics, config.task)))
                if on_run is not None:
                    on_run(runs[-1])
            if config.task == "multilabel":
                folder = Path(out) / slug(IMAGE_STATISTICS) / f"budget-{budget:g}" / f"seed-{seed}"
                metrics = image_statistics_finetune(budget_config(random_config, budget, seed, folder), random_meta)
                runs.append(BudgetRun(IMAGE_STATISTICS, budget, seed, metrics))
                if on_run is not None:
                    on_run(runs[-1])
    return runs


# ------------------------------------------------------------------------------------------------ summary


def interval(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, half-width of the 95 % Student t interval, n) over the finite values; the half-width is NaN with
    fewer than two values, the mean too with none."""
    array = np.asarray([value for value in values if math.isfinite(value)], dtype=np.float64)
    if len(array) == 0:
        return math.nan, math.nan, 0
    if len(array) < 2:
        return float(array.mean()), math.nan, 1
    half = stats.t.ppf(0.975, len(array) - 1) * array.std(ddof=1) / math.sqrt(len(array))
    return float(array.mean()), float(half), len(array)


def interval_cell(mean: float, half: float) -> str:
    """``mean ± half`` in percent, one decimal; the mean alone without a half-width; ``–`` without a mean."""
    if not math.isfinite(mean):
        return "–"
    return f"{100 * mean:.1f} ± {100 * half:.1f}" if math.isfinite(half) else f"{100 * mean:.1f}"


def budget_label(budget: float) -> str:
    """A label budget in percent of the train split: ``1 %``, ``100 %``."""
    return f"{100 * budget:g} %"


def budget_summary(runs: list[BudgetRun], task: str) -> tuple[list[str], list[list[str]]]:
    """The table's header and rows: one per encoder and budget (encoders in ``ENCODERS`` order, budgets rising):
    encoder, label budget, n train, each metric's mean ± 95 % interval over the seeds, n seeds. For segmentation a
    last row says image statistics do not apply."""
    metrics = TASK_METRICS[task]
    header = ["encoder", "label budget", "n train", *[f"test {title}" for _, title in metrics], "n seeds"]
    rows = []
    for encoder in ENCODERS:
        for budget in sorted({run.budget for run in runs if run.encoder == encoder}):
            chosen = [run for run in runs if run.encoder == encoder and run.budget == budget]
            cells = [interval_cell(*interval(run.metrics[name] for run in chosen)[:2]) for name, _ in metrics]
            n_train = str(int(chosen[0].metrics["n_train"]))  # the same subset size for every seed
            rows.append([encoder, budget_label(budget), n_train, *cells, str(len(chosen))])
    if task == "segmentation":
        rows.append([IMAGE_STATISTICS, "all", "–", *[NOT_APPLICABLE] * len(metrics), "0"])
    return header, rows


def budget_table(runs: list[BudgetRun], task: str) -> str:
    """``budget_summary`` as a markdown table, with what its numbers are."""
    header, rows = budget_summary(runs, task)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    note = (
        f"\n\n{task} fine-tuning, test split; metrics in percent, mean ± half-width of the 95 % Student t interval "
        "over the seeds (the mean alone for one seed); every encoder trains on the same label subset per budget and "
        "seed."
    )
    if task == "segmentation":
        note += f" Image statistics {NOT_APPLICABLE}: a per-patch mean and std give no per-pixel classes."
    return "\n".join(lines) + note + "\n"


def budget_metrics(runs: list[BudgetRun], task: str) -> dict[str, float]:
    """MLflow metrics of the summary: ``<encoder>/budget_<b>/test_<metric>`` (the mean over seeds) and ``…_ci95``
    (the interval's half-width, where there is one)."""
    flat: dict[str, float] = {}
    for encoder in ENCODERS:
        for budget in sorted({run.budget for run in runs if run.encoder == encoder}):
            chosen = [run for run in runs if run.encoder == encoder and run.budget == budget]
            for name, _ in TASK_METRICS[task]:
                mean, half, _ = interval(run.metrics[name] for run in chosen)
                prefix = f"{slug(encoder)}/budget_{budget:g}/test_{name}"
                flat |= {prefix: mean} | ({f"{prefix}_ci95": half} if math.isfinite(half) else {})
    return flat


def budget_figure(runs: list[BudgetRun], task: str) -> Figure:
    """Each metric against the label budget (log x axis): one line per encoder through the means over seeds, a band
    for the 95 % interval."""
    metrics = TASK_METRICS[task]
    figure = Figure(figsize=(4.5 * len(metrics), 3.8), layout="constrained")
    panels = figure.subplots(1, len(metrics), squeeze=False)[0]
    budgets = sorted({run.budget for run in runs})
    for panel, (name, title) in zip(panels, metrics, strict=True):
        for encoder in ENCODERS:
            shown = [budget for budget in budgets if any(r.encoder == encoder and r.budget == budget for r in runs)]
            if not shown:
                continue
            summary = np.array([interval(r.metrics[name] for r in runs if r.encoder == encoder and r.budget == budget)
                                for budget in shown])  # fmt: skip
            mean, half = 100 * summary[:, 0], 100 * np.nan_to_num(summary[:, 1])
            (line,) = panel.plot(shown, mean, marker="o", label=encoder)
            panel.fill_between(shown, mean - half, mean + half, color=line.get_color(), alpha=0.2)
        panel.set_xscale("log")
        panel.set_xticks(budgets, [budget_label(budget) for budget in budgets])
        panel.minorticks_off()
        panel.set_xlabel("label budget (share of the train split)")
        panel.set_ylabel(f"test {title} (%)")
        panel.grid(alpha=0.3)
    n_seeds = len({run.seed for run in runs})
    panels[0].legend(fontsize="small")
    figure.suptitle(f"{task} fine-tuning: mean and 95 % interval over {n_seeds} seed(s)", fontsize="medium")
    return figure


def write_budget_report(runs: list[BudgetRun], task: str, out: str | Path) -> list[Path]:
    """``FILES`` in ``out``: the markdown table, the per-seed runs as JSON, the figure; the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table, runs_file, plot = (out / name for name in FILES)
    table.write_text(budget_table(runs, task))
    runs_file.write_text(json.dumps({"task": task, "runs": [asdict(run) for run in runs]}, indent=1))
    budget_figure(runs, task).savefig(plot, dpi=100)
    return [table, runs_file, plot]


def read_budget_runs(path: str | Path) -> tuple[str, list[BudgetRun]]:
    """The task and runs of a ``finetune_budgets.json`` that ``write_budget_report`` wrote."""
    state = json.loads(Path(path).read_text())
    return state["task"], [BudgetRun(**run) for run in state["runs"]]
