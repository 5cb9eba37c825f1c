"""The dashboard in headless Chromium (Debian's package, driven by Playwright): a user's whole path.

Upload a dataset (a bad one first: its row error is shown), submit a tiny job, watch it succeed with its
curves and tables drawn, promote the model, ask it a question. A screenshot of the job page is saved
(in pytest's temp folder, or in $QADISTILL_SCREENSHOTS when set).
"""

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service import Service, embedded_service
from tests.unit.helpers import make_tiny_base

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
sync_api = pytest.importorskip("playwright.sync_api")
if CHROMIUM is None:
    pytest.skip("no chromium on this machine (apt-get install chromium)", allow_module_level=True)

JOB_TIMEOUT_MS = 180_000


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with embedded_service(tmp_path_factory.mktemp("web") / "home") as running:
        yield running


@pytest.fixture(scope="module")
def page(service: Service) -> Iterator["sync_api.Page"]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1280, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(90_000)  # the first answer loads the model: slow on busy shared cores
        yield page
        browser.close()


def test_every_asset_is_served_locally(service):
    for path in ("/", "/docs", "/redoc"):
        html = httpx.get(service.url + path).text
        assert "cdn." not in html and "https://" not in html.replace("https://fastapi", ""), path
    for asset in ("/static/app.js", "/static/style.css", "/static/docs/swagger-ui-bundle.js",
                  "/static/docs/swagger-ui.css", "/static/docs/redoc.standalone.js"):  # fmt: skip
        assert httpx.get(service.url + asset).status_code == 200, asset


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    """Where the test's screenshots go."""
    folder = Path(os.environ.get("QADISTILL_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_a_users_path_through_the_dashboard(service, page, screenshots, tmp_path, tmp_path_factory):
    try:
        walk_through(service, page, screenshots, tmp_path, tmp_path_factory)
    except BaseException:
        page.screenshot(path=str(screenshots / "failure.png"), full_page=True)
        print(f"screenshot of the failure: {screenshots / 'failure.png'}")
        raise


def walk_through(service, page, screenshots, tmp_path, tmp_path_factory):
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(service.url + "/")
    page.fill("#api-key", service.key)
    page.get_by_role("button", name="Use this key").click()
    page.wait_for_selector("[data-testid=jobs]")

    # Datasets: a file with a bad row is refused with its line and field; a good one shows its counts.
    page.click("text=Datasets")
    bad, good = tmp_path / "bad.jsonl", tmp_path / "faq.jsonl"
    rows = [{"qid": f"q{i // 2}", "question": f"question {i // 2}?", "passage": f"passage {i}", "label": i % 2}
            for i in range(8)]  # fmt: skip
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"question": "q", "passage": "p", "label": "yes"}) + "\n")
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    page.set_input_files("#dataset-file", str(bad))
    page.click("[data-testid=upload]")
    assert "line 2, field 'label'" in page.inner_text("[data-testid=upload-result] .error")
    page.set_input_files("#dataset-file", str(good))
    page.fill("#dataset-name", "faq")
    page.click("[data-testid=upload]")
    assert "faq: 8 pairs, 4 questions, 4 positives." in page.inner_text("[data-testid=upload-result] .ok")
    page.wait_for_selector("[data-testid=datasets] >> text=faq")

    # Jobs: submit the tiny job and follow it on its page to the end.
    tiny_base = make_tiny_base(tmp_path_factory.mktemp("models"))
    teacher = {"path": str(tiny_base), "max_length": 32}
    spec = {
        "name": "web-demo",
        "variants": ["kd", "tmkd"],
        "data": {"train": "faq", "eval": "demo", "unlabeled": "demo"},
        "teachers": [teacher | {"name": "t1"}, teacher | {"name": "t2"}],
        "student": {"init_from": str(tiny_base), "layers": [0], "max_length": 32},
        "stage1": {"batch_size": 16, "max_steps": 4, "learning_rate": 1e-3},
        "stage2": {"batch_size": 4, "max_steps": 6, "learning_rate": 1e-3},
        "device": "cpu",
    }
    page.click("text=Jobs")
    # The box starts with the README's tiny job (examples/tiny-job.json).
    page.wait_for_function("document.querySelector('[data-testid=spec]')?.value.includes('tiny-demo')")
    page.fill("[data-testid=spec]", json.dumps(spec))
    page.click("[data-testid=submit-job]")
    page.wait_for_selector("[data-testid=status] >> text=succeeded", timeout=JOB_TIMEOUT_MS)
    page.wait_for_selector("[data-testid=report-table]")
    assert page.locator("[data-testid=curve] polyline").count() >= 2  # stage 1 and stage 2 of tmkd at least
    timeline = page.inner_text("[data-testid=timeline]")
    assert "stage1" in timeline and "stage2" in timeline
    report = page.inner_text("[data-testid=report]")
    assert "tmkd" in report and "MAP" in report
    assert "succeeded" in page.inner_text("[data-testid=events]")
    assert page.is_disabled("[data-testid=cancel]")
    page.screenshot(path=str(screenshots / "job-page.png"), full_page=True)

    # Models: promote version 1 to production.
    page.click("[data-testid=job-model]")
    page.click("[data-testid=promote-web-demo-1]")
    page.wait_for_selector("[data-testid=alias] >> text=production → 1")

    # Ask: the ranked passages come back, best first.
    page.click("header >> text=Ask")
    page.fill("#ask-model", "web-demo@production")
    page.click("[data-testid=ask]")
    page.wait_for_selector("[data-testid=ranked]")
    ranked = page.locator("[data-testid=ranked]")
    assert ranked.count() == 3
    scores = [float(ranked.nth(i).locator("td").nth(1).inner_text()) for i in range(3)]
    assert scores == sorted(scores, reverse=True)
    assert "web-demo:1 answered" in page.inner_text("[data-testid=answer]")
    assert errors == []
