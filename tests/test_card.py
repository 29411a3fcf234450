"""The checkpoint card: rendered from real storage, then for real Metaflow runs."""
from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
import zipfile
from html.parser import HTMLParser

import pytest
from metaflow import Checkpoint, Run
from metaflow.cards import get_cards
from metaflow.plugins.cards.exception import CardNotPresentException

from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.card import (
    CARD_TYPE,
    CardRequest,
    build_view,
    render_page,
    render_sections,
)
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.checkpointer import Checkpointer
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import TaskLocation
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.store import open_store

from conftest import FLOWS, REPO, TEST_FLOWS

XSS = "<script>alert(1)</script>"


class CardTables(HTMLParser):
    """The rows of a card's tables by table class: each row's attributes and cell texts."""

    def __init__(self, html: str):
        super().__init__()
        self.tables: dict[str, list[dict]] = {}
        self._rows = None
        self._row = None
        self._cell = False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._rows = self.tables.setdefault(attrs["class"], [])
        elif tag == "tr" and self._rows is not None and "data-key" in attrs:
            self._row = {**attrs, "class": (attrs.get("class") or "").split(), "cells": []}
            self._rows.append(self._row)
        elif tag == "td" and self._row is not None:
            self._row["cells"].append("")
            self._cell = True

    def handle_endtag(self, tag):
        if tag == "table":
            self._rows = None
        elif tag == "tr":
            self._row = None
        elif tag == "td" and self._row is not None:
            self._row["cells"][-1] = " ".join(self._row["cells"][-1].split())
            self._cell = False

    def handle_data(self, data):
        if self._cell:
            self._row["cells"][-1] += data

    def rows(self, table: str) -> list[dict]:
        return self.tables.get(table, [])


# ----- rendering, on each real storage backend ------------------------------------------
def _saved(root_url):
    """Two checkpoints of attempt 0, then one of attempt 1 that loaded the second."""
    checkpointer = Checkpointer(open_store(root_url))
    loc = TaskLocation("F", "1", "train", "7")
    first = checkpointer.save(loc, 0, {"w": 1}, name="first", metadata={"loss": 0.5, "acc": 0.1})
    second = checkpointer.save(loc, 0, {"w": 2}, name="<img src=x onerror=alert(1)>", metadata={"note": XSS, "loss": 0.25}, parent=first.key)
    third = checkpointer.save(loc, 1, {"w": 2, "b": 3}, name="third", metadata={"loss": 0.125}, parent=second.key)
    request = CardRequest(loc.pathspec, loc.position, attempt=1, root=root_url, load_policy="fresh", loaded=second.key)
    return checkpointer, request, [first, second, third]


def test_rows_are_oldest_first_with_failed_attempts_marked(root_url):
    """Rows follow creation time; attempt 0 is marked failed in attempt 1's card, attempt 1 is
    not (it has not failed); the loaded checkpoint is marked; the lineage ends with it."""
    checkpointer, request, saved = _saved(root_url)
    tables = CardTables(render_page(build_view(checkpointer, request), "token"))
    rows = tables.rows("checkpoints")
    assert [r["data-key"] for r in rows] == [a.key for a in saved]
    assert [("failed" in r["class"], "loaded" in r["class"]) for r in rows] == [(True, False), (True, True), (False, False)]
    assert [r["cells"][0] for r in rows] == ["1", "2", "3"]
    assert rows[2]["cells"][4] == "b w" and rows[2]["cells"][6] == "5 B"  # fields; only `b` was written
    assert [(r["cells"][0], r["data-key"]) for r in tables.rows("lineage")] == [("0", saved[0].key), ("1", saved[1].key)]


def test_a_raising_attempt_marks_its_own_checkpoints_failed(root_url):
    """With failed=True (rendered from task_exception) the card's own attempt is failed too."""
    checkpointer, request, _ = _saved(root_url)
    failed = CardRequest(**{**request.__dict__, "failed": True})
    rows = CardTables(render_page(build_view(checkpointer, failed), "t")).rows("checkpoints")
    assert all("failed" in r["class"] for r in rows)


def test_user_data_shows_as_text(root_url):
    """Names and metadata values with markup are escaped: no tag of theirs reaches the page."""
    checkpointer, request, _ = _saved(root_url)
    html = render_page(build_view(checkpointer, request), "t")
    assert XSS not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    rows = CardTables(html).rows("checkpoints")
    assert rows[1]["cells"][2].startswith("<img src=x onerror=alert(1)>") and XSS in rows[1]["cells"][8]


def test_plot_prefers_loss_and_needs_two_numeric_values(root_url):
    """`loss` is plotted (not the first key, `acc`), one point per checkpoint that has it; with
    no numeric value on two checkpoints there is no plot."""
    checkpointer, request, _ = _saved(root_url)
    view = build_view(checkpointer, request)
    assert view.plot.metric == "loss" and [v for _, _, _, v in view.plot.points] == [0.5, 0.25, 0.125]
    assert view.plot.points[0][1] < view.plot.points[-1][1]  # larger values are drawn higher
    loc = TaskLocation("F", "2", "train", "1")
    checkpointer.save(loc, 0, {"w": 1}, metadata={"loss": "n/a", "ok": True})
    checkpointer.save(loc, 0, {"w": 1}, metadata={"loss": 1.0})
    bare = CardRequest(loc.pathspec, loc.position, 0, root_url, "fresh")
    assert build_view(checkpointer, bare).plot is None and "<svg" not in render_page(build_view(checkpointer, bare), "t")


def test_nothing_loaded_and_unreadable_loaded_checkpoint(root_url):
    """No load: both 'nothing' messages. A loaded key that cannot be read: the card says so
    instead of failing to render."""
    checkpointer, request, _ = _saved(root_url)
    html = render_page(build_view(checkpointer, CardRequest(**{**request.__dict__, "loaded": None})), "t")
    assert "No checkpoint was loaded" in html and "No lineage found" in html
    gone = request.location.key("20200101T000000000000Z-a0-00000000")
    view = build_view(checkpointer, CardRequest(**{**request.__dict__, "loaded": gone}))
    assert view.problem.startswith(f"The loaded checkpoint {gone} cannot be read") and view.lineage == ()


def test_in_place_update_carries_the_page_sections(root_url):
    """Each section an update sends is exactly what the page shows, under the element id the
    page's update function replaces."""
    checkpointer, request, _ = _saved(root_url)
    view = build_view(checkpointer, request)
    page = render_page(view, "token")
    for element_id, html in render_sections(view).items():
        assert f'<section id="{element_id}">{html}</section>' in page
    assert 'window.METAFLOW_RELOAD_TOKEN = "token"' in page


# ----- real runs ----------------------------------------------------------------------------
def card_html(run_flow, flow_file, pathspec: str) -> str:
    """`python flow.py card get PATHSPEC`: the one card Metaflow finds there."""
    result = run_flow(flow_file, "card", "get", pathspec)
    assert "<html" in result.proc.stdout, result.output[-2000:]
    return result.proc.stdout


@pytest.fixture(scope="module")
def demo(run_flow):
    """The README demo: train_numpy.py killed at epochs 8 and 16, then `card get train`."""
    result = run_flow(FLOWS / "train_numpy.py", "run")
    task = Run(f"TrainFlow/{result.run_id}")["train"].task
    return task, card_html(run_flow, FLOWS / "train_numpy.py", f"{result.run_id}/train")


def test_demo_card_lists_three_attempts_oldest_first(demo):
    """`card get train` after the demo shows one card: all 24 checkpoints in creation order,
    attempts 0 and 1 (SIGKILLed) marked failed, the final render of attempt 2."""
    task, html = demo
    rows = CardTables(html).rows("checkpoints")
    assert [r["data-key"] for r in rows] == [c.key for c in reversed(Checkpoint().list(task=task))]
    assert [int(r["data-attempt"]) for r in rows] == [0] * 8 + [1] * 8 + [2] * 8
    assert [r["data-created"] for r in rows] == sorted(r["data-created"] for r in rows)
    assert [("failed" in r["class"]) for r in rows] == [True] * 16 + [False] * 8
    assert 'window.METAFLOW_RELOAD_TOKEN = "final"' in html and "<svg" in html
    assert f"<dt>Attempt</dt><dd>2</dd>" in html


def test_demo_card_lineage_is_the_chain_attempt_2_resumed_from(demo):
    """Attempt 2 loaded epoch 16 (attempt 1), which descends from epoch 8 (attempt 0): the
    lineage lists epochs 1..16, index 0 first, with their attempts; that row is marked loaded."""
    task, html = demo
    tables = CardTables(html)
    lineage = tables.rows("lineage")
    loaded = task.metadata_dict["implicit-checkpoint-loaded"]
    assert [r["cells"][0] for r in lineage] == [str(i) for i in range(16)]
    assert [int(r["data-attempt"]) for r in lineage] == [0] * 8 + [1] * 8
    assert lineage[-1]["data-key"] == loaded and "loaded" in lineage[-1]["class"]
    assert [r["data-key"] for r in tables.rows("checkpoints") if "loaded" in r["class"]] == [loaded]
    assert [r["cells"][-1].split()[0] for r in lineage] == [f"epoch={e}" for e in range(1, 17)]


@pytest.fixture(scope="module")
def card_flow(run_flow):
    return Run(f"CardFlow/{run_flow(TEST_FLOWS / 'card_flow.py', 'run').run_id}")


def _cards(task, card_type=None):
    try:
        return list(get_cards(task, type=card_type))
    except CardNotPresentException:
        return []


def test_fifty_checkpoints_per_foreach_branch(card_flow):
    """Each foreach branch's card lists its own 50 checkpoints in order, says nothing was
    loaded, and is the final render."""
    for task in card_flow["many"]:
        (card,) = _cards(task, CARD_TYPE)
        html = card.get()
        rows = CardTables(html).rows("checkpoints")
        expected = list(reversed(Checkpoint().list(task=task)))
        assert len(rows) == 50 and [r["data-key"] for r in rows] == [c.key for c in expected]
        assert [r["cells"][2] for r in rows] == [f"{'ab'[task.index]}-{i:02d}" for i in range(50)]
        assert not any("failed" in r["class"] for r in rows)
        assert "No checkpoint was loaded" in html and "No lineage found" in html
        assert f"(foreach {task.index})" in html
        assert 'window.METAFLOW_RELOAD_TOKEN = "final"' in html


def _user_components(card) -> str:
    # Metaflow's default and blank cards embed their components as base64 JSON.
    blobs = re.findall(r'__MF_DATA__\["[^"]+"\] = "([^"]+)"', card.get())
    return "".join(base64.b64decode(b).decode() for b in blobs)


@pytest.mark.parametrize("step", ["user_card_first", "user_card_last"])
def test_users_own_card_keeps_current_card_append(card_flow, step):
    """With the user's @card above or below @checkpoint, current.card.append goes to the user's
    card, and both cards get their final render (the config file is not deleted early)."""
    task = card_flow[step].task
    cards = _cards(task)
    assert sorted(c.type for c in cards) == sorted([CARD_TYPE, "default" if step.endswith("first") else "blank"])
    (ours,) = [c for c in cards if c.type == CARD_TYPE]
    (theirs,) = [c for c in cards if c.type != CARD_TYPE]
    assert "written by the user" in _user_components(theirs)
    assert "written by the user" not in ours.get()
    assert 'window.METAFLOW_RELOAD_TOKEN = "final"' in ours.get()
    assert len(CardTables(ours.get()).rows("checkpoints")) == 1


def test_no_card_with_card_false_or_without_a_save(card_flow):
    """`@checkpoint(card=False)` attaches no card; a step that neither saves nor loads renders
    none (that is what keeps it as fast as an undecorated step)."""
    assert _cards(card_flow["opt_out"].task) == []
    assert _cards(card_flow["idle"].task) == []
    assert Checkpoint().list(task=card_flow["opt_out"].task)  # it did save


def test_failed_task_card_shows_every_attempt_marked_failed(run_flow):
    """Both attempts raise: Metaflow renders no final card, yet the card (rendered as the
    last attempt failed) shows all four checkpoints, all failed, and markup as text."""
    result = run_flow(TEST_FLOWS / "card_fail_flow.py", "run", expect_ok=False)
    assert "attempt 1 gives up" in result.output
    task = Run(f"CardFailFlow/{result.run_id}")["train"].task
    html = card_html(run_flow, TEST_FLOWS / "card_fail_flow.py", f"{result.run_id}/train")
    rows = CardTables(html).rows("checkpoints")
    assert [int(r["data-attempt"]) for r in rows] == [0, 0, 1, 1]
    assert [r["data-key"] for r in rows] == [c.key for c in reversed(Checkpoint().list(task=task))]
    assert all("failed" in r["class"] for r in rows)
    assert '<dt>Attempt</dt><dd>1 <span class="badge failed">failed</span></dd>' in html
    assert XSS not in html and "<img src=x" not in html and XSS in rows[0]["cells"][8]


def test_templates_ship_in_the_wheel_and_in_metaflows_code_package(tmp_path, run_flow):
    """A wheel built from the repository holds the templates, and Metaflow's code package (what
    remote tasks get) lists them."""
    src = tmp_path / "src"
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()
    for name in files:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, src / name, follow_symlinks=False)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(src)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    templates = "metaflow_extensions/implicit_checkpoint/plugins/implicit_checkpoint/templates/"
    assert {templates + "card.html", templates + "sections.html"} <= set(names)
    listed = run_flow(FLOWS / "train_numpy.py", "package", "list").output
    assert all(t in listed for t in (templates + "card.html", templates + "sections.html"))
