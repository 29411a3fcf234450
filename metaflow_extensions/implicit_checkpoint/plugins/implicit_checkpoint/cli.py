"""The ``checkpoint`` commands, for ``python flow.py checkpoint ...`` and ``mfcheckpoint ...``.

One set of commands serves both entry points. Metaflow's flow-level group (registered through
``CLIS_DESC``) knows the flow: its name, its step names and the storage roots of its
``@checkpoint`` steps. The standalone ``mfcheckpoint`` needs no flow file: it takes ``--root``,
or finds each task's storage in its metadata. Tables and JSON go to stdout; progress and
notes to stderr; errors are one plain sentence on stderr and an exit code (``EXIT``).
"""
from __future__ import annotations

import functools
import json
import sys
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Optional

from metaflow._vendor import click

from .display import artifact_text, checkpoints_text, gc_text
from .exceptions import CheckpointError, CheckpointFormatError, CheckpointNotFound, CheckpointPinned
from .manifest import parse_key
from .storage_options import datastore_url

EXIT = {"ok": 0, "not found": 1, "usage": 2, "refused": 3, "failed": 4}
NO_USER = (
    "Metaflow could not determine your user name, which it needs to find the latest run in "
    "your namespace. Set USERNAME (export USERNAME=$(whoami)), or name the run: "
    "Flow/1732, Flow/1732/train, Flow/1732/train/4."
)
NOT_LOADED = (
    "Metaflow did not load metaflow-implicit-checkpoint ({error}). Metaflow loads extensions "
    "only from a normal install or a compat editable one: "
    "pip install -e . --config-settings editable_mode=compat"
)


class CliError(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Session:
    """What the commands need from their entry point (``ctx.obj`` below the group)."""

    flow: Optional[str]  # the flow file's flow; None for mfcheckpoint
    steps: frozenset  # its step names, to tell `list train` from `list 1732`
    root: Optional[str]  # --root: overrides the storage recorded in task metadata
    gc_roots: Callable[[], list]  # the storage roots gc sweeps
    note: Callable[[str], None]  # progress and messages, to stderr


def _handled(command):
    """Errors in plain words and an exit code scripts can rely on; no tracebacks."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        from metaflow.exception import MetaflowNamespaceMismatch, MetaflowNotFound, MetaflowUnknownUser

        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                command(*args, **kwargs)
            for warning in caught:  # ours (a lineage cut short), not libraries' deprecations
                if warning.category is UserWarning:
                    click.echo(f"Note: {warning.message}", err=True)
            return
        except CliError as exc:
            message, code = str(exc), exc.code
        except (CheckpointNotFound, MetaflowNotFound, MetaflowNamespaceMismatch) as exc:
            message, code = str(exc).strip(), EXIT["not found"]
        except MetaflowUnknownUser:
            message, code = NO_USER, EXIT["usage"]
        except CheckpointPinned as exc:
            message, code = str(exc), EXIT["refused"]
        except (CheckpointError, OSError) as exc:
            message, code = str(exc) or type(exc).__name__, EXIT["failed"]
        click.echo(f"Error: {message}", err=True)
        sys.exit(code)

    return run


def _session() -> Session:
    return click.get_current_context().obj


def _key(text: str) -> str:
    try:
        parse_key(text)
    except CheckpointFormatError as exc:
        raise CliError(str(exc), EXIT["usage"]) from None
    return text


def _client():
    from .client import Checkpoint

    return Checkpoint(_session().root)


# ----- the commands ---------------------------------------------------------------------------
@click.command(name="list", help="List checkpoints of a run, step or task (default: the latest run), newest first.")
@click.argument("target", required=False)
@click.option("--attempt", type=int, default=None, help="Only this attempt's checkpoints.")
@click.option("--name", default=None, help="Only checkpoints saved with this name.")
@click.option("--step", type=click.IntRange(min=0), default=None, help="Only checkpoints saved with save(step=STEP).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: a list of checkpoint dicts.")
@_handled
def list_command(target, attempt, name, step, as_json):
    from .resolve import tasks_of

    session, client = _session(), _client()
    found = [a for task in tasks_of(session, target) for a in client.list(task, name=name, attempt=attempt, step=step)]
    if as_json:
        click.echo(json.dumps([a.to_dict() for a in found], indent=2))
    elif found:
        click.echo(checkpoints_text(found))
    else:
        session.note("No checkpoints.")


@click.command(help="Show one checkpoint: what it is and every field it holds (from its manifest alone).")
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: the checkpoint dict plus 'deleted'.")
@_handled
def inspect(key, as_json):
    from .marks import PINS, RETIRED, is_marked

    key = _key(key)
    checkpointer = _client().checkpointer_for(key)
    artifact = checkpointer.read(key)
    loc, checkpoint_id = parse_key(key)
    artifact = replace(artifact, pinned=is_marked(checkpointer.store, loc, PINS, checkpoint_id))
    deleted = is_marked(checkpointer.store, loc, RETIRED, checkpoint_id)
    if as_json:
        click.echo(json.dumps({**artifact.to_dict(), "deleted": deleted}, indent=2))
    else:
        click.echo(artifact_text(artifact, deleted))


@click.command(help="Show where a checkpoint came from: its ancestors, oldest first, across attempts and runs.")
@click.argument("key")
@_handled
def lineage(key):
    click.echo(checkpoints_text(_client().lineage(_key(key))))


@click.command(help="Pin a checkpoint: retention and delete leave it alone.")
@click.argument("key")
@_handled
def pin(key):
    _client().pin(_key(key))
    click.echo(f"Pinned {key}")


@click.command(help="Unpin a checkpoint: retention applies to it again.")
@click.argument("key")
@_handled
def unpin(key):
    _client().unpin(_key(key))
    click.echo(f"Unpinned {key}")


@click.command(help="Delete a checkpoint (KEY), or every checkpoint of a run (a run pathspec). Pinned ones are kept.")
@click.argument("target")
@_handled
def delete(target):
    from .resolve import run_pathspec

    session, client = _session(), _client()
    if target.count("/") == 5:
        done = client.delete(_key(target))
        click.echo(f"Deleted {target}" if done else f"{target} was already deleted")
        return
    result = client.delete_run(run_pathspec(session, target))
    click.echo(f"Deleted {len(result.deleted)} checkpoints of run {result.run}")
    if result.pinned:
        session.note(f"Kept {len(result.pinned)} pinned (unpin to delete):")
        for key in result.pinned:
            session.note(f"  {key}")


@click.command(help="Reclaim storage: purge checkpoints deleted longer than the grace period ago, "
                    "then delete payloads no remaining checkpoint references.")
@click.option("--dry-run", is_flag=True, help="Report what would be freed; change nothing.")
@click.option("--grace", type=click.FloatRange(min=0), default=3600.0, show_default=True,
              help="Seconds a deleted checkpoint stays loadable, and an unreferenced payload is kept.")
@_handled
def gc(dry_run, grace):
    from . import gc as collector
    from .store import open_store

    session = _session()
    for root in session.gc_roots():
        store = open_store(root)
        flows = [session.flow] if session.flow else collector.flows_under(store)
        for flow in flows:
            report = collector.collect(store, flow, grace, dry_run, session.note)
            click.echo(gc_text(report))


COMMANDS = (list_command, inspect, lineage, pin, unpin, delete, gc)


# ----- entry points ---------------------------------------------------------------------------
@click.group()
def cli():
    """What Metaflow loads through CLIS_DESC: adds `checkpoint` to every flow's commands."""


@cli.group(help="Manage this flow's @checkpoint checkpoints: list, inspect, lineage, pin, unpin, delete, gc.")
@click.pass_context
def checkpoint(ctx):
    from metaflow import metadata

    obj = ctx.obj
    # As `card` does: make the client use the metadata provider given on this command line.
    metadata("@".join([obj.metadata.TYPE, obj.metadata.default_info()]))
    ctx.obj = Session(
        flow=obj.flow.name, steps=frozenset(node.name for node in obj.graph), root=None,
        gc_roots=lambda: _flow_roots(obj), note=lambda message: obj.echo(message, no_bold=True),
    )


@click.group(help="Manage @checkpoint checkpoints without a flow file.")
@click.option("--root", default=None, help="Checkpoint storage URL. Default: what each task recorded "
              "in its metadata; for gc, the configured default root.")
@click.pass_context
def mfcheckpoint(ctx, root):
    ctx.obj = Session(flow=None, steps=frozenset(), root=root, gc_roots=lambda: [root or _default_root()],
                      note=lambda message: click.echo(message, err=True))


for _command in COMMANDS:
    checkpoint.add_command(_command)
    mfcheckpoint.add_command(_command)


def main() -> None:
    """The ``mfcheckpoint`` console script."""
    try:
        from metaflow import Checkpoint  # noqa: F401  (only there if Metaflow loaded us)
    except ImportError as error:
        click.echo(f"Error: {NOT_LOADED.format(error=error)}", err=True)
        sys.exit(EXIT["failed"])
    mfcheckpoint(prog_name="mfcheckpoint")


def _flow_roots(obj) -> list:
    """The storage roots of the flow's @checkpoint steps (as their tasks resolve them)."""
    from .decorator import storage_root

    roots = {deco._root_url() for step in obj.flow for deco in step.decorators if deco.name == "checkpoint"}
    datastore = obj.flow_datastore
    return sorted(roots) or [storage_root(None, datastore_url(datastore.TYPE, datastore.datastore_root))]


def _default_root() -> str:
    from metaflow.metaflow_config import DEFAULT_DATASTORE
    from metaflow.plugins import DATASTORES

    from .decorator import storage_root

    impl = next(d for d in DATASTORES if d.TYPE == DEFAULT_DATASTORE)
    datastore_root = impl.get_datastore_root_from_config(lambda *args, **kwargs: None, create_on_absent=False)
    if datastore_root is None:
        raise CliError(f"Found no {DEFAULT_DATASTORE} datastore here; pass --root URL.", EXIT["usage"])
    return storage_root(None, datastore_url(DEFAULT_DATASTORE, datastore_root))
