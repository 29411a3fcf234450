"""The ``implicit_checkpoint`` card type, registered through Metaflow's ``plugins.cards``.

@checkpoint attaches it to its step (see ``card_decorator.py``) and Metaflow renders it in a
``card create`` subprocess: ``render_runtime`` while the step runs, ``refresh`` for in-place
data updates, ``render`` when the task ends.
"""
from __future__ import annotations

from metaflow.plugins.cards.card_modules.card import MetaflowCard

from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.card import (
    CARD_TYPE,
    CardRequest,
    CardView,
    build_view,
    render_page,
    render_sections,
)
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.checkpointer import Checkpointer
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.retry import RetryPolicy
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.storage_options import storage_options
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.store import CheckpointStore

# A card render gives up on unreachable storage after this long (a step's saves retry for a
# minute); the card then shows the problem. The task waits for a render in progress as it ends.
CARD_RETRY_SECONDS = 5.0


class StaleCardRender(RuntimeError):
    """A render for an attempt older than the task's newest: refused so it writes nothing."""


class ImplicitCheckpointCard(MetaflowCard):
    """A task's checkpoints over all its attempts, oldest first, and the lineage of the one
    this attempt loaded."""

    type = CARD_TYPE
    RUNTIME_UPDATABLE = True
    # Each data update carries every section, so a page never needs reloading before the end.
    RELOAD_POLICY = MetaflowCard.RELOAD_POLICY_NEVER

    def __init__(self, options=None, components=None, graph=None, flow=None, **kwargs):
        self._options = dict(options or {})

    def render(self, task) -> str:
        return render_page(self._view(task, self.runtime_data), self.RELOAD_POLICY_TOKEN)

    def render_runtime(self, task, data) -> str:
        self._refuse_if_stale(task)
        return render_page(self._view(task, data), self.RELOAD_POLICY_TOKEN)

    def refresh(self, task, data) -> dict:
        self._refuse_if_stale(task)
        view = self._view(task, data)
        return {"attempt": view.request.attempt, "sections": {k: str(v) for k, v in render_sections(view).items()}}

    def _refuse_if_stale(self, task) -> None:
        # Every attempt writes the same card, in background renders that outlive an attempt
        # killed outright: such a render can finish after the next attempt's and would put an
        # older page back. The card is attached with save_errors=False, so raising writes nothing.
        attempt = self._options.get("attempt", 0)
        if task.current_attempt > attempt:
            raise StaleCardRender(
                f"{task.pathspec} is at attempt {task.current_attempt}; not rendering attempt "
                f"{attempt}'s card over it."
            )

    def _view(self, task, data) -> CardView:
        if "root" not in self._options:
            raise ValueError(
                f"The {CARD_TYPE} card is attached by @checkpoint, which tells it where the "
                f"checkpoints are; remove @card(type={CARD_TYPE!r}) from the step."
            )
        request = CardRequest(pathspec=task.pathspec, **self._options)
        store = CheckpointStore(request.root, storage_options(request.root), retry=RetryPolicy(deadline=CARD_RETRY_SECONDS))
        return build_view(Checkpointer(store), request)


CARDS = [ImplicitCheckpointCard]
