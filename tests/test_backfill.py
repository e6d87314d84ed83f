"""Backfill: periods, the cube's ledger of ingested periods, the in-process backfill flow, the daily window."""

from __future__ import annotations

import json
import logging
import shutil
from datetime import UTC, date, datetime
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import xarray as xr
import zarr
from data_fixtures import widened

from softcon.config import IngestConfig
from softcon.tasks.backfill import (
    LEDGER_ATTR,
    DateWindow,
    done_windows,
    read_ledger,
    read_ledger_state,
    read_period_tile_dates,
    read_tile_dates,
    record_window,
    request_key,
    request_parameters,
    split_periods,
    unfinished_reason,
    window_config,
    windows_with_items,
)
from softcon.tasks.ingest import run_ingest
from softcon.tasks.sample_data import SampleData, write_sample_data

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
    import softcon.flows.backfill as backfill

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
    from softcon.flows.backfill import backfill_flow

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


# ------------------------------------------------------------------ the ledger never claims more than the cube holds

JUNE = DateWindow(date(2024, 6, 1), date(2024, 6, 30))
"""One month period: one child run over the whole sample (S2 on 06-01, 06-11, 06-16; 06-06 is over max_cloud)."""


def _sample_request(sample: SampleData, cube: Path, **overrides: object) -> IngestConfig:
    values: dict[str, object] = {
        "stac": str(sample.items_file), "collections": ["sentinel-2-l2a"], "bbox": sample.bbox,
        "start": JUNE.start, "end": JUNE.end, "tile_size": 64, "cube": str(cube),
    }  # fmt: skip
    return IngestConfig(**(values | overrides))  # type: ignore[arg-type]


# What each parameter of the key changes in what is written (the area has its own test).
KEY_CHANGES: dict[str, object] = {
    "stac": "https://earth-search.aws.element84.com/v1",  # other items
    "max_cloud": 100.0,  # admits the items over 80 %
    "max_tile_cloud": 1.0,  # writes the tile-dates a period skipped as cloudy
    "max_tile_nodata": 1.0,  # ... or as empty
    "epsg": 32633,  # another grid
    "tile_size": 256,  # the default is 1056
    "resolution": 20.0,
}


@pytest.mark.parametrize(("field", "value"), KEY_CHANGES.items(), ids=list(KEY_CHANGES))
def test_request_key_changes_with_each_parameter_that_changes_what_is_written(
    field: str, value: object, tmp_path: Path
) -> None:
    request = _request(tmp_path / "cube.zarr")
    assert request_key(request.model_copy(update={field: value})) != request_key(request)


def test_request_key_leaves_out_only_what_does_not_change_what_is_written(tmp_path: Path) -> None:
    request = _request(tmp_path / "cube.zarr")
    left_out: dict[str, object] = {
        "start": date(2024, 6, 2), "end": date(2024, 6, 3), "cube": str(tmp_path / "moved.zarr"),
        "sign": "none", "headers": {"Authorization": "MY_TOKEN"}, "retries": 9, "retry_delay": 0.0,
        "read_threads": 8, "n_workers": 4, "dask_address": "tcp://127.0.0.1:8786",
    }  # fmt: skip
    for field, value in left_out.items():
        assert request_key(request.model_copy(update={field: value})) == request_key(request), field
    # Every config field is decided: in the key (the area by its content) or left out with a reason.
    in_key = {"area" if name == "area_sha256" else name for name in request_parameters(request)}
    assert in_key | set(left_out) == set(IngestConfig.model_fields)
    # Nor does the order collections are searched in.
    assert request_key(request.model_copy(update={"collections": ["sentinel-1-rtc", "sentinel-2-l2a"]})) == (
        request_key(request.model_copy(update={"collections": ["sentinel-2-l2a", "sentinel-1-rtc"]}))
    )


def _polygon_file(path: Path, west: float) -> Path:
    ring = [[west, 46.4], [west + 0.1, 46.4], [west + 0.1, 46.5], [west, 46.5], [west, 46.4]]
    feature = {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    return path


def test_request_key_holds_the_area_file_content_not_its_path(tmp_path: Path) -> None:
    area = _polygon_file(tmp_path / "area.geojson", 11.0)
    request = _request(tmp_path / "cube.zarr", bbox=None, area=str(area))
    moved = shutil.copy(area, tmp_path / "same-area.geojson")
    assert request_key(request.model_copy(update={"area": str(moved)})) == request_key(request)
    key = request_key(request)
    _polygon_file(area, 11.05)  # the same file, redrawn
    assert request_key(request) != key


ONE_DATE = {"t": {"time": ["2024-06-01"]}}
"""What the cube holds of a period: one tile ``t``, one Sentinel-2 date."""


@pytest.mark.parametrize(
    ("metrics", "held", "reason"),
    [
        pytest.param({"tile_dates_written": 1, "tile_dates_skipped_cloud": 1}, ONE_DATE, None, id="wrote-1-skipped-1"),
        pytest.param({"tile_dates_skipped_exists": 1}, ONE_DATE, None, id="found-it-present"),
        pytest.param(
            {"tile_dates_written": 0, "tile_dates_skipped_nodata": 3}, {},
            "it wrote no tile-date and skipped 3 (3 as nodata)", id="all-nodata",
        ),
        pytest.param(
            {"tile_dates_skipped_cloud": 1}, {}, "it wrote no tile-date and skipped 1 (1 as cloud)", id="all-cloudy"
        ),
        pytest.param({"tile_dates_written": 1, "items_failed": 1}, ONE_DATE, "1 item(s) failed", id="failed-items"),
        pytest.param(
            {"tile_dates_written": 2}, ONE_DATE, "the cube holds 1 of its tile-dates, the ingest reported 2",
            id="cube-lacks-some",
        ),
    ],
)  # fmt: skip
def test_a_completed_period_is_done_only_when_the_cube_holds_what_it_reported(
    metrics: dict[str, float], held: dict[str, dict[str, list[str]]], reason: str | None
) -> None:
    assert unfinished_reason(metrics, held) == reason


def test_a_period_with_nothing_to_write_is_recorded_as_done(tmp_path: Path) -> None:
    # No usable item reached a tile: nothing written, nothing skipped, nothing failed.
    assert unfinished_reason({"items_found": 1, "tile_dates_written": 0, "tile_dates_skipped_exists": 0}, {}) is None
    request = _request(tmp_path / "cube.zarr")
    record_window(request, JUNE, tile_dates={})
    assert done_windows(request) == {JUNE}  # though the cube holds no tile at all


@pytest.fixture(scope="module")
def ingested_cube(small_sample: SampleData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample's June ingested at 64 px tiles, Sentinel-2 and -1, without a ledger (tests copy it)."""
    cube = tmp_path_factory.mktemp("ingested") / "cube.zarr"
    request = _sample_request(small_sample, cube, collections=["sentinel-2-l2a", "sentinel-1-rtc"])
    run_ingest(request)
    return cube


def _copy(cube: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(cube, tmp_path / "cube.zarr", ignore=shutil.ignore_patterns(".ingest-locks")))


def _tile_id(cube: Path) -> str:
    return next(iter(zarr.open_group(str(cube), mode="r")["tiles"].group_keys()))


def test_read_tile_dates_gives_the_utc_dates_of_each_time_coordinate_in_a_window(ingested_cube: Path) -> None:
    tile = _tile_id(ingested_cube)
    first_week = DateWindow(date(2024, 6, 1), date(2024, 6, 7))
    assert read_tile_dates(str(ingested_cube), [tile, "32632_0000000_0000000"], first_week) == {
        tile: {"time": ["2024-06-01"], "time_s1": ["2024-06-02", "2024-06-07"]}  # S2 06-06 is over max_cloud
    }
    assert read_tile_dates(str(ingested_cube), [tile], DateWindow(date(2024, 7, 1), date(2024, 7, 31))) == {}


def test_a_period_claims_only_the_time_coordinates_of_its_collections(
    ingested_cube: Path, small_sample: SampleData
) -> None:
    s2_only = _sample_request(small_sample, ingested_cube)
    tile = _tile_id(ingested_cube)
    assert read_period_tile_dates(s2_only, [tile], JUNE) == {tile: {"time": ["2024-06-01", "2024-06-11", "2024-06-16"]}}


@pytest.mark.parametrize("loss", ["tile-deleted", "tile-rewritten-without-them"])
def test_a_recorded_period_whose_tile_dates_left_the_cube_is_not_done(
    loss: str, ingested_cube: Path, small_sample: SampleData, tmp_path: Path
) -> None:
    cube = _copy(ingested_cube, tmp_path)
    request = _sample_request(small_sample, cube)
    tile = _tile_id(cube)
    record_window(request, JUNE, tile_dates={tile: {"time": ["2024-06-01", "2024-06-11", "2024-06-16"]}})
    assert done_windows(request) == {JUNE}
    del zarr.open_group(str(cube), mode="a")[f"tiles/{tile}"]
    if loss == "tile-rewritten-without-them":  # e.g. the cube replaced by one ingested over fewer dates
        run_ingest(request.model_copy(update={"start": date(2024, 6, 10)}))
    assert done_windows(request) == set()
    lost = "2024-06-01, 2024-06-11, 2024-06-16" if loss == "tile-deleted" else "2024-06-01"
    assert read_ledger_state(request).rerun_reason(JUNE) == (
        f"recorded but its tile-dates are gone from the cube ({tile} time {lost})"
    )


def test_a_period_recorded_by_the_old_ledger_is_not_done(tmp_path: Path) -> None:
    request = _request(tmp_path / "cube.zarr")
    old_key = f"11.000000,46.400000,11.100000,46.500000|sentinel-1-rtc,sentinel-2-l2a|{','.join(request.bands)}"
    root = zarr.open_group(str(tmp_path / "cube.zarr"), mode="w", zarr_format=3)
    root.attrs[LEDGER_ATTR] = [{"request": old_key, "start": "2024-06-01", "end": "2024-06-30"}]
    assert done_windows(request) == set()
    assert read_ledger_state(request).rerun_reason(JUNE) == (
        "recorded under other parameters (a key from before the grid and the thresholds were part of it)"
    )


@pytest.mark.slow
def test_backfill_over_an_area_the_scenes_miss_records_nothing_and_the_form_defaults_write(
    small_sample: SampleData, tmp_path: Path
) -> None:
    from softcon.flows.backfill import backfill_flow

    # An area many times the scenes: every tile-date is mostly nodata over it, so nothing is written or recorded.
    cube = tmp_path / "cube.zarr"
    wide = widened(small_sample.bbox, 3)
    wrong = _sample_request(small_sample, cube, bbox=wide, tile_size=1056)
    result = backfill_flow(wrong, period="month", experiment="backfill-test")
    (period,) = result.windows
    assert (period.status, period.tile_dates_written) == ("incomplete", 0)
    assert period.reason == "it wrote no tile-date and skipped 3 (3 as nodata)"
    assert read_ledger(str(cube)) == []
    # Visible as such: the warning is the Prefect run's state message and an MLflow tag on the backfill's run.
    assert result.warning is not None and result.warning.startswith("1 of the 1 periods run wrote nothing")
    assert "2024-06-01..2024-06-30: it wrote no tile-date and skipped 3 (3 as nodata)" in result.warning
    assert mlflow.MlflowClient().get_run(result.run_id).data.tags["softcon.warning"] == result.warning

    # The UI form's defaults (1,056 px tiles) over the sample scenes (64 px): the user met "green, wrote nothing";
    # nodata is measured over the area on each tile, so the scenes' dates are written.
    right = _sample_request(small_sample, cube, tile_size=IngestConfig.model_fields["tile_size"].default)
    (period,) = backfill_flow(right, period="month", experiment="backfill-test").windows
    assert (period.status, period.tile_dates_written) == ("ingested", 3)
    assert _cube_days(cube) == INGESTED_DAYS
    assert done_windows(right) == {JUNE} and done_windows(wrong) == set()


@pytest.mark.slow
def test_backfill_runs_again_a_period_recorded_under_other_parameters(
    small_sample: SampleData, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from softcon.flows.backfill import backfill_flow

    cube = tmp_path / "cube.zarr"
    request = _sample_request(small_sample, cube)
    record_window(request.model_copy(update={"tile_size": 1056}), JUNE)  # as the old ledger recorded the UI's run
    with caplog.at_level(logging.INFO):
        (period,) = backfill_flow(request, period="month", experiment="backfill-test").windows
    assert (period.status, period.tile_dates_written) == ("ingested", 3)
    assert "1 already ingested" not in caplog.text and "1 to run (1 recorded under other parameters)" in caplog.text
    assert "period 2024-06-01..2024-06-30: recorded under other parameters (tile_size 1056, now 64)" in caplog.text
    assert done_windows(request) == {JUNE}


@pytest.fixture(scope="module")
def backfilled_cube(small_sample: SampleData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cube the June backfill wrote and recorded (tests copy it: the ledger travels with the cube)."""
    from softcon.flows.backfill import backfill_flow

    cube = tmp_path_factory.mktemp("backfilled") / "cube.zarr"
    backfill_flow(_sample_request(small_sample, cube), period="month", experiment="backfill-test")
    return cube


@pytest.mark.slow
def test_refresh_runs_recorded_periods_again(backfilled_cube: Path, small_sample: SampleData, tmp_path: Path) -> None:
    from softcon.flows.backfill import backfill_flow

    request = _sample_request(small_sample, _copy(backfilled_cube, tmp_path))
    assert done_windows(request) == {JUNE}
    (period,) = backfill_flow(request, period="month", experiment="backfill-test", refresh=True).windows
    assert (period.status, period.tile_dates_written) == ("ingested", 0)  # run again; its dates were all there


@pytest.mark.slow
def test_backfill_runs_again_a_period_whose_tile_was_deleted(
    backfilled_cube: Path, small_sample: SampleData, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from softcon.flows.backfill import backfill_flow

    cube = _copy(backfilled_cube, tmp_path)
    request = _sample_request(small_sample, cube)
    tile = _tile_id(cube)
    shutil.rmtree(cube / "tiles" / tile)
    with caplog.at_level(logging.INFO):
        (period,) = backfill_flow(request, period="month", experiment="backfill-test").windows
    assert (period.status, period.tile_dates_written) == ("ingested", 3)
    assert _cube_days(cube) == INGESTED_DAYS
    assert "1 to run (1 recorded but their tile-dates are gone from the cube)" in caplog.text
    assert f"recorded but its tile-dates are gone from the cube ({tile} time 2024-06-01, 2024-06-11" in caplog.text
    assert done_windows(request) == {JUNE}
