"""Take the README's screenshots of the Prefect UI and the MLflow UI with headless Chromium.

    apt-get install -y chromium            # Debian; or set CHROMIUM=/path/to/chrome
    .venv/bin/pip install playwright       # drives that Chromium (no `playwright install`: no browser download)
    .venv/bin/python docs/screenshots.py   # a few minutes: servers, a tiny demo pipeline, two screenshots

It starts ``softcon serve``'s servers in a temporary project folder, registers the deployments, runs a tiny
demo pipeline through the servers (so MLflow holds a parent run with the five stage runs nested under it),
then saves ``docs/img/prefect-deployment-form.png`` (the backfill deployment's custom-run parameter form in the
Prefect UI a fresh browser opens, V2, reached by clicking as a user does)
``docs/img/mlflow-nested-runs.png`` (the pipeline's runs in MLflow: Playwright clicks the parent run's
expander so its five stage runs show nested under it, with the datasets each read and wrote in the Dataset column;
MLflow keeps that state in the browser, not the URL) and ``docs/img/mlflow-model-version.png`` (the registered
encoder's version with its ``best`` alias and the evaluation's ``eval.*`` tags).
"""

from __future__ import annotations

import argparse
import json
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


BROWSER_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--hide-scrollbars"]  # fmt: skip


def screenshot_run_form(
    ui_url: str, out: Path, request: dict[str, str], *, width: int = 1400, height: int = 1150
) -> None:
    """Walk to the backfill deployment's custom-run form as a user does in the Prefect UI a fresh browser gets
    (V2: Deployments → backfill → Run → Custom run), fill in the request, and screenshot it once it is still."""
    from playwright.sync_api import sync_playwright

    out.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=BROWSER_FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(f"{ui_url}/")
            page.get_by_role("link", name="Deployments").first.click()
            page.get_by_text("backfill", exact=True).first.click()
            page.get_by_role("button", name="Run").first.click()
            page.get_by_text("Custom run").first.click()
            page.get_by_text("Parameters", exact=True).wait_for(timeout=60_000)
            page.locator("textarea").first.fill(request["stac"])  # request.stac
            string_tab = page.get_by_role("tab", name="W,S,E,N").first  # request.bbox as one "W,S,E,N" string
            string_tab.click()
            content = page.locator(f"[id='{string_tab.get_attribute('aria-controls')}']")
            content.locator("input, textarea").first.fill(request["bbox"])
            page.mouse.click(width - 5, 5)  # leave the field, as a user tabbing on would
            page.wait_for_load_state("networkidle")
            page.wait_for_timeout(1500)  # transitions finished: no half-faded frame
            page.screenshot(path=str(out))
        finally:
            browser.close()
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB): the backfill custom-run form")


def screenshot_nested_runs(url: str, out: Path, children: list[str], *, width: int = 1400, height: int = 700) -> None:
    """Open MLflow's runs table at ``url``, expand the ``pipeline`` parent run, wait for ``children``, screenshot."""
    from playwright.sync_api import sync_playwright

    out.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=BROWSER_FLAGS)
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


def screenshot_model_version(url: str, out: Path, *, width: int = 1400, height: int = 900) -> None:
    """Open a registered model version's page in MLflow's UI and screenshot it once its aliases show."""
    from playwright.sync_api import sync_playwright

    out.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=BROWSER_FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url)
            page.get_by_text("@ best").first.wait_for(timeout=120_000)
            assistant_close = page.get_by_role("button", name="Close")
            if assistant_close.count():
                assistant_close.first.click()
            page.wait_for_timeout(1000)
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB) from {url}")


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

            items = home / "sample" / "items.json"  # what the demo wrote; its area, as the README's example fills in
            boxes = [feature["bbox"] for feature in json.loads(items.read_text())["features"]]
            west, south = min(b[0] for b in boxes), min(b[1] for b in boxes)
            east, north = max(b[2] for b in boxes), max(b[3] for b in boxes)
            screenshot_run_form(
                services.prefect_ui_url,
                args.out / "prefect-deployment-form.png",
                {"stac": str(items), "bbox": f"{west:.4f},{south:.4f},{east:.4f},{north:.4f}"},
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
            best = client.get_model_version_by_alias("softcon-encoder", "best")
            screenshot_model_version(
                f"{services.mlflow_url}/#/models/softcon-encoder/versions/{best.version}",
                args.out / "mlflow-model-version.png",
            )
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
