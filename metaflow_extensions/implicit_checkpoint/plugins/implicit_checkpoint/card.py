"""The checkpoint card as data and HTML, without Metaflow.

``build_view`` reads a task's checkpoints from storage; ``render_page`` (the whole card) and
``render_sections`` (its parts, for in-place updates while the step runs) render that view
with the jinja2 templates in ``templates/`` (the repository's ``cards/``). Autoescaping is on:
names, metadata and field names are user data and always show as text.

At scale (a task with 10,000 checkpoints) the page stays small and quick to render: the plot
covers every checkpoint (thinned to ``PLOT_POINTS``, keeping each stretch's lowest and highest
value), while the table shows the newest ``NEWEST_ROWS``, the best ``BEST_ROWS`` by the plotted
metric and the loaded one, and the lineage its nearest ``LINEAGE_ROWS`` ancestors; the header
counts them all (benchmarks/card_scale.py).

Which checkpoints are marked failed: Metaflow starts attempt N of a task only after attempt
N-1 failed, so every checkpoint of an attempt before the card's own comes from a failed
attempt. The card's own attempt is marked failed only when it raised (the card is then
rendered before the attempt ends). An attempt killed outright (SIGKILL, lost machine) is
marked by the next attempt's card.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from .checkpointer import Checkpointer
from .exceptions import CheckpointError
from .lineage import lineage as follow_lineage
from .manifest import CheckpointArtifact, TaskLocation
from .parallel import NodeRow, node_rows

CARD_TYPE = "implicit_checkpoint"
CARD_ID = "implicit_checkpoint"
TEMPLATES = Path(__file__).resolve().with_name("templates")
SECTIONS = ("header", "nodes", "plot", "checkpoints", "lineage")
PREFERRED_METRIC = "loss"
PLOT_WIDTH, PLOT_HEIGHT, PLOT_PAD = 640, 170, 28
NEWEST_ROWS, BEST_ROWS, LINEAGE_ROWS, PLOT_POINTS = 25, 5, 25, 400


@dataclass(frozen=True)
class CardRequest:
    """Which task attempt a card is about and what that attempt did (plain JSON values)."""

    pathspec: str
    position: str
    attempt: int
    root: str
    load_policy: str
    loaded: Optional[str] = None  # key of the checkpoint this attempt loaded
    failed: bool = False  # rendered because this attempt raised
    parallel: Optional[list] = None  # @parallel: [node index, number of nodes]
    nodes: list = field(default_factory=list)  # @parallel, node 0: [task id, position] of every node

    @property
    def location(self) -> TaskLocation:
        flow, run, step, task = self.pathspec.split("/")
        return TaskLocation(flow, run, step, task, self.position)

    def is_failed(self, checkpoint: CheckpointArtifact) -> bool:
        """Whether ``checkpoint`` was saved by a failed attempt of this task."""
        if checkpoint.pathspec != self.pathspec:
            return False  # another run's checkpoint, in the lineage of an eager load
        return checkpoint.attempt < self.attempt or (checkpoint.attempt == self.attempt and self.failed)


@dataclass(frozen=True)
class Row:
    """One checkpoint in a table of the card."""

    index: int
    checkpoint: CheckpointArtifact
    failed: bool
    loaded: bool
    lineage_index: Optional[int] = None  # its place in the loaded checkpoint's lineage, if any


@dataclass(frozen=True)
class Plot:
    """A metadata value over the checkpoints, as SVG coordinates."""

    metric: str
    points: tuple[tuple[float, float, Row, float], ...]  # x, y, row, value
    low: float
    high: float
    log: bool

    @property
    def polyline(self) -> str:
        return " ".join(f"{x:.1f},{y:.1f}" for x, y, _, _ in self.points)


@dataclass(frozen=True)
class CardView:
    """Everything the card shows."""

    request: CardRequest
    rows: tuple[Row, ...]  # the ones shown (see the module docstring), oldest first
    loaded: Optional[CheckpointArtifact]
    lineage: tuple[Row, ...]  # the ancestors saved by other tasks (this task's are in `rows`)
    lineage_length: int
    plot: Optional[Plot]
    problem: Optional[str]
    rendered_on: str
    total: int = 0  # checkpoints of the task, shown or not
    written: int = 0  # bytes they wrote
    nodes: tuple[NodeRow, ...] = ()  # @parallel, on node 0's card: every node

    @property
    def hidden(self) -> int:
        return self.total - len(self.rows)

    @property
    def has_steps(self) -> bool:
        """Whether any shown checkpoint was saved with ``save(step=N)`` (the Step column)."""
        return any(r.checkpoint.step is not None for r in self.rows)


def build_view(checkpointer: Checkpointer, request: CardRequest) -> CardView:
    """Read the task's checkpoints (oldest first) and the lineage of the loaded one. Ancestors
    this task saved are numbered in its rows; only those of other tasks (an eager load's
    earlier run) get rows of their own, so no checkpoint is listed twice."""
    chain: list[CheckpointArtifact] = []
    problem = None
    if request.loaded:
        try:
            chain = follow_lineage(checkpointer, request.loaded, limit=LINEAGE_ROWS)
        except CheckpointError as exc:
            problem = f"The loaded checkpoint {request.loaded} cannot be read: {exc}"
    place = {a.key: i for i, a in enumerate(chain)}
    try:
        found = checkpointer.list(request.location)[::-1]  # oldest first, in ids.py's clock-free order
    except CheckpointError as exc:  # the card says so, instead of failing to render
        found, problem = [], f"The checkpoints cannot be read: {exc}"
    rows = tuple(
        Row(i + 1, a, request.is_failed(a), a.key == request.loaded, place.get(a.key)) for i, a in enumerate(found)
    )
    listed = {a.key for a in found}
    elsewhere = tuple(
        Row(i, a, request.is_failed(a), a.key == request.loaded, i) for i, a in enumerate(chain) if a.key not in listed
    )
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    plot = make_plot(rows)
    return CardView(request, _shown(rows, plot), chain[-1] if chain else None, elsewhere, len(chain), plot, problem,
                    now, total=len(rows), written=sum(r.checkpoint.written for r in rows),
                    nodes=node_rows(checkpointer, request.location, request.nodes))


def _shown(rows: tuple[Row, ...], plot: Optional[Plot]) -> tuple[Row, ...]:
    """The rows the table shows: the newest, the best by the plotted metric, the loaded one."""
    if len(rows) <= NEWEST_ROWS + BEST_ROWS:
        return rows
    keep = {r.index for r in rows[-NEWEST_ROWS:]} | {r.index for r in rows if r.loaded or r.lineage_index is not None}
    if plot is not None:
        valued = [r for r in rows if _is_number(r.checkpoint.metadata.get(plot.metric))]
        best = sorted(valued, key=lambda r: r.checkpoint.metadata[plot.metric])  # lowest first: a loss
        keep |= {r.index for r in best[:BEST_ROWS]}
    return tuple(r for r in rows if r.index in keep)


def make_plot(rows: tuple[Row, ...]) -> Optional[Plot]:
    """``loss`` (else the first numeric metadata key) over the checkpoints that have it, on a
    log scale when the values are positive and span two orders of magnitude (a loss curve)."""
    metric = _pick_metric(rows)
    if metric is None:
        return None
    valued = _thinned([(r, float(r.checkpoint.metadata[metric])) for r in rows if _is_number(r.checkpoint.metadata.get(metric))])
    low, high = min(v for _, v in valued), max(v for _, v in valued)
    log = low > 0 and high >= 100 * low
    scale = math.log10 if log else float
    top, span = scale(high), scale(high) - scale(low)
    inner_w, inner_h = PLOT_WIDTH - 2 * PLOT_PAD, PLOT_HEIGHT - 2 * PLOT_PAD
    points = tuple(
        (
            PLOT_PAD + inner_w * (r.index - 1) / max(len(rows) - 1, 1),
            PLOT_PAD + (inner_h * (top - scale(v)) / span if span else inner_h / 2),
            r,
            v,
        )
        for r, v in valued
    )
    return Plot(metric, points, low, high, log)


def _thinned(valued: list) -> list:
    """At most ``PLOT_POINTS`` points, keeping the lowest and highest of each stretch, so the
    curve's shape and its extremes survive."""
    if len(valued) <= PLOT_POINTS:
        return valued
    stretch = -(-len(valued) // (PLOT_POINTS // 2))
    kept = []
    for start in range(0, len(valued), stretch):
        part = valued[start:start + stretch]
        ends = {id(min(part, key=lambda rv: rv[1])), id(max(part, key=lambda rv: rv[1]))}
        kept.extend(rv for rv in part if id(rv) in ends)
    return kept


def _pick_metric(rows: tuple[Row, ...]) -> Optional[str]:
    counts: dict[str, int] = {}
    for row in rows[-1000:]:  # the recent ones decide
        for key, value in row.checkpoint.metadata.items():
            if _is_number(value):
                counts[key] = counts.get(key, 0) + 1
    plottable = [k for k, n in counts.items() if n >= 2]
    if PREFERRED_METRIC in plottable:
        return PREFERRED_METRIC
    return plottable[0] if plottable else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def render_sections(view: CardView) -> dict[str, str]:
    """The card's sections as HTML, by element id: what an in-place update replaces."""
    macros = _environment().get_template("sections.html").module
    return {f"ickpt-{name}": getattr(macros, name)(view) for name in SECTIONS}


def render_page(view: CardView, reload_token: str) -> str:
    """The whole card: a standalone HTML page with no external resources."""
    page = _environment().get_template("card.html")
    return page.render(view=view, sections=render_sections(view), reload_token=reload_token)


@functools.lru_cache(maxsize=1)
def _environment():
    # Imported here: Metaflow imports every card type in every process it starts.
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(size=format_size, seconds=format_seconds, when=format_when, value=format_value)
    env.globals["PLOT"] = {"width": PLOT_WIDTH, "height": PLOT_HEIGHT, "pad": PLOT_PAD}
    return env


def format_size(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


def format_seconds(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def format_when(created_on: str) -> str:
    """``2026-01-02T03:04:05.678901Z`` as ``2026-01-02 03:04:05.678``."""
    return created_on.replace("T", " ")[:23]


def format_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:.6g}"
    return json.dumps(value)
