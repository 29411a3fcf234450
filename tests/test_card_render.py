"""The checkpoint card rendered from real storage (memory:// and a local directory), without
Metaflow: row order, failed and loaded marks, lineage, escaping, the plot, in-place updates."""
from __future__ import annotations

from dataclasses import replace

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

from conftest import XSS, CardTables


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
    # small fields live inline: what this save wrote is its manifest, never "0 B"
    assert rows[2]["cells"][4] == "b w" and rows[2]["cells"][6] == f"{saved[2].written} B" != "0 B"
    # The lineage (first, second) is numbered in the rows, not listed a second time.
    assert [r["cells"][9] for r in rows] == ["0", "1", ""] and tables.rows("lineage") == []


def test_a_raising_attempt_marks_its_own_checkpoints_failed(root_url):
    """With failed=True (rendered from task_exception) the card's own attempt is failed too."""
    checkpointer, request, _ = _saved(root_url)
    failed = replace(request, failed=True)
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
    assert not view.plot.log  # 0.5 to 0.125 spans less than 100x
    loc = TaskLocation("F", "2", "train", "1")
    checkpointer.save(loc, 0, {"w": 1}, metadata={"loss": "n/a", "ok": True})
    checkpointer.save(loc, 0, {"w": 1}, metadata={"loss": 1.0})
    bare = CardRequest(loc.pathspec, loc.position, 0, root_url, "fresh")
    assert build_view(checkpointer, bare).plot is None and "<svg" not in render_page(build_view(checkpointer, bare), "t")


def test_plot_of_values_spanning_orders_of_magnitude_is_logarithmic(root_url):
    """Losses 100, 10, 1: a log scale, the middle value drawn halfway down."""
    checkpointer = Checkpointer(open_store(root_url))
    loc = TaskLocation("F", "3", "train", "1")
    for loss in (100, 10, 1):
        checkpointer.save(loc, 0, {"w": loss}, metadata={"loss": loss})
    plot = build_view(checkpointer, CardRequest(loc.pathspec, loc.position, 0, root_url, "fresh")).plot
    (_, top, _, _), (_, middle, _, _), (_, bottom, _, _) = plot.points
    assert plot.log and middle == pytest.approx((top + bottom) / 2)


def test_nothing_loaded_and_unreadable_loaded_checkpoint(root_url):
    """No load: both 'nothing' messages. A loaded key that cannot be read: the card says so
    instead of failing to render."""
    checkpointer, request, _ = _saved(root_url)
    html = render_page(build_view(checkpointer, replace(request, loaded=None)), "t")
    assert "No checkpoint was loaded" in html and "No lineage found" in html
    gone = request.location.key("20200101T000000000000Z-a0-00000000")
    view = build_view(checkpointer, replace(request, loaded=gone))
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


def test_at_scale_the_page_shows_a_bounded_part_and_the_plot_covers_all():
    """2,000 checkpoints: the table shows the newest, the best, the loaded one and its nearest
    ancestors (numbered in the lineage column), and the plot a bounded number of points spanning all of them, with the
    best loss among them; the header still counts every checkpoint."""
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint import card

    root = "memory://card-scale"
    checkpointer = Checkpointer(open_store(root))
    loc = TaskLocation("F", "1", "train", "9")
    parent, saved = None, []
    for i in range(2000):
        loss = 0.001 if i == 1234 else 1.0 + (i % 50) / 100
        saved.append(checkpointer.save(loc, 0, {"i": i}, metadata={"loss": loss}, parent=parent))
        parent = saved[-1].key
    request = CardRequest(loc.pathspec, loc.position, attempt=0, root=root, load_policy="fresh", loaded=saved[1500].key)
    view = build_view(checkpointer, request)
    shown = [r.checkpoint.key for r in view.rows]
    assert view.total == 2000 and len(shown) <= card.NEWEST_ROWS + card.BEST_ROWS + card.LINEAGE_ROWS + 1
    assert shown[-card.NEWEST_ROWS:] == [a.key for a in saved[-card.NEWEST_ROWS:]]
    assert saved[1234].key in shown and saved[1500].key in shown
    # the nearest ancestors, all saved by this task: numbered in its rows, none listed twice
    numbered = {r.checkpoint.key: r.lineage_index for r in view.rows if r.lineage_index is not None}
    assert view.lineage_length == card.LINEAGE_ROWS and view.lineage == ()
    assert numbered == {a.key: i for i, a in enumerate(saved[1500 - card.LINEAGE_ROWS + 1:1501])}
    assert len(view.plot.points) <= card.PLOT_POINTS and view.plot.low == 0.001
    assert view.plot.points[0][2].index == 1 and view.plot.points[-1][2].index == 2000
    html = render_page(view, "t")
    assert "2000 checkpoints" in html and len(html) < 200_000
