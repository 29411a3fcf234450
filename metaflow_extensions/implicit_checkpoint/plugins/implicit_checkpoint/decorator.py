"""``@checkpoint``: the Metaflow hooks, and nothing else."""
from __future__ import annotations

import inspect
import sys

from metaflow.decorators import StepDecorator
from metaflow.exception import MetaflowException
from metaflow.metadata_provider import MetaDatum
from metaflow.metaflow_current import current

from .api import CurrentCheckpoint, StepContext
from .card_decorator import attach_card
from .checkpointer import Checkpointer
from .exceptions import CheckpointError, CheckpointSaveError
from .client import LOADED_FIELD, POSITION_FIELD, ROOT_FIELD
from .manifest import TaskLocation
from .preemption import Preemption
from .retention import parse_keep
from .step_errors import CheckpointStepException
from .storage_options import datastore_url
from .store import open_store

LOAD_POLICIES = ("fresh", "eager", "none")
METAFLOW_OWNED = frozenset({"name", "input", "index", "foreach_stack"})
ROOT_DIRNAME = "mf.implicit_checkpoints"


class CheckpointConfigException(MetaflowException):
    headline = "Invalid @checkpoint"


class CheckpointDecorator(StepDecorator):
    """
    Makes a step crash-safe: `current.checkpoint.save()` snapshots the step's attributes
    and `current.checkpoint.load()` puts them back on `self`, in a later `@retry` attempt
    or (with `load_policy="eager"`) a later run.

    The state is every public attribute on `self` at save time except Metaflow's own
    (`name`, `input`, `index`, `foreach_stack`, Parameters), `_`-prefixed names and bound
    methods. Each attribute is stored once per distinct content, so unchanged attributes
    are never rewritten.

    Parameters
    ----------
    include : List[str], optional, default None
        Save only these attributes. Mutually exclusive with `exclude`.
    exclude : List[str], optional, default None
        Never save these attributes (locks, sockets, clients, scratch data).
    load_policy : str, default "fresh"
        "fresh": resume from the latest checkpoint of this task's earlier attempts.
        "eager": that, else the latest checkpoint of the same step and foreach position
        from an earlier run in this run's namespace (for `resume` and re-runs).
        "none": never look up a checkpoint to resume from.
    root : str, optional, default None
        fsspec URL of the checkpoint storage. Default: METAFLOW_IMPLICIT_CHECKPOINT_ROOT,
        else `mf.implicit_checkpoints` beside Metaflow's datastore root (local, S3, Azure or GCS).
    async_saves : bool, default True
        Write large saves in the background while the step runs on. False: every `save()`
        returns only when its checkpoint is durable.
    card : bool, default True
        Attach a live card listing the task's checkpoints over all attempts and the lineage
        of the loaded one (`python flow.py card get STEP`). It renders only in attempts that
        save or load. `card=False` attaches none.
    keep : Dict[str, Any], optional, default None
        Retention: e.g. `{"last": 3, "best": ("loss", "min", 2)}` keeps the newest 3 and the
        2 with the lowest `metadata["loss"]` (plus pinned ones, the ones attempts loaded, and
        always the newest); the rest are deleted after each save. None keeps everything.

    MF Add To Current
    -----------------
    checkpoint -> CurrentCheckpoint
        `save(name, metadata, latest, wait, pin, step)`, `wait()`, `load(reference, step)`,
        `is_loaded`, `latest`, `inspect(reference)`, `list(name, attempt, task, step)`,
        `lineage(reference)`, `preempted` (SIGTERM or a spot-termination notice arrived:
        save and return; the task then ends as SIGTERM would, and `@retry` resumes).
    """

    name = "checkpoint"
    defaults = {
        "include": None, "exclude": None, "load_policy": "fresh", "root": None,
        "async_saves": True, "card": True, "keep": None,
    }

    def step_init(self, flow, graph, step_name, decorators, environment, flow_datastore, logger):
        self._step = step_name
        include, exclude = self._names("include"), self._names("exclude")
        if include is not None and exclude is not None:
            raise self._error("include= and exclude= are mutually exclusive; use one of them.")
        owned = [n for n in include or () if n in METAFLOW_OWNED or n.startswith("_")]
        if owned:
            raise self._error(f"include= names {owned}, which Metaflow owns; they are never saved.")
        if self.attributes["load_policy"] not in LOAD_POLICIES:
            raise self._error(
                f"load_policy={self.attributes['load_policy']!r} is not one of "
                f"{', '.join(map(repr, LOAD_POLICIES))}."
            )
        root = self.attributes["root"]
        if root is not None and (not isinstance(root, str) or not root):
            raise self._error(f"root={root!r} must be a path or an fsspec URL such as 's3://bucket/ckpt'.")
        self._include, self._exclude = include, exclude
        self._datastore_root = datastore_url(flow_datastore.TYPE, flow_datastore.datastore_root)
        self._async_saves = self._flag("async_saves")
        self._card = None
        if self._flag("card"):
            self._card = attach_card(decorators, self._root_url(), self.attributes["load_policy"])
        try:
            self._keep = parse_keep(self.attributes["keep"])
        except CheckpointError as exc:
            raise self._error(str(exc)) from None

    def task_pre_step(
        self, step_name, task_datastore, metadata, run_id, task_id, flow, graph,
        retry_count, max_user_code_retries, ubf_context, inputs,
    ):
        # In a @parallel step the position ends with the node index (parallel.py).
        location = TaskLocation(
            flow.name, str(run_id), step_name, str(task_id), TaskLocation.position_of(flow.foreach_stack())
        )
        url = self._root_url()
        self._preemption = self._preemption_of(location, retry_count)

        def record(fields):
            entries = [
                MetaDatum(field=k, value=v, type="implicit-checkpoint", tags=[f"attempt_id:{retry_count}"])
                for k, v in fields.items()
            ]
            metadata.register_metadata(str(run_id), step_name, str(task_id), entries)

        ctx = StepContext(
            flow=flow,
            location=location,
            attempt=retry_count,
            load_policy=self.attributes["load_policy"],
            include=self._include,
            exclude=self._exclude,
            reserved=METAFLOW_OWNED | {name for name, _ in flow._get_parameters()},
            namespace=current.namespace,
            on_first_use=lambda: record({ROOT_FIELD: url, POSITION_FIELD: location.position}),
            on_loaded=lambda artifact: self._loaded(artifact, record),
            on_saved=self._card.checkpoint_saved if self._card else lambda artifact: None,
            async_saves=self._async_saves,
            keep=self._keep,
            preempted=lambda: self._preemption.preempted,
        )
        try:
            store = open_store(url)  # on GCS this finds the credentials
        except CheckpointError as exc:
            raise self._error(str(exc)) from None
        self._api = CurrentCheckpoint(Checkpointer(store), ctx)
        current._update_env({"checkpoint": self._api})

    def task_decorate(self, step_func, flow, graph, retry_count, max_user_code_retries, ubf_context):
        source_file = inspect.getfile(type(flow))

        def step():
            try:
                return step_func()
            except CheckpointError as error:
                raise CheckpointStepException(error, source_file) from error
            finally:  # preempted: flush, then end as SIGTERM would (whether it returned or raised)
                self._preemption.finish(self._api.wait)

        return step

    def task_post_step(self, step_name, flow, graph, retry_count, max_user_code_retries):
        self._api.wait()  # the task does not end before its saves are durable (or it fails)

    def task_exception(self, exception, step_name, flow, graph, retry_count, max_user_code_retries):
        # Metaflow prints the step's exception, unless persisting the task's artifacts after
        # this hook fails too: its error then hides ours. Say ours here when that will happen:
        # a background save failed (this attempt is over), or an attribute could not be
        # pickled (it is still on self, and Metaflow pickles every attribute).
        if getattr(self, "_api", None) is None:
            return  # a task_pre_step failed (ours, opening the store, or another one's): nothing to wait for
        try:
            self._api.wait()
        except CheckpointError as failed:
            print(f"{failed.headline}: {failed}", file=sys.stderr)
        error = exception.__cause__ if isinstance(exception, CheckpointStepException) else None
        if isinstance(error, CheckpointSaveError) and error.__cause__ is not None:
            print(f"{error.headline}: {error}", file=sys.stderr)

    def _preemption_of(self, location: TaskLocation, attempt: int) -> Preemption:
        """SIGTERM handling for this task process (preemption.py), chained to any previous one."""
        from metaflow.metaflow_config import IMPLICIT_CHECKPOINT_PREEMPT_SECONDS

        preemption = Preemption(
            location.where(attempt),
            grace=float(IMPLICIT_CHECKPOINT_PREEMPT_SECONDS),
            notice=lambda: getattr(current, "spot_termination_notice", None),  # @batch/@kubernetes set it
        )
        preemption.install()
        return preemption

    def _loaded(self, artifact, record):
        record({LOADED_FIELD: artifact.key})
        if self._card:
            self._card.checkpoint_loaded(artifact)

    def _root_url(self) -> str:
        return storage_root(self.attributes["root"], self._datastore_root)

    def _flag(self, key) -> bool:
        """A True/False option; `--with checkpoint:card=False` passes it as a string."""
        value = self.attributes[key]
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise self._error(f"{key}={value!r} must be True or False.")
        return value

    def _names(self, key):
        value = self.attributes[key]
        if value is None:
            return None
        if isinstance(value, str):
            value = [n for n in value.split(",") if n]
        if not isinstance(value, (list, tuple, set)) or not all(isinstance(n, str) for n in value):
            raise self._error(f"{key}= must be a list of attribute names, not {value!r}.")
        return list(value)

    def _error(self, message):
        return CheckpointConfigException(f"@checkpoint on step {self._step}: {message}")


def storage_root(explicit, datastore_root: str) -> str:
    """Where checkpoints are stored: ``root=``, else the configured
    ``IMPLICIT_CHECKPOINT_ROOT``, else ``mf.implicit_checkpoints`` in Metaflow's datastore root."""
    from metaflow.metaflow_config import IMPLICIT_CHECKPOINT_ROOT

    root = explicit or IMPLICIT_CHECKPOINT_ROOT
    return root or f"{datastore_root.rstrip('/')}/{ROOT_DIRNAME}"
