"""Backfill: periods, the cube's ledger of ingested periods, the in-process backfill flow, the daily window."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import xarray as xr
import zarr

from softcon.config import IngestConfig
from tasks.backfill import (
    DateWindow,
    done_windows,
    read_ledger,
    record_window,
    split_periods,
    window_config,
    windows_with_items,
)
from tasks.sample_data import SampleData, write_sample_data

# The generator's 4 S2 dates: 06-01, 06-06 (eo:cloud_cover over 80 %, filtered), 06-11, 06-16.
INGESTED_DAYS = [date(2024, 6, 1), date(2024, 6, 11), date(2024, 6, 16)]


@pytest.mark.parametrize(
    ("period", "expected"),
    [
        ("day", [("2024-01-30", "2024-01-30"), ("2024-01-31", "2024-01-31"), ("2024-02-01", "2024-02-01")]),
        ("week", [("2024-01-30", "2024-02-01")]),
        ("month", [("2024-01-30", "2024-01-31"), ("2024-02-01", "2024-02-01")]),
    ],
    ids=["day", "week", "month"],
)
def test_split_periods_covers_the_range_exactly(period: str, expected: list[tuple[str, str]]) -> None:
    windows = split_periods(date(2024, 1, 30), date(2024, 2, 1), period)
    assert [(w.start.isoformat(), w.end.isoformat()) for w in windows] == expected


def test_weeks_start_on_monday_and_months_end_on_their_last_day() -> None:
    weeks = split_periods(date(2024, 2, 1), date(2024, 2, 29), "week")
    assert all(w.start.weekday() == 0 for w in weeks[1:]) and all(w.end.weekday() == 6 for w in weeks[:-1])
    assert weeks[-1].end == date(2024, 2, 29)  # leap day, clipped to the range
    months = split_periods(date(2023, 12, 15), date(2024, 3, 2), "month")
    assert [w.end for w in months] == [date(2023, 12, 31), date(2024, 1, 31), date(2024, 2, 29), date(2024, 3, 2)]


def test_split_periods_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="period 'year' is not one of day, week, month"):
        split_periods(date(2024, 1, 1), date(2024, 1, 2), "year")
    with pytest.raises(ValueError, match="before start"):
        split_periods(date(2024, 1, 2), date(2024, 1, 1), "day")


def test_windows_with_items_counts_by_utc_day() -> None:
    items = [
        {"properties": {"datetime": "2024-06-01T10:17:31Z"}},
        {"properties": {"datetime": "2024-06-01T23:59:59Z"}},
        {"properties": {"start_datetime": "2024-06-03T00:00:00+00:00", "datetime": None}},
    ]
    windows = split_periods(date(2024, 6, 1), date(2024, 6, 4), "day")
    assert windows_with_items(windows, items) == {
        DateWindow(date(2024, 6, 1), date(2024, 6, 1)): 2,
        DateWindow(date(2024, 6, 3), date(2024, 6, 3)): 1,
    }


def _request(cube: Path, **overrides: object) -> IngestConfig:
    values: dict[str, object] = {
        "stac": "items.json", "bbox": (11.0, 46.4, 11.1, 46.5), "start": date(2024, 6, 1),
        "end": date(2024, 6, 30), "cube": str(cube),
    }  # fmt: skip
    return IngestConfig(**(values | overrides))  # type: ignore[arg-type]


def test_ledger_records_windows_per_request_and_survives_reopening(tmp_path: Path) -> None:
    cube = tmp_path / "cube.zarr"
    request = _request(cube)
    assert read_ledger(str(cube)) == [] and done_windows(request) == set()
    zarr.open_group(str(cube), mode="w", zarr_format=3).require_group("tiles")
    june_1 = DateWindow(date(2024, 6, 1), date(2024, 6, 1))
    record_window(request, june_1, mlflow_run_id="abc")
    record_window(request, june_1, mlflow_run_id="def")  # recorded again: replaced, not duplicated
    assert done_windows(request) == {june_1}
    assert [entry["mlflow_run_id"] for entry in read_ledger(str(cube))] == ["def"]
    other_area = _request(cube, bbox=(12.0, 46.4, 12.1, 46.5))
    assert done_windows(other_area) == set()
    assert window_config(request, june_1).start == window_config(request, june_1).end == date(2024, 6, 1)


def test_scheduled_window_is_the_day_before_the_scheduled_time_in_the_schedule_timezone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import flows.backfill as backfill

    # 23:30 UTC on June 10 is already June 11 in Rome: the run scheduled then ingests June 10, not June 9.
    scheduled = datetime(2024, 6, 10, 23, 30, tzinfo=UTC)
    monkeypatch.setattr(backfill, "flow_run", SimpleNamespace(scheduled_start_time=scheduled))
    assert backfill.scheduled_window(1, "Europe/Rome") == DateWindow(date(2024, 6, 10), date(2024, 6, 10))
    assert backfill.scheduled_window(1, "UTC") == DateWindow(date(2024, 6, 9), date(2024, 6, 9))
    assert backfill.scheduled_window(3, "UTC") == DateWindow(date(2024, 6, 7), date(2024, 6, 9))


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory: pytest.TempPathFactory) -> SampleData:
    return write_sample_data(tmp_path_factory.mktemp("backfill-sample"), tiles=1, tile_size=64, dates=4)


def _cube_days(cube: Path) -> list[date]:
    tile = next(iter(zarr.open_group(str(cube), mode="r")["tiles"].group_keys()))
    times = xr.open_zarr(str(cube), group=f"tiles/{tile}", consolidated=False).time.values
    return sorted(date.fromisoformat(str(t)[:10]) for t in times)


@pytest.mark.slow
def test_backfill_runs_one_child_per_period_with_items_and_resumes(small_sample: SampleData, tmp_path: Path) -> None:
    from flows.backfill import backfill_flow

    cube = tmp_path / "cube.zarr"
    request = IngestConfig(
        stac=str(small_sample.items_file), collections=["sentinel-2-l2a"], bbox=small_sample.bbox,
        start=small_sample.start, end=small_sample.end, tile_size=64, cube=str(cube),
    )  # fmt: skip
    # A crash after the first period: the ledger holds it (as a killed backfill leaves it), the cube does not.
    first = DateWindow(INGESTED_DAYS[0], INGESTED_DAYS[0])
    zarr.open_group(str(cube), mode="w", zarr_format=3).require_group("tiles")
    record_window(request, first, mlflow_run_id="from-the-crashed-run")

    result = backfill_flow(request, period="day", experiment="backfill-test")
    statuses = {w.start: w.status for w in result.windows}
    assert len(result.windows) == (small_sample.end - small_sample.start).days + 1
    assert statuses[INGESTED_DAYS[0]] == "skipped"
    assert [d for d, s in statuses.items() if s == "ingested"] == INGESTED_DAYS[1:]
    assert statuses[date(2024, 6, 6)] == "empty"  # its only item is over the cloud limit
    assert _cube_days(cube) == INGESTED_DAYS[1:]
    assert {w.start for w in done_windows(request)} == set(INGESTED_DAYS)

    client = mlflow.MlflowClient()
    children = client.search_runs(
        [client.get_run(result.run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'",
    )
    assert sorted(run.data.params["start"] for run in children) == [d.isoformat() for d in INGESTED_DAYS[1:]]
    assert all(run.data.tags["softcon.stage"] == "ingest" for run in children)

    again = backfill_flow(request, period="day", experiment="backfill-test")
    assert again.count("ingested") == 0 and again.count("skipped") == 3
    assert _cube_days(cube) == INGESTED_DAYS[1:]
