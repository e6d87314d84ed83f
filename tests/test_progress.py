"""One progress interface for every stage: the work reports, whoever shows it listens."""

from __future__ import annotations

import logging

import pytest

from softcon import progress


def test_listeners_get_reports_and_links_only_while_listening() -> None:
    seen: list[tuple] = []
    progress.report("tiles", 0, 3)  # nobody listens: nothing happens
    with progress.listen(lambda *args: seen.append(("progress", *args)), lambda *args: seen.append(("link", *args))):
        progress.report("tiles", 1, 3)
        progress.announce("dask.dashboard", "http://127.0.0.1:8787/status")
    progress.report("tiles", 2, 3)
    assert seen == [("progress", "tiles", 1, 3), ("link", "dask.dashboard", "http://127.0.0.1:8787/status")]


def test_a_failing_listener_never_fails_the_stage(caplog: pytest.LogCaptureFixture) -> None:
    def broken(step: str, done: int, total: int) -> None:
        raise RuntimeError("terminal closed")

    seen: list[int] = []
    with (
        caplog.at_level(logging.ERROR, logger="softcon.progress"),
        progress.listen(broken),
        progress.listen(lambda step, done, total: seen.append(done)),
    ):
        progress.report("blocks", 1, 2)
    assert seen == [1]
    assert "a progress listener failed on blocks 1/2" in caplog.text


def test_under_torchrun_only_rank_0_runs_the_flow(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other ranks run the training loop alone; rank 0 runs the flow that records it (cache bypassed)."""
    from softcon.config import TrainConfig
    from softcon.flows import train as train_flow_module

    calls: list[str] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(train_flow_module, "run_training", lambda config: calls.append("loop"))
    monkeypatch.setattr(
        train_flow_module, "train_flow", lambda config, refresh: calls.append(f"flow refresh={refresh}")
    )
    config = TrainConfig(store=str(tmp_path / "store.zarr"), out=str(tmp_path / "checkpoints"))
    assert train_flow_module.train_on_this_rank(config) is None
    monkeypatch.setenv("RANK", "0")
    train_flow_module.train_on_this_rank(config)
    assert calls == ["loop", "flow refresh=True"]


def test_the_flow_log_gets_about_every_tenth_of_a_step_and_not_the_quiet_ones() -> None:
    from softcon.flows.tracking import ProgressLog

    class Lines(logging.Logger):
        def __init__(self) -> None:
            super().__init__("lines")
            self.lines: list[str] = []

        def info(self, message: object, *args: object, **kwargs: object) -> None:  # type: ignore[override]
            self.lines.append(str(message) % args)

    logger = Lines()
    log = ProgressLog("run", logger, frozenset({"steps"}))
    for done in range(1, 101):
        log.on_progress("blocks", done, 100)
        log.on_progress("steps", done, 100)
    assert logger.lines == [f"blocks {n}/100" for n in range(10, 101, 10)]
