"""The MLflow UI in a real headless Chromium (Debian's, driven by Playwright): what a user sees of
an experiment. Used by tests/test_ui.py, and to take the screenshots in docs/demo/:

  python -m tests.mlflow_ui --tracking-uri sqlite:///mlflow.db --experiment demo \
      --out docs/demo/mlflow-ui.png
"""

import argparse
import os
from pathlib import Path

from mlflow import MlflowClient
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import expect, sync_playwright

from tests.conftest import mlflow_serving

# As this machine's probe starts Chromium: no sandbox as root, no calls to Google's services
# (the network is closed and each refused connection slows the page).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
# For every wait, the page's and expect()'s alike (expect() keeps its own 5 s default otherwise):
# on a loaded CI machine the first runs search can take longer than that.
TIMEOUT_MS = 60_000
# MLflow 3.17 keeps the sidebar's GenAI / Model training choice in the browser (GenAI until a user
# picks the other) and shows a run's page in it whatever the experiment's kind (mlflow#24498):
# the pages are seen as by a user who picked Model training once.
MODEL_TRAINING = ("window.localStorage.setItem('mlflow.workflowType_v1', "
                  "JSON.stringify('machine_learning'))")


def mlflow_ui(tracking_uri: str, log_path: Path):
    """`mlflow ui` on a free loopback port; a context that yields its address."""
    return mlflow_serving("ui", tracking_uri, log_path)


def browse(address: str, tracking_uri: str, experiment: str, table_png: Path,
           run_png: Path | None = None) -> dict:
    """Open the experiment's runs table, then its first run: its metrics, then its memory plot
    artifact. Returns what was seen: run names in the table, metric names on the run page, and
    the plot's size in pixels. Screenshots of the table (and of the run's plot)."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])
    chromium = os.environ.get("HARNESS_TEST_CHROMIUM", "/usr/bin/chromium")
    seen = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 900})
        page.add_init_script(MODEL_TRAINING)
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"{address}/#/experiments/{found.experiment_id}/runs"
                  "?workflowType=machine_learning")
        expect(page.get_by_text(f"{len(runs)} matching runs")).to_be_visible(timeout=TIMEOUT_MS)
        # The count shows before the rows have rendered: wait for each run's row a while.
        seen["table"] = [run.info.run_name for run in runs
                         if _shows(page.get_by_role("link", name=run.info.run_name))]
        # The default columns: what each run trained on (Dataset), and its model (Models).
        seen["datasets"] = page.get_by_text("fixture-train", exact=False).count()
        seen["models"] = page.get_by_role("link", name="adapter").count()
        _close_assistant(page)
        page.screenshot(path=str(table_png))

        # A run that did not end ok says why on its page (its description), and in the table
        # once its Description column is ticked.
        not_ok = [run for run in runs if run.data.tags.get("status") != "ok"]
        if not_ok:
            reason = not_ok[0].data.tags["status_reason"]
            page.get_by_role("button", name="Columns").first.click()
            page.get_by_text("Description", exact=True).first.click()
            page.keyboard.press("Escape")
            seen["why_in_table"] = _shows(page.get_by_text(reason[:40], exact=False))
            page.get_by_role("link", name=not_ok[0].info.run_name).first.click()
            # In the description, and again in the tags.
            seen["why"] = _shows(page.get_by_text(reason[:40], exact=False))
            page.go_back()

        first = runs[0]
        page.get_by_role("link", name=first.info.run_name).first.click()
        metrics_heading = page.get_by_text(f"Metrics ({len(first.data.metrics)})")
        expect(metrics_heading).to_be_visible(timeout=TIMEOUT_MS)
        page.get_by_text("train_loss", exact=True).first.wait_for()  # the table has rendered
        seen["metrics"] = [name for name in first.data.metrics
                           if page.get_by_text(name, exact=True).count()]
        page.get_by_role("tab", name="Artifacts").click()
        page.get_by_text("memory_trace.png", exact=True).click()
        plot = page.get_by_role("img", name="memory_trace.png")
        expect(plot).to_be_visible(timeout=TIMEOUT_MS)
        seen["plot_size"] = plot.evaluate("image => [image.naturalWidth, image.naturalHeight]")
        seen["genai_view"] = page.get_by_text("Evaluation runs").count() > 0
        if run_png is not None:
            _close_assistant(page)
            # The artifact's path is this machine's: masked.
            page.screenshot(path=str(run_png), mask=[page.get_by_text("Path:", exact=False)],
                            mask_color="#eeeeee")
        browser.close()
    return seen


def _shows(locator, timeout_ms: int = 15_000) -> bool:
    """Whether what the locator finds renders within the timeout."""
    try:
        locator.first.wait_for(timeout=timeout_ms)
        return True
    except PlaywrightTimeout:
        return False


def _close_assistant(page) -> None:
    """The UI's assistant panel covers a third of the page; close it where it is open."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="demo")
    parser.add_argument("--out", type=Path, default=Path("docs/demo/mlflow-ui.png"))
    args = parser.parse_args(argv)
    with mlflow_ui(args.tracking_uri, args.out.with_suffix(".log")) as address:
        seen = browse(address, args.tracking_uri, args.experiment, args.out,
                      args.out.with_name(args.out.stem + "-run.png"))
    args.out.with_suffix(".log").unlink()
    print(f"{len(seen['table'])} runs in the table, {len(seen['metrics'])} metrics on the first "
          f"run's page, memory plot {seen['plot_size']}; screenshots beside {args.out}")


if __name__ == "__main__":
    main()
