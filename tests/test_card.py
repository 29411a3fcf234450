"""The checkpoint card of real Metaflow runs, read as `card get` and the card client show it:
the README demo over three attempts, 50 checkpoints per foreach branch, a user's own @card,
opting out, a failed task, and the templates shipping with the package."""
from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
from metaflow import Checkpoint, Run
from metaflow.cards import get_cards
from metaflow.plugins.cards.exception import CardNotPresentException

from metaflow_extensions.implicit_checkpoint.plugins.cards.implicit_checkpoint_card import (
    ImplicitCheckpointCard,
    StaleCardRender,
)
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.card import CARD_TYPE

from conftest import FLOWS, REPO, TEST_FLOWS, XSS, CardTables


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


def attempts_of(rows) -> list[int]:
    return [int(r["data-attempt"]) for r in rows]


def test_demo_card_lists_three_attempts_oldest_first(demo):
    """`card get train` after the demo shows one card: every stored checkpoint in creation
    order (the demo saves every few milliseconds, so batching writes some of its 24 saves:
    tests/test_incremental.py), each attempt ending with the epoch it was killed at, attempts
    0 and 1 (SIGKILLed) marked failed, the final render of attempt 2."""
    task, html = demo
    rows = CardTables(html).rows("checkpoints")
    listed = list(reversed(Checkpoint().list(task=task)))
    assert [r["data-key"] for r in rows] == [c.key for c in listed]
    attempts = attempts_of(rows)
    assert attempts == sorted(attempts) and set(attempts) == {0, 1, 2}
    last_epochs = [[c.metadata["epoch"] for c in listed if c.attempt == a][-1] for a in (0, 1, 2)]
    assert last_epochs == [8, 16, 24]
    assert [r["data-created"] for r in rows] == sorted(r["data-created"] for r in rows)
    assert [("failed" in r["class"]) for r in rows] == [a < 2 for a in attempts]
    assert 'window.METAFLOW_RELOAD_TOKEN = "final"' in html and "<svg" in html
    assert f"<dt>Attempt</dt><dd>2</dd>" in html


def test_written_is_never_zero(demo):
    """The demo's state is small, so every field lives inside its checkpoint's manifest; each
    save still wrote that manifest: no row, and not the total, reads "0 B"."""
    _, html = demo
    rows = CardTables(html).rows("checkpoints")
    assert "0 B" not in {r["cells"][6] for r in rows} and " 0 B written" not in html


def test_demo_card_lineage_is_the_chain_attempt_2_resumed_from(demo):
    """Attempt 2 loaded epoch 16 (attempt 1), which descends from epoch 8 (attempt 0): the rows
    of attempts 0 and 1 carry lineage places 0, 1, ..., the loaded row (the last of them) is
    marked, attempt 2's own rows are not in the lineage, and no checkpoint is listed twice."""
    task, html = demo
    tables = CardTables(html)
    rows = tables.rows("checkpoints")
    loaded = task.metadata_dict["implicit-checkpoint-loaded"]
    n = sum(a < 2 for a in attempts_of(rows))
    assert [r["cells"][9] for r in rows] == [str(i) for i in range(n)] + [""] * (len(rows) - n)
    assert [r["data-key"] for r in rows if "loaded" in r["class"]] == [loaded] == [rows[n - 1]["data-key"]]
    assert tables.rows("lineage") == [] and f"{n} checkpoints, 0 the oldest ancestor, {n - 1} the loaded one" in html


@pytest.fixture(scope="module")
def card_flow(run_flow):
    return Run(f"CardFlow/{run_flow(TEST_FLOWS / 'card_flow.py', 'run').run_id}")


def _cards(task, card_type=None):
    try:
        return list(get_cards(task, type=card_type))
    except CardNotPresentException:
        return []


def test_fifty_checkpoints_per_foreach_branch(card_flow):
    """Each foreach branch's card counts its own 50 checkpoints and lists the newest 25 in
    order (no metric to pick the best by), says nothing was loaded, and is the final render."""
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.card import NEWEST_ROWS

    for task in card_flow["many"]:
        (card,) = _cards(task, CARD_TYPE)
        html = card.get()
        rows = CardTables(html).rows("checkpoints")
        expected = list(reversed(Checkpoint().list(task=task)))[-NEWEST_ROWS:]
        assert "50 checkpoints" in html and f"{NEWEST_ROWS} of 50" in html
        assert len(rows) == NEWEST_ROWS and [r["data-key"] for r in rows] == [c.key for c in expected]
        assert [r["cells"][2] for r in rows] == [f"{'ab'[task.index]}-{i:02d}" for i in range(50 - NEWEST_ROWS, 50)]
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


def test_no_card_with_card_false_and_a_card_from_the_start_without_a_save(card_flow):
    """`@checkpoint(card=False)` attaches no card; a step that neither saves nor loads still
    has its card (the Metaflow UI waits for it), saying nothing was saved."""
    assert _cards(card_flow["opt_out"].task) == []
    assert Checkpoint().list(task=card_flow["opt_out"].task)  # it did save
    (idle,) = _cards(card_flow["idle"].task)  # rendered at its start; no final render needed
    assert "No checkpoints saved yet" in idle.get()


def test_every_step_has_as_many_cards_as_decorators_named_card(card_flow):
    """metaflow-ui waits for as many cards as the step has decorators named `card` in the run's
    graph (`_graph_info`); under another name it stops waiting before the checkpoint card
    exists. Each task ends with exactly that many cards."""
    graph = card_flow["_parameters"].task["_graph_info"].data["steps"]
    counted = {}
    for step in card_flow:
        expected = sum(d["name"] == "card" for d in graph[step.id]["decorators"])
        counted[step.id] = expected
        assert all(len(_cards(task)) == expected for task in step), step.id
    assert counted["user_card_first"] == counted["user_card_last"] == 2 and counted["opt_out"] == 0
    assert counted["idle"] == counted["many"] == 1 and counted["gather"] == 0


def test_a_new_attempt_and_the_last_save_reach_the_card_within_seconds(run_flow):
    """Read as the Metaflow UI reads it while the step runs: a retry's card shows the failed
    attempt's rows marked before the retry saves or loads anything, and three saves within a
    second followed by silence all show, in the data an open page applies and in the page
    "Link to card" serves (Metaflow's own refresh would drop the last two)."""
    result = run_flow(TEST_FLOWS / "card_quiet_flow.py", "run")
    task = Run(f"CardQuietFlow/{result.run_id}")["start"].task
    assert task.current_attempt == 1, result.output[-2000:]
    attempt, last_save = task["attempt_shown_after"].data, task["last_save_shown_after"].data
    assert attempt is not None and attempt < 10, result.output[-2000:]
    assert last_save is not None and last_save < 10, result.output[-2000:]


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


def test_eager_resume_card_shows_lineage_from_the_failed_run(run_flow):
    """After `resume`, the new task's card lists its own checkpoints (items 13 to 20; saves
    milliseconds apart are batched, the last one always written) and the lineage of the one it
    loaded: the checkpoints saved by the failed run's task, named as such."""
    failed = run_flow(FLOWS / "resume_eager.py", "run", env={"FAIL_AT": "12"}, expect_ok=False)
    resumed = run_flow(FLOWS / "resume_eager.py", "resume")
    old_task = Run(f"ResumeFlow/{failed.run_id}")["process"].task
    html = card_html(run_flow, FLOWS / "resume_eager.py", f"{resumed.run_id}/process")
    tables = CardTables(html)
    done = [int(r["cells"][8].removeprefix("done=")) for r in tables.rows("checkpoints")]
    assert done == sorted(done) and 13 <= done[0] and done[-1] == 20
    lineage = tables.rows("lineage")
    assert [r["data-key"] for r in lineage] == [c.key for c in reversed(Checkpoint().list(task=old_task))]
    assert {r["cells"][4] for r in lineage} == {old_task.pathspec}
    assert "No lineage found" not in html and f"in <code>{old_task.pathspec}</code>" in html


def test_a_render_for_an_earlier_attempt_is_refused(demo):
    """A background render started by attempt 1 (killed outright) that finishes after attempt 2
    started must not write attempt 1's page or data over attempt 2's: it raises instead."""
    task, _ = demo
    options = {
        "root": task.metadata_dict["implicit-checkpoint-root"], "load_policy": "fresh",
        "position": "root", "attempt": 1,
    }
    stale = ImplicitCheckpointCard(options=options)
    for render in (stale.render_runtime, stale.refresh):
        with pytest.raises(StaleCardRender, match="is at attempt 2; not rendering attempt 1's card"):
            render(task, {})
    current = ImplicitCheckpointCard(options={**options, "attempt": 2})
    assert len(CardTables(current.render_runtime(task, {})).rows("checkpoints")) == len(Checkpoint().list(task=task))
