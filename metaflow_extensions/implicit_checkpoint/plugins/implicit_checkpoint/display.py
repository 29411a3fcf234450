"""How checkpoints look to people: text tables (the CLI, ``repr``) and HTML (Jupyter).

Both renderings come from the same rows, so the CLI and a notebook show the same thing.
Everything user-provided (names, metadata) is escaped in HTML.
"""
from __future__ import annotations

import html
import json
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

from .manifest import CheckpointArtifact

if TYPE_CHECKING:
    from .gc import GcReport

COLUMNS = ("KEY", "ATTEMPT", "NAME", "CREATED (UTC)", "SIZE", "FLAGS", "METADATA")
STEP_COLUMNS = ("KEY", "ATTEMPT", "STEP", "NAME", "CREATED (UTC)", "SIZE", "FLAGS", "METADATA")  # when any has a step
_RIGHT = {"ATTEMPT", "STEP", "SIZE"}
_METADATA_WIDTH = 40


def human_bytes(n: int) -> str:
    """``0 B``, ``812 B``, ``1.5 KiB``, ``23.4 MiB``, ..."""
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def flags(artifact: CheckpointArtifact) -> str:
    marks = (["pinned"] if artifact.pinned else []) + ([] if artifact.latest else ["not-latest"])
    return ",".join(marks)


def metadata_text(metadata: dict, width: int = _METADATA_WIDTH) -> str:
    """``loss=0.0123 epoch=24``: floats to 4 significant digits, cut at ``width``."""
    parts = []
    for key, value in metadata.items():
        shown = f"{value:.4g}" if isinstance(value, float) else json.dumps(value, default=str)
        parts.append(f"{key}={shown}")
    text = " ".join(parts)
    return text if len(text) <= width else text[: width - 1] + "…"


def row(artifact: CheckpointArtifact, with_step: bool = False) -> tuple[str, ...]:
    created = artifact.created_on[:19].replace("T", " ")
    step = ("" if artifact.step is None else str(artifact.step),) if with_step else ()
    return (artifact.key, str(artifact.attempt), *step, artifact.name, created, human_bytes(artifact.size),
            flags(artifact), metadata_text(artifact.metadata))


def _table(artifacts: Sequence[CheckpointArtifact]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """The headers and rows of a list: a STEP column when any checkpoint has a step."""
    with_step = any(a.step is not None for a in artifacts)
    return (STEP_COLUMNS if with_step else COLUMNS), [row(a, with_step) for a in artifacts]


def text_table(headers: Optional[Sequence[str]], rows: Iterable[Sequence[str]], right: set = frozenset()) -> str:
    """Columns padded to their widest cell, two spaces apart; ``right`` ones right-aligned.
    ``headers=None``: no header line."""
    lines = ([tuple(headers)] if headers else []) + [tuple(r) for r in rows]
    widths = [max(len(cells[i]) for cells in lines) for i in range(len(lines[0]))]
    names = headers or [""] * len(widths)

    def line(cells):
        return "  ".join(c.rjust(w) if h in right else c.ljust(w) for c, w, h in zip(cells, widths, names)).rstrip()

    return "\n".join(map(line, lines))


def checkpoints_text(artifacts: Sequence[CheckpointArtifact]) -> str:
    if not artifacts:
        return "(no checkpoints)"
    return text_table(*_table(artifacts), _RIGHT)


def checkpoints_html(artifacts: Sequence[CheckpointArtifact]) -> str:
    if not artifacts:
        return "<p>(no checkpoints)</p>"
    return _html_table(*_table(artifacts))


def artifact_text(artifact: CheckpointArtifact, retired: bool = False) -> str:
    """One checkpoint in full: what it is, then one line per field."""
    facts = text_table(None, _facts(artifact, retired))
    return facts + "\n\n" + text_table(FIELD_COLUMNS, field_rows(artifact), {"SIZE"})


def artifact_html(artifact: CheckpointArtifact) -> str:
    return _html_table(None, _facts(artifact, False)) + _html_table(FIELD_COLUMNS, field_rows(artifact))


FIELD_COLUMNS = ("FIELD", "TYPE", "SIZE", "SHAPE", "SHARES OBJECTS WITH")


def field_rows(artifact: CheckpointArtifact) -> list[tuple[str, ...]]:
    """One row per field: type, bytes held, shape/dtype/device of tensors and arrays, and the
    fields it shares objects with."""
    rows = []
    for name, f in artifact.fields.items():
        shape = "" if f.shape is None else "x".join(map(str, f.shape)) or "scalar"
        shape = " ".join(filter(None, [shape, f.dtype or "", f.device or ""]))
        if f.files is not None:
            shape = f"{len(f.files)} files" + (f", {len(f.skipped)} skipped" if f.skipped else "")
        rows.append((name, f.type, human_bytes(f.size), shape, ", ".join(f.shares)))
    return rows


def gc_text(report: GcReport) -> str:
    """The gc report as a few readable lines."""
    would = "would be " if report.dry_run else ""
    return "\n".join([
        f"{report.flow} at {report.url}{' (dry run: nothing changed)' if report.dry_run else ''}",
        f"  checkpoints  {report.checkpoints} ({report.retired_waiting} deleted, loadable until their grace period ends)",
        f"  purged       {report.purged} deleted checkpoints {would}removed",
        f"  logical      {human_bytes(report.logical_bytes)} (sum of checkpoint sizes)",
        f"  physical     {human_bytes(report.physical_bytes)} in {report.payloads} payloads",
        f"  freed        {human_bytes(report.freed_bytes)} in {report.freed_payloads} unreferenced payloads {would}deleted"
        f" ({report.young_unreferenced} younger than the grace period kept)",
    ])


class CheckpointList(list):
    """A plain list of ``CheckpointArtifact`` that shows itself as a table (text in a REPL,
    HTML in Jupyter)."""

    def __repr__(self) -> str:
        return checkpoints_text(self)

    def _repr_html_(self) -> str:
        return checkpoints_html(self)


def _facts(artifact: CheckpointArtifact, retired: bool) -> list[tuple[str, str]]:
    status = ", ".join(filter(None, [flags(artifact), "deleted (purged after the grace period)" if retired else ""]))
    status = status or "live"
    return [
        ("key", artifact.key),
        ("name", artifact.name),
        ("task", f"{artifact.pathspec} (attempt {artifact.attempt})"),
        ("step", "-" if artifact.step is None else str(artifact.step)),
        ("created", artifact.created_on),
        ("size", f"{human_bytes(artifact.size)} ({human_bytes(artifact.written)} written by this save)"),
        ("status", status),
        ("parent", artifact.parent or "-"),
        ("resumed from", artifact.resumed_from or "-"),
        ("metadata", json.dumps(artifact.metadata, sort_keys=True)),
        ("url", artifact.url or "-"),
    ]


def _html_table(headers: Optional[Sequence[str]], rows: Iterable[Sequence[str]]) -> str:
    esc = html.escape
    head = "".join(f"<th style='text-align:left'>{esc(h)}</th>" for h in headers or ())
    body = "".join(
        "<tr>" + "".join(f"<td style='text-align:left'>{esc(c)}</td>" for c in r) + "</tr>" for r in rows
    )
    thead = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f"<table>{thead}<tbody>{body}</tbody></table>"
