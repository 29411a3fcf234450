"""The card @checkpoint attaches to its step: Metaflow's own @card, driven by checkpoints."""
from __future__ import annotations

import hashlib
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from metaflow.decorators import StepDecorator
from metaflow.plugins.cards.card_decorator import CardDecorator
from metaflow.plugins.cards.component_serializer import CardComponentCollector

from .card import CARD_ID, CARD_TYPE
from .manifest import CheckpointArtifact, TaskLocation
from .parallel import node_of, parallel_nodes

# Card updates start at least this far apart; saves in between are shown by the next one.
UPDATE_GAP_SECONDS = 2.0
SLOW_RENDER_SECONDS = 2.0
SLOW_RENDER = ("Rendering the final checkpoint card (a Metaflow card subprocess; "
               "@checkpoint(card=False) skips it) ...")


class CheckpointCardDecorator(StepDecorator):
    """Owns a ``@card(type="implicit_checkpoint", id="implicit_checkpoint")`` and differs from
    a plain one in four ways:

    - every attempt of a task writes the same card, so ``card get STEP`` and the Metaflow UI
      show one card (the newest attempt's, which lists the checkpoints of all attempts);
    - it is rendered as the task starts and updated after every save or load by a background
      thread (``CardUpdates``): the step never waits for it, and the last save is always shown
      (Metaflow's own ``refresh`` drops calls within 5 s of the previous one);
    - each update writes the data an open page applies in place, then the page itself, so the
      UI's "Link to card" and "Download card" serve the latest one too;
    - an attempt that raises after saving or loading renders it before ending (Metaflow
      renders no final card for a failed task); one that did neither has no final render, as
      its card from the start is still right.

    It is named ``card`` because metaflow-ui waits for as many cards as the step has
    decorators named ``card``; under another name a page opened before the first render never
    shows it. The card is not editable, so ``current.card.append`` keeps going to the user's
    own @card. It wraps a real ``CardDecorator`` rather than subclassing it because @card keeps
    its per-process counters on its class, and a subclass would start counters of its own.
    """

    name = "card"

    def __init__(self, root: str, load_policy: str):
        super().__init__(inserted_by=["checkpoint"])  # inserted: never passed to tasks as `--with`
        options = {"root": root, "load_policy": load_policy}
        self.card = CardDecorator(
            # save_errors=False: a render that fails (or refuses, see the card type) leaves the
            # last good card in place instead of replacing it with an error card.
            attributes={"type": CARD_TYPE, "id": CARD_ID, "options": options, "save_errors": False},
            inserted_by=["checkpoint"],
        )
        self._uuid = ""
        self._logger = None
        self._updates = None
        self._modes = ()
        self._used = False
        self._parallel = False
        self._flow = None

    def external_init(self):
        super().external_init()
        self.card.external_init()

    def step_init(self, flow, graph, step_name, decorators, environment, flow_datastore, logger):
        self.card.step_init(flow, graph, step_name, decorators, environment, flow_datastore, logger)
        self._logger = logger
        # @card counts a step's cards (to know when all have registered) when the step's first
        # @card is initialized; this card is not in `decorators` as a CardDecorator.
        CardDecorator.total_decos_on_step[step_name] = 1 + sum(isinstance(d, CardDecorator) for d in decorators)
        self._parallel = any(getattr(d, "IS_PARALLEL", False) for d in decorators)

    def task_pre_step(
        self, step_name, task_datastore, metadata, run_id, task_id, flow, graph,
        retry_count, max_user_code_retries, ubf_context, inputs,
    ):
        position = TaskLocation.position_of(flow.foreach_stack())
        self.card.card_options = {
            **self.card.attributes["options"], "position": position, "attempt": retry_count,
            "loaded": None, "failed": False, "nodes": [],
            "parallel": node_of(flow, position) if self._parallel else None,
        }
        self._flow = flow
        self._uuid = hashlib.sha256(f"{flow.name}/{run_id}/{step_name}/{task_id}".encode()).hexdigest()[:32]
        with _card_uuid(self._uuid):
            self.card.task_pre_step(
                step_name, task_datastore, metadata, run_id, task_id, flow, graph,
                retry_count, max_user_code_retries, ubf_context, inputs,
            )
        # The card exists from the task's start, marking earlier attempts failed; a retry also
        # sends the data, which a page still open on the previous attempt applies at once.
        self._modes = ("refresh", "render_runtime") if retry_count else ("render_runtime",)
        self._used = False
        self._updates = CardUpdates(self._push, UPDATE_GAP_SECONDS)
        self._updates.request()

    def checkpoint_loaded(self, artifact: CheckpointArtifact) -> None:
        self.card.card_options = {**self.card.card_options, "loaded": artifact.key}
        self.checkpoint_saved(artifact)

    def checkpoint_saved(self, artifact: CheckpointArtifact) -> None:
        self._used = True
        if self._parallel and not self.card.card_options["nodes"]:
            self.card.card_options = {**self.card.card_options, "nodes": parallel_nodes(self._flow, self.card.card_options["position"])}
        self._updates.request()

    def task_exception(self, exception, step_name, flow, graph, retry_count, max_user_code_retries):
        if self._updates is None or not self._used:  # the card from the start still holds
            return
        self._updates.stop()
        self.card.card_options = {**self.card.card_options, "failed": True}
        self._push()

    def task_finished(self, step_name, flow, graph, is_task_ok, retry_count, max_user_code_retries):
        # An attempt that neither saved nor loaded has no final render: its card from the start
        # stays right. Otherwise Metaflow renders the final card before the task ends (nothing
        # for a task that is not ok); on a busy machine that takes seconds. Say so if it does.
        final = is_task_ok and self._used
        if self._updates is not None:
            self._updates.stop()
        notice = threading.Timer(SLOW_RENDER_SECONDS, print, [SLOW_RENDER], {"flush": True})
        notice.start()
        try:
            self.card.task_finished(step_name, flow, graph, final, retry_count, max_user_code_retries)
        finally:
            notice.cancel()

    def _push(self) -> None:
        """The data an open page applies in place, then the page that links and downloads serve."""
        modes, self._modes = self._modes, ("refresh", "render_runtime")
        for mode in modes:
            self.card.card_creator.create(
                mode=mode, sync=True, card_uuid=self._uuid, user_set_card_id=CARD_ID,
                runtime_card=True, decorator_attributes=self.card.attributes,
                card_options=self.card.card_options, logger=self._logger,
            )


class CardUpdates:
    """Runs ``push`` in a background thread soon after each ``request()``: one push at a time,
    requests made during a push coalesce into the next one, and pushes start at least ``gap``
    seconds apart. So the caller never waits, and the last request is always pushed."""

    def __init__(self, push: Callable[[], None], gap: float):
        self._push = push
        self._gap = gap
        self._wanted = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="checkpoint-card-updates", daemon=True)
        self._thread.start()

    def request(self) -> None:
        self._wanted.set()

    def stop(self) -> None:
        """Drop requested pushes and let one in progress finish (the caller may render the last
        one; and @card deletes files a render reads once the task's cards are done)."""
        self._stopping.set()
        self._wanted.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            if self._stopping.is_set():
                return
            self._wanted.clear()
            started = time.monotonic()
            try:
                self._push()
            except Exception as exc:  # a card must never fail the step
                print(f"@checkpoint: could not update the checkpoint card ({exc})", file=sys.stderr)
            self._stopping.wait(self._gap - (time.monotonic() - started))


def attach_card(decorators: list, root: str, load_policy: str) -> CheckpointCardDecorator:
    """The step's checkpoint card, appended to its decorators unless it is there already.

    Called from @checkpoint's ``step_init`` while Metaflow iterates over ``decorators``: the
    appended card's own ``step_init`` runs next in the same loop.
    """
    for deco in decorators:
        if isinstance(deco, CheckpointCardDecorator):
            return deco
    card = CheckpointCardDecorator(root, load_policy)
    card.external_init()
    decorators.append(card)
    return card


@contextmanager
def _card_uuid(value: str) -> Iterator[None]:
    # Metaflow names a card's file after a uuid that @card draws at random in each process, so
    # each @retry attempt would leave a card of its own and `card get STEP` would list them
    # instead of showing one. While this card registers, @card draws `value` instead.
    original = CardComponentCollector.__dict__["create_uuid"]
    CardComponentCollector.create_uuid = staticmethod(lambda: value)
    try:
        yield
    finally:
        CardComponentCollector.create_uuid = original
