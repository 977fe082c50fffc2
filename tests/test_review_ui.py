"""Reviewing a sanitized model in the real MLflow UI, in a real headless browser. A real `mlflow server` (artifacts on a
moto S3 API) gets a BadNets model sanitized with its known trigger (fast on two cores; trigger-free mode is what
tests/test_demo.py runs), through the same steps the Prefect flow composes (no Prefect here: tests/test_flows.py
covers the flows). Chromium from the Debian package (`/usr/bin/chromium`, installed by scripts/setup.sh), driven by
Playwright, opens the run page and the model version page, checks that the before/after metrics and the alias
`sanitized` are on screen, and saves screenshots (to GRADPRUNE_SCREENSHOT_DIR too when it is set; README's picture
comes from there). Without the browser the test fails under CI=true and skips elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient
from services import registry_stack

from gradprune_mlflow import lab
from gradprune_mlflow.config import SanitizeConfig
from gradprune_mlflow.data.expectations import Checks
from gradprune_mlflow.registry import job as steps
from gradprune_mlflow.registry import log as runlog
from gradprune_mlflow.registry import tags as T
from gradprune_mlflow.registry.pending import set_model_inputs
from gradprune_mlflow.registry.source import register_source_model
from gradprune_mlflow.report.summary import pct

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CHROMIUM = "/usr/bin/chromium"
MODEL = "review-cnn"
CONFIG = {"finetune_epochs": 3}
# The MLflow UI is a React app that loads its data after the page: wait generously on a loaded two-core machine.
WAIT_MS = 120_000
README_SHOTS = ("review-run.png", "review-version.png")  # copied to GRADPRUNE_SCREENSHOT_DIR when it is set


def _browser_or_stop() -> None:
    problem = None
    if not os.access(CHROMIUM, os.X_OK):
        problem = f"{CHROMIUM} is missing; run scripts/setup.sh (it installs the Debian package chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "playwright is not installed; run scripts/setup.sh (pip install -e '.[test]')"
    if problem is None:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(problem)
    pytest.skip(problem)


def sanitize_version(name: str, version: str, config: dict) -> dict:
    """The steps of gradprune_flows/sanitize.py in a row, for a test without Prefect; returns the outcome dict."""
    job, held = steps.claim(name, version)
    run_id = steps.start(job, held, SanitizeConfig().with_overrides(**config))
    folder = steps.fetch(job.clean_data)
    validation = steps.validate(folder, job.clean_data, run_id, Checks())
    source = steps.load_model(name, version)
    inputs = steps.load_inputs(job, folder, run_id)
    result = steps.run_defense(source, inputs, SanitizeConfig().with_overrides(**config))
    steps.log(run_id, result, inputs, job=job, validation=validation)
    new = steps.register(held, run_id, result, source, inputs)
    return steps.succeed(job, held, run_id, result, new).to_dict()


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory, badnets_cnn, clean_set_dir):
    _browser_or_stop()
    work = tmp_path_factory.mktemp("review")
    trigger = work / "badnets.json"
    trigger.write_text(json.dumps(lab.attack_trigger("badnets").spec()))
    with registry_stack(work / "mlflow") as stack:
        client = MlflowClient()
        version = register_source_model(badnets_cnn, MODEL, input_shape=(1, 28, 28))
        set_model_inputs(client, MODEL, clean_data=str(clean_set_dir), trigger=str(trigger))
        outcome = sanitize_version(MODEL, version, CONFIG)
        assert outcome["status"] == T.SANITIZED, outcome
        yield {"client": client, "url": stack.tracking_uri, "outcome": outcome, "shots": work / "screenshots"}


@pytest.fixture(scope="module")
def page(reviewed):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            yield browser.new_page(viewport={"width": 1600, "height": 1250})
        finally:
            browser.close()


def _shot(page, reviewed, name: str) -> Path:
    path = reviewed["shots"] / name
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("GRADPRUNE_SCREENSHOT_DIR") and name in README_SHOTS:
        Path(os.environ["GRADPRUNE_SCREENSHOT_DIR"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(os.environ["GRADPRUNE_SCREENSHOT_DIR"]) / name)
    return path


def test_the_run_page_shows_the_before_after_metrics(page, reviewed):
    outcome = reviewed["outcome"]
    page.goto(runlog.run_url(reviewed["client"], outcome["run_id"]))
    page.get_by_text("attack_success_rate/after").first.wait_for(timeout=WAIT_MS)
    more = page.get_by_text("Show more", exact=True)
    if more.count():  # the description is folded after a few lines
        more.first.click()
    for name in ("clean_accuracy/before", "clean_accuracy/after", "attack_success_rate/before",
                 "robust_accuracy/after"):
        assert page.get_by_text(name, exact=True).count() >= 1, name
    # The run description (mlflow.note.content) renders the before/after table.
    table = page.locator("table", has_text="attack success rate").first
    table.wait_for(timeout=WAIT_MS)
    text = table.inner_text()
    for side in ("before", "after"):
        assert pct(outcome[side]["attack_success_rate"]) in text and pct(outcome[side]["clean_accuracy"]) in text
    assert _shot(page, reviewed, "review-run-top.png").stat().st_size > 20_000
    # README's picture: the description's table and the metrics table in one view.
    page.get_by_text("attack_success_rate/after", exact=True).first.scroll_into_view_if_needed()
    assert _shot(page, reviewed, "review-run.png").stat().st_size > 20_000


def test_the_model_version_page_shows_the_alias_and_the_table(page, reviewed):
    outcome = reviewed["outcome"]
    url = runlog.version_url(reviewed["client"], MODEL, outcome["sanitized_version"])
    page.goto(url)
    page.get_by_text("attack success rate").first.wait_for(timeout=WAIT_MS)
    page.get_by_text(T.ALIAS, exact=True).first.wait_for(timeout=WAIT_MS)
    body = page.locator("body").inner_text()
    assert f"@ {T.ALIAS}" in body or T.ALIAS in body.split()
    assert pct(outcome["after"]["attack_success_rate"]) in body and pct(outcome["before"]["clean_accuracy"]) in body
    assert _shot(page, reviewed, "review-version.png").stat().st_size > 20_000


def test_the_html_report_opens_in_the_artifact_viewer(page, reviewed):
    outcome = reviewed["outcome"]
    page.goto(runlog.run_url(reviewed["client"], outcome["run_id"]) + "/artifacts/report.html")
    frame = page.frame_locator("iframe").first
    frame.locator("#before-after").wait_for(timeout=WAIT_MS)
    assert pct(outcome["after"]["attack_success_rate"]) in frame.locator("#before-after").inner_text()
    # pruning curve, the (known) trigger, and filters per layer when the model let a filter go at the default budget
    assert frame.locator("img").count() in (2, 3)
    assert _shot(page, reviewed, "review-report.png").stat().st_size > 20_000
