"""Every error a user can meet in a real flow: what it says, and that nothing is lost."""
from __future__ import annotations

import pytest
from metaflow import Checkpoint, Run

FLOW = """
import threading
from metaflow import FlowSpec, checkpoint, current, step

class ErrFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.work)

    @checkpoint({args})
    @step
    def work(self):
{body}
        self.next(self.end)

    @step
    def end(self):
        pass

if __name__ == "__main__":
    ErrFlow()
"""


def flow(write_flow, body, args=""):
    indented = "\n".join("        " + line for line in body.strip().splitlines())
    return write_flow(FLOW.format(args=args, body=indented))


def test_include_and_exclude_are_mutually_exclusive(run_flow, write_flow):
    """The flow is refused before any task starts, with a message that says why."""
    result = run_flow(flow(write_flow, "pass", 'include=["a"], exclude=["b"]'), "run", expect_ok=False)
    assert "mutually exclusive" in result.output and "on step work" in result.output
    assert "Workflow starting" not in result.output


def test_unknown_load_policy_is_refused_before_any_task(run_flow, write_flow):
    """A misspelt load_policy names the allowed values before the run starts."""
    result = run_flow(flow(write_flow, "pass", 'load_policy="latest"'), "run", expect_ok=False)
    assert "load_policy='latest' is not one of 'fresh', 'eager', 'none'" in result.output
    assert "Workflow starting" not in result.output


def test_card_must_be_a_bool(run_flow, write_flow):
    """card="no" (a truthy string) is refused before the run starts rather than read as True."""
    result = run_flow(flow(write_flow, "pass", 'card="no"'), "run", expect_ok=False)
    assert "card='no' must be True or False" in result.output and "on step work" in result.output
    assert "Workflow starting" not in result.output


def test_include_of_a_missing_attribute_names_it(run_flow, write_flow):
    """include= naming an attribute that is not set fails the save naming step and attribute."""
    body = "self.a = 1\ncurrent.checkpoint.save()"
    result = run_flow(flow(write_flow, body, 'include=["a", "epochs"]'), "run", expect_ok=False)
    assert "in step 'work'" in result.output and "names 'epochs', which is not set on self" in result.output


def test_unserializable_attribute_names_it_and_keeps_the_earlier_checkpoint(run_flow, write_flow):
    """A lock on self fails the save naming it and saying what works (Metaflow pickles every
    attribute at step end, so exclude= alone is not enough); the message shows although
    Metaflow's own pickling error follows it; the checkpoint saved before it still loads."""
    body = """
self.n = 1
current.checkpoint.save()
self.lock = threading.Lock()
current.checkpoint.save()
"""
    result = run_flow(flow(write_flow, body), "run", expect_ok=False)
    assert "Cannot checkpoint self.lock (_thread.lock) in step 'work'" in result.output
    assert "`del self.lock` before the step ends (or keep it off self)" in result.output
    assert "@checkpoint(exclude=['lock'])" in result.output
    assert "Internal error" not in result.output
    task = Run(f"ErrFlow/{result.run_id}")["work"].task
    (only,) = Checkpoint().list(task=task)
    assert Checkpoint().load(only) == {"n": 1}


def test_following_the_unserializable_attribute_advice_works(run_flow, write_flow):
    """What the message says to do: exclude the lock from checkpoints and `del self.lock`
    before the step ends. The run succeeds and the checkpoint holds the rest."""
    body = """
self.lock = threading.Lock()
self.n = 1
current.checkpoint.save()
del self.lock
"""
    result = run_flow(flow(write_flow, body, 'exclude=["lock"]'), "run")
    (only,) = Checkpoint().list(task=Run(f"ErrFlow/{result.run_id}")["work"].task)
    assert Checkpoint().load(only) == {"n": 1}


NO_DECORATOR = """
from metaflow import FlowSpec, current, step

class BareFlow(FlowSpec):
    @step
    def start(self):
        self.n = 1
        current.checkpoint.save()
        self.next(self.end)

    @step
    def end(self):
        pass

if __name__ == "__main__":
    BareFlow()
"""


def test_current_checkpoint_without_the_decorator_says_to_add_it(run_flow, write_flow):
    """current.checkpoint in a step without @checkpoint: Metaflow's own error format, naming
    the file, line and step and saying to add the decorator; no "Internal error", no traceback."""
    path = write_flow(NO_DECORATOR)
    result = run_flow(path, "run", expect_ok=False)
    assert f"No @checkpoint on this step in file {path} on line 8:" in result.output
    assert "current.checkpoint is used but step 'start' has no @checkpoint. Add @checkpoint above @step" in result.output
    assert "Internal error" not in result.output and "Traceback" not in result.output
    assert "AttributeError" not in result.output


def test_a_checkpoint_error_in_a_step_reads_like_metaflows_own(run_flow, write_flow):
    """A CheckpointError leaving a step is printed as Metaflow prints its own errors: headline,
    file and line, message; no "Internal error" and no traceback."""
    path = flow(write_flow, 'current.checkpoint.load("garbage-key")')
    result = run_flow(path, "run", expect_ok=False)
    line = path.read_text().split("\n").index('        current.checkpoint.load("garbage-key")') + 1
    assert f"Unreadable checkpoint in file {path} on line {line}:" in result.output
    assert "'garbage-key' is not a checkpoint key." in result.output
    assert "Internal error" not in result.output and "Traceback" not in result.output


def test_a_checkpoint_error_caught_in_the_step_is_still_a_checkpoint_error(run_flow, write_flow):
    """Inside the step, user code catches our own exception classes."""
    body = """
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.exceptions import CheckpointFormatError
try:
    current.checkpoint.load("garbage-key")
except CheckpointFormatError:
    self.caught = True
"""
    result = run_flow(flow(write_flow, body), "run")
    assert Run(f"ErrFlow/{result.run_id}")["work"].task["caught"].data is True


def test_explicit_reference_that_does_not_exist_raises(run_flow, write_flow):
    """load(key) of a checkpoint that does not exist is an error naming the key."""
    body = 'current.checkpoint.load("ErrFlow/1/work/2/root/20260101T000000000000Z-a0-0123abcd")'
    result = run_flow(flow(write_flow, body), "run", expect_ok=False)
    assert "Checkpoint not found in file" in result.output
    assert "No checkpoint ErrFlow/1/work/2/root/20260101T000000000000Z-a0-0123abcd" in result.output


def test_another_flows_checkpoint_is_refused(run_flow, write_flow):
    """A step cannot load another flow's checkpoint onto self."""
    body = 'current.checkpoint.load("OtherFlow/1/work/2/root/20260101T000000000000Z-a0-0123abcd")'
    result = run_flow(flow(write_flow, body), "run", expect_ok=False)
    assert "belongs to another flow" in result.output


def test_bad_metadata_names_the_key(run_flow, write_flow):
    """Metadata that JSON cannot hold fails the save naming the key and writes nothing."""
    body = 'self.n = 1\ncurrent.checkpoint.save(metadata={"ok": 1, "when": threading.Lock()})'
    result = run_flow(flow(write_flow, body), "run", expect_ok=False)
    assert "the value of key 'when' is not JSON-serializable" in result.output
    assert Checkpoint().list(task=Run(f"ErrFlow/{result.run_id}")["work"].task) == []


def test_a_corrupted_payload_fails_the_load_naming_field_and_checkpoint(run_flow, write_flow, metaflow_home):
    """load() verifies every payload against its hash."""
    saved = run_flow(flow(write_flow, "self.weights = [(i,) for i in range(5000)]\ncurrent.checkpoint.save()"), "run")
    (artifact,) = Checkpoint().list(task=Run(f"ErrFlow/{saved.run_id}")["work"].task)
    digest = artifact.implicit_manifest["body"][0][0]  # a list of tuples lives in the pickle stream
    path = metaflow_home / ".metaflow" / "mf.implicit_checkpoints" / "ErrFlow" / "objects" / digest[:2] / digest
    path.write_bytes(path.read_bytes()[:-3] + b"xyz")
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.exceptions import CheckpointCorrupt

    with pytest.raises(CheckpointCorrupt, match=rf"The object graph \(fields 'weights'\) of checkpoint {artifact.key} does not match its hash"):
        Checkpoint().load(artifact)


def test_bad_keep_is_refused_before_any_task(run_flow, write_flow):
    """A malformed keep= names the step, says what is wrong and shows the valid form, before the
    run starts."""
    result = run_flow(flow(write_flow, "pass", 'keep={"last": 3, "best": ("loss", "lowest", 2)}'), "run", expect_ok=False)
    assert "@checkpoint on step work: keep['best']=('loss', 'lowest', 2) must be (metadata key, 'min' or 'max'" in result.output
    assert "Workflow starting" not in result.output


FALLBACK = """
import os
from metaflow import FlowSpec, checkpoint, current, retry, step

class FallbackFlow(FlowSpec):
    @retry(times=1, minutes_between_retries=0)
    @checkpoint
    @step
    def start(self):
        if current.retry_count == 0:
            self.n, self.blob = 1, [(i,) for i in range(3000)]  # a stream large enough to be an object
            current.checkpoint.save(wait=True)
            self.n, self.blob = 2, [(i,) for i in range(3001)]
            newest = current.checkpoint.save(wait=True)
            digest = newest.implicit_manifest["body"][0][0]
            path = os.path.join(os.environ["METAFLOW_IMPLICIT_CHECKPOINT_ROOT"], "FallbackFlow", "objects",
                                digest[:2], digest)
            with open(path, "r+b") as f:  # bit rot in the newest checkpoint's payload
                data = bytearray(f.read())
                data[-2] ^= 0x10
                f.seek(0)
                f.write(data)
            raise RuntimeError("crash after the damage")
        self.loaded = current.checkpoint.load()
        self.resumed_n = self.n
        self.next(self.end)

    @step
    def end(self):
        pass

if __name__ == "__main__":
    FallbackFlow()
"""


def test_a_retry_resumes_from_the_newest_intact_checkpoint_when_the_newest_is_damaged(run_flow, write_flow, tmp_path):
    """The newest checkpoint's payload rotted between attempts: the retry warns naming it and
    the field, and resumes from the checkpoint before it instead of failing again."""
    root = tmp_path / "ckpt"
    result = run_flow(write_flow(FALLBACK, "fallback.py"), "run", env={"METAFLOW_IMPLICIT_CHECKPOINT_ROOT": str(root)})
    task = Run(f"FallbackFlow/{result.run_id}")["start"].task
    newest, older = Checkpoint().list(task=task)
    assert task["resumed_n"].data == 1 and task["loaded"].data.key == older.key
    assert f"@checkpoint warning: Not resuming from damaged checkpoint {newest.key}: The object graph (fields 'blob', 'n')" in result.output
