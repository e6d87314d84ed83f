"""Finetune-budgets flow: did pretraining help, as fine-tuning rows of ``softcon compare`` (``tasks/finetune_budgets``).

One MLflow run (stage ``finetune-budgets``, nested under compare's evaluate run) holds the configuration as params,
each encoder's mean test metrics per budget (and their 95 % interval half-widths), and the report as artifacts under
``finetune_budgets/``: the markdown table, the per-seed runs as JSON, and the figure.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow

from softcon.config import FinetuneBudgetsConfig
from softcon.flows.finetune import encoder_checkpoint
from softcon.flows.result import StageResult
from softcon.flows.tracking import run_stage
from softcon.tasks.finetune_budgets import BudgetRun, budget_metrics, budget_table, run_budgets, write_budget_report

REPORT_ARTIFACT = "finetune_budgets"
"""Artifact folder of the report in a finetune-budgets run."""


@flow(name="finetune-budgets")
def finetune_budgets_flow(
    config: FinetuneBudgetsConfig, parent_run_id: str | None = None, experiment: str | None = None
) -> StageResult:
    """Fine-tune the pretrained model, a random init and (multilabel) image statistics at each label budget and
    seed; log the table, the per-seed results and the figure. The output is the report folder."""
    with run_stage("finetune-budgets", config, parent_run_id=parent_run_id, experiment=experiment) as stage:
        out = Path(config.out) / stage.run_id
        task = config.finetune.task

        def log_run(run: BudgetRun) -> None:
            stage.logger.info("%s, budget %g, seed %d: %s", run.encoder, run.budget, run.seed,
                              ", ".join(f"{k} {v:.3f}" for k, v in run.metrics.items()))  # fmt: skip

        runs = run_budgets(config.finetune, encoder_checkpoint(config.finetune.model), config.budgets, config.seeds,
                           out / "runs", on_run=log_run)  # fmt: skip
        for path in write_budget_report(runs, task, out):
            mlflow.log_artifact(str(path), artifact_path=REPORT_ARTIFACT)
        stage.logger.info("fine-tuning at label budgets (artifact %s/):\n%s", REPORT_ARTIFACT, budget_table(runs, task))
        return stage.result(str(out), budget_metrics(runs, task))
