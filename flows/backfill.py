"""Backfill and daily ingest: a date range and an area become one ingest child flow run per period.

``backfill`` searches the range once, keeps the periods (day, week, month) that have usable acquisitions and
are not in the cube's ledger yet (``tasks/backfill.py``), and ingests each as a child flow run nested under
one MLflow parent run. Run from a deployment (``deployment="ingest/ingest"``), each child is a run of the
ingest deployment on the work pool, at most ``max_in_flight`` at a time, appending to the cube at once (each
tile is locked while a run appends to it: ``tasks/cube_store.py``). Run in process (the CLI), the children are
subflows, one after the other; each one's tiles still fan out over Dask workers (``IngestConfig.n_workers``).
A period is recorded in the ledger when its child completes having written its tile-dates (or found them already
there), with the tile-dates the cube then holds for it, so a backfill restarted after a crash skips the finished
periods, while a period that wrote nothing but nodata or cloudy skips, had failed items, or whose tile-dates
have since left the cube, runs again (``tasks/backfill.py`` says exactly when); ``refresh`` runs every period
with items whatever the ledger says. The ingest itself is idempotent (existing days are skipped, a half-written
append is repaired).

``daily-ingest`` is what the schedule runs: its window is the day(s) before the run's *scheduled* time in
the schedule's timezone, so a late run, or a re-run of an old scheduled run, ingests the right day.
"""

from __future__ import annotations

import time
from datetime import date, timedelta
from typing import Annotated, cast
from uuid import UUID
from zoneinfo import ZoneInfo

import mlflow
from prefect import flow, get_run_logger, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field

from softcon.config import CollectionName, IngestConfig
from softcon.flows.ingest import ingest_flow
from softcon.flows.tracking import completed_with_warning, stage_run
from softcon.settings import get_settings
from softcon.tasks.backfill import (
    DateWindow,
    Period,
    read_ledger_state,
    read_period_tile_dates,
    record_window,
    request_tiles,
    split_periods,
    unfinished_reason,
    window_config,
    windows_with_items,
)
from softcon.tasks.stac_search import filter_cloudy_items, search_items


class WindowOutcome(BaseModel):
    """What happened to one period of a backfill."""

    model_config = ConfigDict(frozen=True)

    start: date
    end: date
    status: str
    """``ingested`` (recorded in the ledger), ``incomplete`` (its ingest completed but the period is not done,
    see ``reason``: the next backfill runs it again), ``skipped`` (done according to the ledger), ``empty`` (no
    usable items) or ``failed``."""
    flow_run_id: str | None = None
    mlflow_run_id: str | None = None
    tile_dates_written: float = 0.0
    reason: str | None = None
    """Why an ``incomplete`` period was not recorded."""


class BackfillResult(BaseModel):
    """The backfill's MLflow parent run and the outcome of every period, in date order."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    windows: list[WindowOutcome]
    warning: str | None = None
    """Which periods ran but wrote nothing, and why (the Prefect run's state message and the MLflow tag)."""

    def count(self, status: str) -> int:
        return sum(1 for window in self.windows if window.status == status)


def incomplete_warning(outcomes: list[WindowOutcome]) -> str | None:
    """What to tell about periods whose ingest completed without recording them (None when there are none)."""
    incomplete = [outcome for outcome in outcomes if outcome.status == "incomplete"]
    if not incomplete:
        return None
    ran = sum(1 for outcome in outcomes if outcome.status in ("ingested", "incomplete"))
    lines = "; ".join(f"{o.start}..{o.end}: {o.reason}" for o in incomplete[:10])
    return (
        f"{len(incomplete)} of the {ran} periods run wrote nothing or not all they should, and are not recorded "
        f"(the next backfill runs them again): {lines}. See each period's ingest run for what was skipped"
    )


@task(name="find-periods-with-items", retries=2, retry_delay_seconds=[5, 30])
def find_windows(request: IngestConfig, period: str) -> dict[DateWindow, int]:
    """Search the whole range once; the periods holding items that pass the cloud filter, with their counts."""
    found = search_items(request)
    s2 = [item for item in found if "sentinel-2" in item.get("collection", "")]
    others = [item for item in found if "sentinel-2" not in item.get("collection", "")]
    kept, _ = filter_cloudy_items(s2, request.max_cloud)
    return windows_with_items(split_periods(request.start, request.end, period), kept + others)


def _child_parameters(
    config: IngestConfig, parent_run_id: str, experiment: str | None, refresh: bool
) -> dict[str, object]:
    return {
        "config": config.model_dump(mode="json"),
        "parent_run_id": parent_run_id,
        "experiment": experiment,
        "refresh": refresh,
    }


def _settle(
    request: IngestConfig,
    window: DateWindow,
    tile_ids: list[str],
    metrics: dict[str, float],
    *,
    flow_run_id: str | None,
    mlflow_run_id: str,
) -> WindowOutcome:
    """Record a period whose child completed, when it is done and the cube holds its tile-dates."""
    logger = get_run_logger()
    held = read_period_tile_dates(request, tile_ids, window)
    reason = unfinished_reason(metrics, held)
    ids = {"flow_run_id": flow_run_id, "mlflow_run_id": mlflow_run_id}
    if reason is None:
        record_window(request, window, tile_dates=held, **{k: v for k, v in ids.items() if v is not None})
        logger.info("period %s: completed", window.label)
    else:
        logger.warning(
            "period %s: completed but not recorded as done: %s; it runs again next time", window.label, reason
        )
    return WindowOutcome(
        start=window.start,
        end=window.end,
        status="ingested" if reason is None else "incomplete",
        tile_dates_written=metrics.get("tile_dates_written", 0.0),
        reason=reason,
        **ids,
    )


def _mlflow_run_of(flow_run_id: str, parent_run_id: str) -> mlflow.entities.Run:
    """The MLflow run a child flow run logged (tagged with its Prefect flow-run id by ``stage_run``)."""
    client = mlflow.MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    if not runs:
        raise RuntimeError(f"child flow run {flow_run_id} completed but logged no MLflow run")
    return runs[0]


def _run_children_on_deployment(
    request: IngestConfig,
    windows: list[DateWindow],
    tile_ids: list[str],
    *,
    deployment: str,
    max_in_flight: int,
    parent_run_id: str,
    experiment: str | None,
    refresh: bool,
    poll_seconds: float,
) -> list[WindowOutcome]:
    """One run of ``deployment`` per window, at most ``max_in_flight`` unfinished at a time."""
    logger = get_run_logger()
    pending = list(windows)
    in_flight: dict[str, DateWindow] = {}
    outcomes: list[WindowOutcome] = []
    with get_client(sync_client=True) as client:
        while pending or in_flight:
            while pending and len(in_flight) < max_in_flight:
                window = pending.pop(0)
                child = cast(  # run_deployment is sync-compatible: called from a sync flow it returns the run
                    FlowRun,
                    run_deployment(
                        deployment,
                        parameters=_child_parameters(
                            window_config(request, window), parent_run_id, experiment, refresh
                        ),
                        flow_run_name=f"ingest-{window.label}",
                        timeout=0,  # return at once; this loop waits
                        # A parent retried after a crash re-attaches to the child it already started.
                        idempotency_key=f"backfill:{flow_run.id}:{window.label}",
                        tags=["backfill"],
                    ),
                )
                in_flight[str(child.id)] = window
                logger.info("period %s: started child flow run %s", window.label, child.name)
            time.sleep(poll_seconds)
            for child_id, window in list(in_flight.items()):
                state = client.read_flow_run(UUID(child_id)).state
                if state is None or not state.is_final():
                    continue
                del in_flight[child_id]
                if state.is_completed():
                    # The child's result lives in its own process; its MLflow run is found by its flow-run tag.
                    run = _mlflow_run_of(child_id, parent_run_id)
                    outcomes.append(
                        _settle(
                            request,
                            window,
                            tile_ids,
                            run.data.metrics,
                            flow_run_id=child_id,
                            mlflow_run_id=run.info.run_id,
                        )
                    )
                else:
                    logger.error("period %s: child flow run %s ended %s", window.label, child_id, state.type.value)
                    outcomes.append(
                        WindowOutcome(start=window.start, end=window.end, status="failed", flow_run_id=child_id)
                    )
    return outcomes


def _run_children_in_process(
    request: IngestConfig,
    windows: list[DateWindow],
    tile_ids: list[str],
    *,
    parent_run_id: str,
    experiment: str | None,
    refresh: bool,
) -> list[WindowOutcome]:
    """One ingest subflow per window, in date order (they append to the same cube)."""
    logger = get_run_logger()
    outcomes = []
    for window in windows:
        state = ingest_flow(
            window_config(request, window),
            parent_run_id=parent_run_id,
            experiment=experiment,
            refresh=refresh,
            return_state=True,
        )
        if state.is_completed():
            result = state.result()
            outcomes.append(
                _settle(request, window, tile_ids, result.metrics, flow_run_id=None, mlflow_run_id=result.run_id)
            )
        else:
            logger.error("period %s: ingest ended %s", window.label, state.type.value)
            outcomes.append(WindowOutcome(start=window.start, end=window.end, status="failed"))
    return outcomes


@flow(name="backfill")
def backfill_flow(
    request: IngestConfig,
    period: Period = "day",
    max_in_flight: Annotated[int, Field(ge=1, le=64)] = 2,
    deployment: str | None = None,
    experiment: str | None = None,
    refresh: bool = False,
    poll_seconds: float = 2.0,
) -> BackfillResult:
    """Ingest request.start..request.end over request.bbox as one child flow run per period.

    Args:
        request: the ingest request; its start and end are the backfill's range.
        period: day, week or month: how the range is cut into child runs.
        max_in_flight: child runs started and not yet finished at any time (deployment mode; they run at once).
        deployment: ingest/ingest to run each period on the work pool as a run of that deployment;
            empty runs them in this process as subflows, one after the other.
        experiment: MLflow experiment of the parent run and the nested ingest runs.
        refresh: run every period with items again, whatever the ledger says, and ignore cached ingest results.
        poll_seconds: how often child run states are read (deployment mode).

    Raises:
        RuntimeError: naming the periods whose child run failed (after the others finished); run the
            backfill again to retry only those.
    """
    logger = get_run_logger()
    windows = split_periods(request.start, request.end, period)
    with_items = find_windows(request, period)
    ledger = read_ledger_state(request)
    done = set() if refresh else ledger.done & set(with_items)
    todo = [window for window in windows if window in with_items and window not in done]
    again = {} if refresh else ledger.rerun_reasons(todo)
    logger.info(
        "backfill %s..%s by %s: %d periods, %d with items, %d already ingested, %d to run%s",
        request.start,
        request.end,
        period,
        len(windows),
        len(with_items),
        len(done),
        len(todo),
        " (refresh: the ledger is bypassed)" if refresh else ledger.rerun_summary(todo),
    )
    for window, reason in again.items():
        logger.info("period %s: %s; running it again", window.label, reason)
    tile_ids = request_tiles(request) if todo else []
    with stage_run("backfill", request, experiment=experiment) as parent:
        parent_id = parent.info.run_id
        if deployment:
            ran = _run_children_on_deployment(
                request,
                todo,
                tile_ids,
                deployment=deployment,
                max_in_flight=max_in_flight,
                parent_run_id=parent_id,
                experiment=experiment,
                refresh=refresh,
                poll_seconds=poll_seconds,
            )
        else:
            ran = _run_children_in_process(
                request, todo, tile_ids, parent_run_id=parent_id, experiment=experiment, refresh=refresh
            )
    by_window = {(outcome.start, outcome.end): outcome for outcome in ran}
    outcomes = []
    for window in windows:
        if (window.start, window.end) in by_window:
            outcomes.append(by_window[(window.start, window.end)])
        elif window in done:
            outcomes.append(WindowOutcome(start=window.start, end=window.end, status="skipped"))
        else:
            outcomes.append(WindowOutcome(start=window.start, end=window.end, status="empty"))
    result = BackfillResult(run_id=parent_id, windows=outcomes, warning=incomplete_warning(outcomes))
    failed = [outcome for outcome in outcomes if outcome.status == "failed"]
    if failed:
        labels = ", ".join(f"{o.start}..{o.end}" for o in failed)
        raise RuntimeError(f"backfill: {len(failed)} period(s) failed: {labels}; run the backfill again to retry them")
    return completed_with_warning(result)


def scheduled_window(days_back: int, timezone: str) -> DateWindow:
    """The day(s) before this run's scheduled start, in ``timezone`` (now, outside a flow run)."""
    scheduled = flow_run.scheduled_start_time.astimezone(ZoneInfo(timezone))
    last = scheduled.date() - timedelta(days=1)
    return DateWindow(last - timedelta(days=days_back - 1), last)


@flow(name="daily-ingest")
def daily_ingest_flow(
    stac: str,
    bbox: tuple[float, float, float, float],
    collections: list[CollectionName] = ["sentinel-2-l2a", "sentinel-1-rtc"],  # noqa: B006 (a form default)
    cube: str | None = None,
    timezone: str = "UTC",
    days_back: Annotated[int, Field(ge=1, le=31)] = 1,
    max_cloud: Annotated[float, Field(ge=0, le=100)] = 80.0,
    experiment: str | None = None,
    refresh: bool = False,
) -> BackfillResult:
    """Ingest the day before the scheduled time (or the ``days_back`` days before it) over ``bbox``.

    The window comes from the run's scheduled start time, not the clock, so a run that starts late or is
    re-run later still ingests the day it was scheduled for; already-ingested days are skipped.
    """
    window = scheduled_window(days_back, timezone)
    get_run_logger().info("scheduled for %s (%s): ingesting %s", flow_run.scheduled_start_time, timezone, window.label)
    request = IngestConfig(
        stac=stac,
        bbox=bbox,
        collections=collections,
        start=window.start,
        end=window.end,
        max_cloud=max_cloud,
        cube=cube or str(get_settings().data_dir / "cube.zarr"),
    )
    return completed_with_warning(backfill_flow(request, period="day", experiment=experiment, refresh=refresh))
