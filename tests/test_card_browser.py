"""The checkpoint card in headless Chromium: the `card server` page while a step runs, and the
rendered card afterwards. With CI=true a missing browser fails these tests instead of skipping."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.card import (
    CardRequest,
    build_view,
    render_page,
    render_sections,
)
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.checkpointer import Checkpointer
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import TaskLocation
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.store import open_store

from conftest import TEST_FLOWS, XSS

FLOW = TEST_FLOWS / "card_live_flow.py"

ROWS_JS = """
return Array.from(document.querySelectorAll(arguments[0] + ' tbody tr')).map(function (tr) {
  return {key: tr.dataset.key, attempt: Number(tr.dataset.attempt), created: tr.dataset.created,
          failed: tr.classList.contains('failed'), loaded: tr.classList.contains('loaded'),
          index: tr.cells[0].innerText, name: tr.cells[2].firstChild.textContent.trim(), text: tr.innerText,
          lineage: tr.querySelector('td.lineage') ? tr.querySelector('td.lineage').innerText.trim() : null};
});
"""


def _need(message: str):
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def browser(tmp_path):
    """Debian's headless Chromium driven by Debian's chromedriver through selenium."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        _need("Needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _need('Needs selenium: pip install -e ".[dev]"')
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,1000",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield driver
    driver.quit()


def rows(driver, table: str) -> list[dict]:
    return driver.execute_script(ROWS_JS, f"table.{table}")


def wait_for(driver, condition, timeout=90):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.5).until(condition)


class LiveRun:
    """The live flow running in the background, fed through a FIFO, and a `card server`."""

    def __init__(self, home: Path, tmp: Path):
        self.home, self.env = home, {**os.environ, "USERNAME": "tester", "CARD_GATE": str(tmp / "gate")}
        os.mkfifo(self.env["CARD_GATE"])
        self.log = open(tmp / "run.log", "w+")
        self.run = self._start([FLOW, "run", "--run-id-file", tmp / "run-id"])
        self.run_id = self._wait(lambda: (tmp / "run-id").exists() and (tmp / "run-id").read_text(), "a run id")
        self.gate = os.fdopen(self._wait(self._open_gate, "attempt 1 to read its FIFO"), "w")
        self.saves = 0
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = self._start([FLOW, "card", "server", "--run-id", self.run_id, "--port", self.port, "--poll-interval", "1"])
        self._wait(self._server_answers, "the card server")

    def save(self) -> None:
        """Have the step save one more checkpoint."""
        self.gate.write("save\n")
        self.gate.flush()
        self.saves += 1

    def finish(self) -> int:
        if not self.gate.closed:
            self.gate.write("done\n")
            self.gate.close()
        return self.run.wait(timeout=120)

    def stop(self) -> None:
        for proc in (self.run, self.server):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # the group this test started
                proc.wait(timeout=30)
        self.log.close()

    @property
    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def _start(self, args):
        return subprocess.Popen(
            [sys.executable, str(args[0]), "--no-pylint", *map(str, args[1:])],
            cwd=self.home, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def _open_gate(self):
        try:  # a FIFO opens for writing only once its reader has opened it
            return os.open(self.env["CARD_GATE"], os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            return None

    def _server_answers(self):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/runinfo", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def _wait(self, condition, what: str, timeout: float = 90):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            if self.run.poll() is not None and self.run.returncode != 0:
                break
            time.sleep(0.1)
        raise AssertionError(f"Gave up waiting for {what}:\n{self.output[-3000:]}")


@pytest.fixture(scope="module")
def live(metaflow_home, tmp_path_factory):
    run = LiveRun(metaflow_home, tmp_path_factory.mktemp("live"))
    yield run
    run.stop()


def test_card_server_page_updates_in_place_while_the_step_runs(browser, live, tmp_path):
    """While attempt 1 runs, the `card server` page shows attempt 0's checkpoints (failed) and
    the lineage of the one loaded; as the step saves more, the same page (no reload) gains rows,
    oldest first; after the step ends it shows every checkpoint."""
    browser.get(f"http://127.0.0.1:{live.port}/")
    wait_for(browser, lambda d: d.find_element("id", "card-frame").get_attribute("src"))
    browser.switch_to.frame(browser.find_element("id", "card-frame"))
    first = wait_for(browser, lambda d: len(rows(d, "checkpoints")) >= 3 and rows(d, "checkpoints"))
    assert [(r["attempt"], r["failed"]) for r in first[:3]] == [(0, True)] * 3
    browser.execute_script("window.probe = 'still the first page';")

    def saved_and_shown(driver):
        live.save()  # a refresh runs at most every few seconds: keep saving until one shows
        shown = rows(driver, "checkpoints")
        return len(shown) > 3 and shown

    grown = wait_for(browser, saved_and_shown)
    browser.save_screenshot(str(tmp_path / "card-server-live.png"))
    assert browser.execute_script("return window.probe") == "still the first page"
    assert [r["created"] for r in grown] == sorted(r["created"] for r in grown)
    assert [(r["attempt"], r["failed"]) for r in grown] == [(0, True)] * 3 + [(1, False)] * (len(grown) - 3)
    assert len(grown) <= 3 + live.saves
    # The lineage of the loaded checkpoint: attempt 0's three, numbered in place, none repeated.
    assert [r["lineage"] for r in grown] == ["0", "1", "2"] + [""] * (len(grown) - 3) and grown[2]["loaded"]
    assert rows(browser, "lineage") == []
    assert live.finish() == 0, live.output[-3000:]
    final = wait_for(browser, lambda d: len(rows(d, "checkpoints")) == 3 + live.saves and rows(d, "checkpoints"))
    assert [r["name"] for r in final] == [f"epoch-{e}" for e in range(1, 4 + live.saves)]
    assert (tmp_path / "card-server-live.png").stat().st_size > 0


def test_rendered_card_in_the_browser(browser, live, tmp_path):
    """The final card, as `card get` saves it, shows the table oldest first with attempt 0
    marked failed, the lineage numbered from 0 in its rows, and markup in metadata as text (no alert)."""
    from selenium.common.exceptions import NoAlertPresentException

    if not live.gate.closed:
        live.save()  # this test alone: let attempt 1 save one checkpoint
    assert live.finish() == 0, live.output[-3000:]
    page = tmp_path / "card.html"
    got = subprocess.run(
        [sys.executable, str(FLOW), "--no-pylint", "card", "get", f"{live.run_id}/train", str(page)],
        cwd=live.home, env=live.env, capture_output=True, text=True,
    )
    assert got.returncode == 0, got.stderr
    browser.get(page.as_uri())
    table = rows(browser, "checkpoints")
    assert [r["created"] for r in table] == sorted(r["created"] for r in table)
    assert [r["attempt"] for r in table] == [0, 0, 0] + [1] * (len(table) - 3) and len(table) > 3
    assert [r["failed"] for r in table] == [True] * 3 + [False] * (len(table) - 3)
    assert [r["lineage"] for r in table] == ["0", "1", "2"] + [""] * (len(table) - 3) and rows(browser, "lineage") == []
    assert all(XSS in r["text"] for r in table)
    assert browser.execute_script("return document.scripts.length") == 1
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text
    browser.save_screenshot(str(tmp_path / "card.png"))
    assert (tmp_path / "card.png").stat().st_size > 0


def test_update_from_an_earlier_attempt_is_ignored(browser, tmp_path):
    """Every attempt writes the same card, and an attempt's first render leaves the previous
    attempt's data update in place: the page applies updates of its own attempt or later only."""
    root = str(tmp_path / "ckpt")
    checkpointer, loc = Checkpointer(open_store(root)), TaskLocation("F", "1", "train", "2")
    checkpointer.save(loc, 0, {"w": 0}, name="old")
    old = build_view(checkpointer, CardRequest(loc.pathspec, loc.position, 0, root, "fresh"))
    checkpointer.save(loc, 1, {"w": 1}, name="new")
    new = build_view(checkpointer, CardRequest(loc.pathspec, loc.position, 1, root, "fresh"))
    page = tmp_path / "card.html"
    page.write_text(render_page(new, "never"))
    browser.get(page.as_uri())
    update = "return window.metaflow_card_update({attempt: arguments[0], sections: arguments[1]})"
    assert browser.execute_script(update, 0, {k: str(v) for k, v in render_sections(old).items()}) is False
    assert [r["name"] for r in rows(browser, "checkpoints")] == ["old", "new"]
    checkpointer.save(loc, 1, {"w": 2}, name="newer")
    newer = build_view(checkpointer, CardRequest(loc.pathspec, loc.position, 1, root, "fresh"))
    assert browser.execute_script(update, 1, {k: str(v) for k, v in render_sections(newer).items()}) is True
    assert [r["name"] for r in rows(browser, "checkpoints")] == ["old", "new", "newer"]
