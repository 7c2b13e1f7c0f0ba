"""The dashboard in a real browser: headless Chromium (Debian's chromium + chromium-driver, through
Selenium) on a real API process, Postgres, Redis and a real minilm worker.

It logs in through the form, checks the numbers the page shows against the task table, cancels a
queued job (of a model no worker serves) from the page, and saves a screenshot of the page:
under pytest's tmp folder always, and to docs/dashboard.png with LLMOS_TEST_UPDATE_SCREENSHOT=1:

    LLMOS_TEST_UPDATE_SCREENSHOT=1 tests/run.sh tests/e2e/test_dashboard_browser.py

Without Chromium the test skips, except where CI=true: there it fails (tests/run.sh installs it).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from llmos import manager
from llmos.db import get_engine, jobs
from llmos.jobs import JobStatus
from tests import helpers
from tests.integration.test_api import ApiProcess

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT = helpers.REPO / "docs" / "dashboard.png"


def _browser(profile: Path):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        why = f"{' and '.join(missing)} missing: apt-get install chromium chromium-driver (tests/run.sh does, as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[test]'", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with the driver's path given, Selenium Manager downloads nothing
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000", "--lang=en-GB",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def test_chromium_missing_fails_under_ci(monkeypatch, tmp_path):
    """Where CI=true a missing browser is a failure, not a skip (elsewhere: a skip)."""
    monkeypatch.setitem(globals(), "CHROMIUM", str(tmp_path / "no-chromium"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no-chromium missing"):
        _browser(tmp_path / "profile")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        _browser(tmp_path / "profile")


def wait_for(what, fn, timeout=60.0, every=0.2, driver=None):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            seen = "" if driver is None else (f"\npage: {driver.current_url}\n{driver.find_element('tag name', 'body').text[:2000]}"
                                              f"\nconsole: {driver.get_log('browser')}")
            raise AssertionError(f"timed out waiting for {what}{seen}")
        time.sleep(every)


def table_counts(engine):
    """What the counts panel must show, read straight from the task table (the database's clock)."""
    with engine.connect() as conn:
        open_ = dict(conn.execute(sa.text(
            "SELECT status, count(*) FROM jobs WHERE status IN ('queued', 'running') GROUP BY status")).all())
        hour = dict(conn.execute(sa.text(
            "SELECT status, count(*) FROM jobs WHERE finished_at >= now() - interval '1 hour' GROUP BY status")).all())
        day = dict(conn.execute(sa.text(
            "SELECT status, count(*) FROM jobs WHERE finished_at >= now() - interval '1 day' GROUP BY status")).all())
    return {"open": open_, "hour": hour, "day": day}


@pytest.fixture(scope="module")
def stack(services, pg_worker):
    settings, env = services
    with get_engine(settings.db_url).begin() as conn:  # (the services fixture empties jobs and workers only)
        for table in ("batch_lines", "batches"):  # earlier modules' batches would show in the panel
            conn.execute(sa.text(f"DELETE FROM {table}"))
    api = ApiProcess(env, LLMOS_API_DASHBOARD_SECRET="browser-test-" + "s" * 32).wait_ready()  # (no secret: off)
    try:
        yield settings, env, api
    finally:
        api.stop()


def test_dashboard_in_chromium(stack, tmp_path):
    settings, env, api = stack
    engine = get_engine(settings.db_url)
    _, admin = manager.create_api_key(engine, tenant="ops", admin=True)
    _, acme = manager.create_api_key(engine, tenant="acme")
    auth = {"Authorization": f"Bearer {acme}"}
    with httpx.Client(base_url=api.url, timeout=60, headers=auth) as http:
        done = [http.post("/v1/jobs", json={"model": "minilm", "task": "sentiment",
                                            "input": {"text": f"review {i}: {'great' if i % 2 else 'awful'}"}}).json()["id"]
                for i in range(8)]
        waiting = [http.post("/v1/jobs", json={"model": "gpt2", "task": "writing", "priority": p,
                                               "input": {"prompt": f"Once upon a time {p}"}}).json()["id"]
                   for p in (7, 5, 3, 2)]
        batch_ids = {}
        for name, model, task, n in (("reviews-nightly", "minilm", "sentiment", 6), ("stories", "gpt2", "writing", 4)):
            lines = "".join(f'{{"id": "{name}-{i}", "text": "line {i} of {name}"}}\n' for i in range(n))
            up = http.post("/v1/files", files={"file": (f"{name}.jsonl", lines.encode())}, data={"purpose": "batch"})
            assert up.status_code == 200, up.text
            made = http.post("/v1/batches", json={"input_file_id": up.json()["id"], "endpoint": "/v1/jobs", "name": name,
                                                  "completion_window": "24h", "task": task, "model": model})
            assert made.status_code == 200, made.text
            batch_ids[name] = made.json()["id"]
        wait_for("the minilm batch completed", lambda: http.get(
            f"/v1/batches/{batch_ids['reviews-nightly']}").json()["status"] == "completed", timeout=120, every=0.5)
    helpers.wait_all_final(engine, done)
    # two failures for the failures panel: gpt2 jobs taken by a worker elsewhere that hit errors
    for job_id, error in ((waiting[2], "CUDA out of memory (simulated)"),
                          (waiting[3], "RuntimeError: the runner raised on this input (simulated)")):
        claimed, _ = manager.claim(engine, [job_id], worker_id="gpt2@elsewhere:1", device="cuda:0")
        manager.finish(engine, [manager.Outcome(job_id=job_id, worker_id="gpt2@elsewhere:1", attempt=claimed[0].attempts,
                                                error=error, compute_ms=12.0, queue_wait_ms=30.0)])
    target = waiting[1]

    from selenium.webdriver.common.by import By

    driver = _browser(tmp_path / "profile")
    try:
        driver.get(api.url + "/dashboard")
        driver.find_element(By.ID, "key").send_keys(admin)
        driver.find_element(By.ID, "login-submit").click()
        wait_for("the panels", lambda: driver.execute_script("return document.body.dataset.loaded === 'true'"),
                 driver=driver)
        cookie = driver.get_cookie("llmos_dashboard")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/dashboard"
        assert admin not in cookie["value"]
        assert driver.execute_script("return document.cookie") == ""  # HttpOnly: no script reads it

        # every read is one script run: the page re-renders between two WebDriver commands
        def rows(selector, *names):
            return driver.execute_script(
                "return [...document.querySelectorAll(arguments[0])].map(e => arguments[1].map("
                "n => n === 'text' ? e.textContent : e.getAttribute(n)))", selector, list(names))

        def shown(win, status):
            found = rows(f"#count-{win}-{status}", "data-value")
            return int(found[0][0]) if found else None

        def click(selector, confirm=True):
            """Click an element (again if a re-render replaced it meanwhile); accept its confirm dialog."""
            from selenium.common.exceptions import StaleElementReferenceException

            for _ in range(10):
                try:
                    driver.find_element(By.CSS_SELECTOR, selector).click()
                    break
                except StaleElementReferenceException:
                    time.sleep(0.1)
            else:
                raise AssertionError(f"{selector} kept going stale")
            if confirm:
                driver.switch_to.alert.accept()

        def counts_match():
            expected = table_counts(engine)
            return all(shown(win, st) == expected[win].get(st, 0)
                       for win, statuses in (("open", ("queued", "running")),
                                             ("hour", ("succeeded", "failed", "cancelled", "expired")),
                                             ("day", ("succeeded", "failed", "cancelled", "expired")))
                       for st in statuses)

        # it refreshes itself
        first = int(rows("#refreshed", "data-count")[0][0])
        wait_for("a refresh of its own", lambda: int(rows("#refreshed", "data-count")[0][0]) > first, timeout=30)

        # the numbers shown are the task table's
        assert counts_match(), (table_counts(engine), rows("#counts td[data-value]", "id", "data-value"))
        assert shown("hour", "succeeded") == 8 + 6 and shown("open", "queued") == 2 + 4 and shown("hour", "failed") == 2
        expected = table_counts(engine)
        assert int(rows("#throughput-total", "data-value")[0][0]) == sum(expected["hour"].values())
        depth = {(m, int(p)): int(n) for m, p, n in rows("#queue tr[data-model]", "data-model", "data-priority", "data-queued")}
        with engine.connect() as conn:
            queued = conn.execute(sa.select(jobs.c.model, jobs.c.priority, sa.func.count())
                                  .where(jobs.c.status == "queued").group_by(jobs.c.model, jobs.c.priority)).all()
        assert depth == {(m, p): n for m, p, n in queued} == {("gpt2", 7): 1, ("gpt2", 5): 1, ("gpt2", 1): 4}
        progress = {b: (st, int(d), int(t)) for b, st, d, t in rows(
            "#batches tr[data-batch-id]", "data-batch-id", "data-status", "data-done", "data-total")}
        assert progress == {batch_ids["reviews-nightly"]: ("completed", 6, 6), batch_ids["stories"]: ("in_progress", 0, 4)}
        failures = rows("#failures tr[data-job-id]", "data-job-id", "text")
        assert [f[0] for f in failures] == [waiting[3], waiting[2]]  # newest first
        assert "CUDA out of memory" in failures[1][1]
        assert rows("#workers tr[data-worker] td:nth-child(2)", "text") == [["minilm"]]
        assert rows("#workers tr[data-worker] td:nth-child(8)", "text") == [["32"]]  # the registry's max_batch_size

        def status(job_id):
            return manager.get_job(engine, job_id, tenant="acme").status.value

        # retry the failed job, cancel the open batch, cancel a queued job: from the page
        click(f'#failures tr[data-job-id="{waiting[2]}"] button[data-action="retry"]')
        wait_for("the failed job queued again", lambda: status(waiting[2]) == "queued")
        wait_for("the failure gone from the page", lambda: [f[0] for f in rows("#failures tr[data-job-id]", "data-job-id")]
                 == [waiting[3]])
        stories = batch_ids["stories"]
        click(f'#batches tr[data-batch-id="{stories}"] button[data-action="cancel-batch"]')
        wait_for("the batch's jobs cancelled", lambda: manager.batch_open_jobs(engine, stories, tenant="acme") == 0)
        wait_for("the batch cancelled on the page", lambda: rows(
            f'#batches tr[data-batch-id="{stories}"]', "data-status") == [["cancelled"]], timeout=30)
        click(f'#queued-jobs tr[data-job-id="{target}"] button[data-action="cancel"]')
        wait_for("the job cancelled in the table", lambda: status(target) == "cancelled")
        wait_for("the row gone", lambda: not rows(f'#queued-jobs tr[data-job-id="{target}"]', "data-job-id"))
        assert status(waiting[0]) == "queued"  # only the one clicked
        assert manager.batch_status_counts(engine, stories, tenant="acme") == {JobStatus.CANCELLED: 4}
        wait_for("the counts shown to match the table again", counts_match, timeout=30)
        expected = table_counts(engine)
        assert expected["open"]["queued"] == 2 and expected["hour"]["cancelled"] == 5 and expected["hour"]["failed"] == 1

        # a job's timeline, then the picture
        click(f'#queued-jobs a[data-job="{waiting[0]}"]', confirm=False)
        wait_for("the timeline", lambda: rows("#timeline-status", "data-status") == [["queued"]])
        # ... and a finished one's, asked for by id: its steps, and the ETA predicted at submit against them
        box = driver.find_element(By.ID, "timeline-id")  # (the form is not re-rendered)
        box.clear()
        box.send_keys(done[-1])
        driver.find_element(By.CSS_SELECTOR, "#timeline-form button").click()
        wait_for("the finished job's timeline", lambda: rows("#timeline-status", "data-status") == [["succeeded"]])
        steps = dict(rows("#timeline li[data-step]", "data-step", "class"))
        assert steps == {"created": "done", "queued": "done", "started": "done", "finished": "done"}
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1400, min(4000, height + 200))
        driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.5)
        shot = tmp_path / "dashboard.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        if os.environ.get("LLMOS_TEST_UPDATE_SCREENSHOT") == "1":
            shutil.copyfile(shot, SCREENSHOT)
        errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert not errors, errors  # no script error, nothing refused by the page's CSP
    finally:
        driver.quit()
