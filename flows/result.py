"""What a stage flow hands to the next one: where its output is and which MLflow run recorded it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StageResult(BaseModel):
    """A stage's outcome: small and serialisable, so Prefect can persist and cache it."""

    model_config = ConfigDict(frozen=True)

    stage: str
    run_id: str
    """The MLflow run of this stage."""
    output: str
    """Path or URL of what the stage wrote (cube, training store, checkpoint)."""
    metrics: dict[str, float] = {}
    seconds: float = 0.0
    """Wall-clock time of the stage, including Prefect and MLflow overhead."""
    warning: str | None = None
    """What went wrong without failing the stage (it wrote nothing, a split is empty) and what to change."""


class PipelineResult(BaseModel):
    """The pipeline's parent MLflow run and each stage's result, in order."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    stages: dict[str, StageResult]
