"""Take the README's screenshots of the Prefect UI and the MLflow UI with headless Chromium.

    apt-get install -y chromium            # Debian; or set CHROMIUM=/path/to/chrome
    .venv/bin/pip install playwright       # drives that Chromium (no `playwright install`: no browser download)
    .venv/bin/python docs/screenshots.py   # a few minutes: servers, a tiny demo pipeline, two screenshots

It starts ``softcon serve``'s servers in a temporary project folder, registers the deployments, runs a tiny
demo pipeline through the servers (so MLflow holds a parent run with the five stage runs nested under it),
then saves ``docs/img/prefect-deployment-form.png`` (the backfill deployment's custom-run parameter form)
and ``docs/img/mlflow-nested-runs.png`` (the pipeline's runs in MLflow: Playwright clicks the parent run's
expander so its five stage runs show nested under it; MLflow keeps that state in the browser, not the URL).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from softcon.serve import deploy, serve  # noqa: E402  (after the path insert, for a plain `python docs/...`)

IMAGES = ROOT / "docs" / "img"


def chromium() -> str:
    """The Chromium binary: $CHROMIUM, else chromium / chromium-browser / google-chrome on PATH."""
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate) or candidate
    raise SystemExit("no Chromium found: apt-get install -y chromium, or set CHROMIUM=/path/to/chrome")


def screenshot(url: str, out: Path, *, width: int = 1400, height: int = 900, wait_ms: int = 20000) -> None:
    """Headless Chromium renders ``url`` (a single-page app: give its scripts ``wait_ms`` of virtual time)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [
        chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        f"--window-size={width},{height}", f"--virtual-time-budget={wait_ms}", f"--screenshot={out}", url,
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=180)
    if not out.is_file() or out.stat().st_size < 10_000:
        raise SystemExit(f"Chromium wrote no useful screenshot of {url} to {out}")
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB) from {url}")


def screenshot_nested_runs(url: str, out: Path, children: list[str], *, width: int = 1400, height: int = 700) -> None:
    """Open MLflow's runs table at ``url``, expand the ``pipeline`` parent run, wait for ``children``, screenshot."""
    from playwright.sync_api import sync_playwright

    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run", "--hide-scrollbars"]  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=flags)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url)
            parent = page.get_by_role("link", name="pipeline", exact=True)
            parent.wait_for(timeout=120_000)
            # The [+] expander is the button in the parent's run-name cell.
            page.locator("[role=gridcell]", has=parent).locator("button").first.click()
            for name in children:
                page.get_by_role("link", name=name, exact=True).wait_for(timeout=60_000)
            assistant_close = page.get_by_role("button", name="Close")  # MLflow 3's assistant side panel
            if assistant_close.count():
                assistant_close.first.click()
            page.mouse.click(width - 5, height - 5)  # drop the focus ring from the clicked cell
            page.wait_for_timeout(1000)
            page.screenshot(path=str(out))
        finally:
            browser.close()
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB) from {url}, {len(children)} nested runs expanded")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=IMAGES, help="folder for the PNG files")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="softcon-screenshots-"))
    try:
        with serve(home) as services:
            deploy(services.prefect_api_url, env=services.env, names=["backfill", "pipeline"])
            demo = [sys.executable, "-m", "softcon", "demo", "--tiles", "2", "--tile-size", "128", "--dates", "3"]
            env = services.env | {"SOFTCON_TRAIN__BATCH_SIZE": "16", "SOFTCON_EVALUATE__PROBE_EPOCHS": "10"}
            subprocess.run([*demo, "--steps", "5"], env=env, check=True, timeout=1800)

            from mlflow import MlflowClient
            from prefect.client.orchestration import get_client
            from prefect.settings import PREFECT_API_URL, temporary_settings

            with temporary_settings({PREFECT_API_URL: services.prefect_api_url}), get_client(sync_client=True) as c:
                deployment = c.read_deployment_by_name("backfill/backfill")
            screenshot(
                f"{services.prefect_ui_url}/deployments/deployment/{deployment.id}/run",
                args.out / "prefect-deployment-form.png",
            )
            client = MlflowClient(services.mlflow_url)
            experiment = client.get_experiment_by_name("softcon-demo")
            parent = client.search_runs([experiment.experiment_id], "tags.`softcon.stage` = 'pipeline'")[0]
            # The stage runs nested under the pipeline's parent run (the runs table, filtered on the parent).
            search = quote(f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
            screenshot_nested_runs(
                f"{services.mlflow_url}/#/experiments/{experiment.experiment_id}/runs?searchFilter={search}",
                args.out / "mlflow-nested-runs.png",
                ["ingest", "labels", "preprocess", "train", "evaluate"],
            )
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
