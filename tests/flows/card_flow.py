"""Steps whose checkpoint cards tests/test_card.py reads: 50 checkpoints in each of two foreach
branches, a user's own @card listed before and after @checkpoint, `card=False`, and a step
that never saves. The Config makes Metaflow hand every card render a config file, which @card
deletes once it thinks the step's last card is done: a miscounted card fails to render."""
from metaflow import Config, FlowSpec, card, checkpoint, current, step
from metaflow.cards import Markdown


class CardFlow(FlowSpec):
    settings = Config("settings", default_value={"checkpoints": 50})

    @step
    def start(self):
        self.shards = ["a", "b"]
        self.next(self.many, foreach="shards")

    @checkpoint
    @step
    def many(self):
        for i in range(self.settings.checkpoints):
            self.i = i
            current.checkpoint.save(name=f"{self.input}-{i:02d}", metadata={"loss": 1 / (i + 1), "shard": self.input})
        self.next(self.gather)

    @step
    def gather(self, inputs):
        self.next(self.user_card_first)

    @card
    @checkpoint
    @step
    def user_card_first(self):
        current.card.append(Markdown("written by the user, card listed first"))
        self.x = 1
        current.checkpoint.save()
        self.next(self.user_card_last)

    @checkpoint
    @card(type="blank")
    @step
    def user_card_last(self):
        current.card.append(Markdown("written by the user, card listed last"))
        self.x = 2
        current.checkpoint.save()
        self.next(self.opt_out)

    @checkpoint(card=False)
    @step
    def opt_out(self):
        self.x = 3
        current.checkpoint.save()
        self.next(self.idle)

    @checkpoint
    @step
    def idle(self):
        self.x = 4
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    CardFlow()
