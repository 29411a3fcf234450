"""The card @checkpoint attaches to its step: Metaflow's own @card, driven by checkpoints."""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Iterator

from metaflow.decorators import StepDecorator
from metaflow.metaflow_current import current
from metaflow.plugins.cards.card_decorator import CardDecorator
from metaflow.plugins.cards.component_serializer import CardComponentCollector

from .card import CARD_ID, CARD_TYPE
from .manifest import CheckpointArtifact, TaskLocation


class CheckpointCardDecorator(StepDecorator):
    """Owns a ``@card(type="implicit_checkpoint", id="implicit_checkpoint")`` and differs from
    a plain one in four ways:

    - every attempt of a task writes the same card, so ``card get STEP`` shows one card (the
      newest attempt's, which lists the checkpoints of all attempts);
    - it renders only in attempts that save or load, so a step that does neither pays nothing;
    - each save or load refreshes it with ``force=False``: rate-limited and never waiting;
    - an attempt that raises renders it before ending (Metaflow renders no final card for a
      failed task).

    The card is not editable, so ``current.card.append`` keeps going to the user's own @card.
    It wraps a real ``CardDecorator`` rather than subclassing it because @card keeps its
    per-process counters on its class, and a subclass would start counters of its own. It
    forwards the hooks ``CardDecorator`` implements: ``step_init``, ``task_pre_step`` and
    ``task_finished``.
    """

    name = "checkpoint_card"

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
        self._loaded = None
        self._used = False

    def external_init(self):
        super().external_init()
        self.card.external_init()

    def step_init(self, flow, graph, step_name, decorators, environment, flow_datastore, logger):
        self.card.step_init(flow, graph, step_name, decorators, environment, flow_datastore, logger)
        self._logger = logger
        # @card counts a step's cards (to know when all have registered) when the step's first
        # @card is initialized; this card is not in `decorators` as a CardDecorator.
        CardDecorator.total_decos_on_step[step_name] = 1 + sum(isinstance(d, CardDecorator) for d in decorators)

    def task_pre_step(
        self, step_name, task_datastore, metadata, run_id, task_id, flow, graph,
        retry_count, max_user_code_retries, ubf_context, inputs,
    ):
        position = TaskLocation.position_of(flow.foreach_stack())
        self.card.card_options = {**self.card.attributes["options"], "position": position, "attempt": retry_count}
        self._uuid = hashlib.sha256(f"{flow.name}/{run_id}/{step_name}/{task_id}".encode()).hexdigest()[:32]
        with _card_uuid(self._uuid):
            self.card.task_pre_step(
                step_name, task_datastore, metadata, run_id, task_id, flow, graph,
                retry_count, max_user_code_retries, ubf_context, inputs,
            )

    def checkpoint_loaded(self, artifact: CheckpointArtifact) -> None:
        self._loaded = artifact.key
        self._refresh(failed=False)

    def checkpoint_saved(self, artifact: CheckpointArtifact) -> None:
        self._refresh(failed=False)

    def task_exception(self, exception, step_name, flow, graph, retry_count, max_user_code_retries):
        if not self._used:
            return
        self._refresh(failed=True)  # hands the card its data; the renders below wait for any render it starts
        for mode in ("render_runtime", "refresh"):  # the page, then the data `card server` polls
            self.card.card_creator.create(
                mode=mode, sync=True, card_uuid=self._uuid, user_set_card_id=CARD_ID,
                runtime_card=True, decorator_attributes=self.card.attributes,
                card_options=self.card.card_options, logger=self._logger,
            )

    def task_finished(self, step_name, flow, graph, is_task_ok, retry_count, max_user_code_retries):
        # The final render is a Metaflow subprocess of about a second: skip it when this attempt
        # neither saved nor loaded (@card renders nothing for a task that is not ok).
        self.card.task_finished(step_name, flow, graph, is_task_ok and self._used, retry_count, max_user_code_retries)

    def _refresh(self, failed: bool) -> None:
        self._used = True
        for manager in current.card.get(type=CARD_TYPE):
            manager.refresh({"loaded": self._loaded, "failed": failed})


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
