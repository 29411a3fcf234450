"""A step that watches its own card the way the Metaflow UI reads it (Metaflow's card store:
the data an open page applies, and the page "Link to card" serves). Attempt 0 saves three
checkpoints and raises. Attempt 1 first waits, without saving or loading, until its card shows
attempt 0's rows marked failed; then saves three checkpoints within a second and goes quiet
until the card shows all six. Metaflow's own refresh drops calls within 5 s of the previous one."""
import re
import time

from metaflow import FlowSpec, Task, checkpoint, current, retry, step
from metaflow.cards import get_cards


def card_state():
    """(attempt, rows, failed rows) of the card's data, and rows of its page; None if absent."""
    try:
        (card,) = get_cards(Task(current.pathspec, _namespace_check=False))
        data = (card.get_data() or {}).get("data") or {}
        table = data.get("sections", {}).get("ickpt-checkpoints", "")
        page = card.get().split('<table class="checkpoints"', 1)[-1].split("</table>", 1)[0]
    except Exception:
        return None
    return data.get("attempt"), table.count("data-key="), len(re.findall(r'class="failed', table)), page.count("data-key=")


def seconds_until(wanted, limit=30.0):
    """Seconds until card_state() == wanted, polling; None if it never is within `limit`."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if card_state() == wanted:
            return round(time.monotonic() - started, 2)
        time.sleep(0.25)
    print("card never showed", wanted, "last seen", card_state())
    return None


class CardQuietFlow(FlowSpec):
    @retry(times=1, minutes_between_retries=0)
    @checkpoint
    @step
    def start(self):
        if current.retry_count == 0:
            for i in range(3):
                self.i = i
                current.checkpoint.save(name=f"early-{i}")  # names apart: none supersedes another
            raise RuntimeError("attempt 0 is lost")
        self.attempt_shown_after = seconds_until((1, 3, 3, 3))
        for i in range(3, 6):
            self.i = i
            current.checkpoint.save(name=f"late-{i}")  # written by the writer thread meanwhile
        self.last_save_shown_after = seconds_until((1, 6, 3, 6))
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    CardQuietFlow()
