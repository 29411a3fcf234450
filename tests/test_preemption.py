"""Preemption: SIGTERM (or Metaflow's spot-termination notice) sets `preempted`, pending saves
are flushed, the process then exits as SIGTERM would; a real @retry flow resumes from the save
made after the signal."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from metaflow import Checkpoint, Run

from conftest import TEST_FLOWS

MODULE = "metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.preemption"


def run_script(body: str, tmp_path: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``body`` in a fresh interpreter with ``Preemption`` imported and ``signal``, ``os``."""
    script = tmp_path / "script.py"
    script.write_text(f"import os, signal, sys, time\nfrom {MODULE} import Preemption\n" + textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout)


def test_sigterm_sets_preempted_then_flushes_and_exits_as_sigterm(tmp_path):
    """The first SIGTERM only sets `preempted`; `finish` flushes, then the process dies of SIGTERM."""
    proc = run_script("""
        p = Preemption("step 'train'", grace=60)
        assert p.install() and not p.preempted
        os.kill(os.getpid(), signal.SIGTERM)
        print("alive, preempted =", p.preempted, flush=True)
        p.finish(lambda: print("flushed", flush=True))
        print("never printed", flush=True)
    """, tmp_path)
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert proc.stdout.splitlines() == ["alive, preempted = True", "flushed"]
    assert "SIGTERM received in step 'train'" in proc.stderr


def test_a_previous_handler_is_chained_and_restored(tmp_path):
    """A handler installed before ours runs when the preempted step ends (not at the signal);
    without preemption, `finish` puts it back."""
    proc = run_script("""
        def previous(signum, frame):
            print("previous handler", flush=True)
            sys.exit(7)
        signal.signal(signal.SIGTERM, previous)
        quiet = Preemption("step 'a'", grace=60)
        quiet.install(); quiet.finish(lambda: None)
        assert signal.getsignal(signal.SIGTERM) is previous
        p = Preemption("step 'b'", grace=60)
        p.install()
        os.kill(os.getpid(), signal.SIGTERM)
        print("saving", flush=True)
        p.finish(lambda: None)
    """, tmp_path)
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout.splitlines() == ["saving", "previous handler"]


def test_a_step_that_ignores_preemption_ends_after_the_grace(tmp_path):
    """A loop that never looks at `preempted` is ended by SIGTERM once the grace has passed."""
    proc = run_script("""
        p = Preemption("step 'train'", grace=0.5)
        p.install()
        os.kill(os.getpid(), signal.SIGTERM)
        while True:
            time.sleep(0.05)
    """, tmp_path)
    assert proc.returncode == -signal.SIGTERM
    assert "did not end within 0.5 s of preemption" in proc.stderr


def test_the_spot_termination_notice_preempts(tmp_path):
    """When Metaflow's spot monitor has written its notice file, `preempted` is True."""
    notice = tmp_path / "spot_termination_notice"
    proc = run_script(f"""
        p = Preemption("step 'train'", grace=60, notice=lambda: {str(notice)!r})
        p.install()
        print(p.preempted, flush=True)
        open({str(notice)!r}, "w").write("2026-11-30T16:00:00Z")
        print(p.preempted, flush=True)
        p.finish(lambda: None)
    """, tmp_path)
    assert proc.stdout.split() == ["False", "True"] and proc.returncode == -signal.SIGTERM
    assert "spot-termination notice received" in proc.stderr


def test_a_forked_child_dies_of_sigterm_as_before(tmp_path):
    """A process forked from the task (a background save, a data loader) is not preempted: it
    dies of SIGTERM as it did without the handler."""
    proc = run_script("""
        p = Preemption("step 'train'", grace=60)
        p.install()
        pid = os.fork()
        if pid == 0:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print(os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM, p.preempted, flush=True)
    """, tmp_path)
    assert proc.stdout.split() == ["True", "False"], proc.stderr


def wait_for_epoch(path: Path, epoch: int, timeout: float = 120) -> int:
    """The pid the flow wrote to ``path`` ("<pid> <epoch>", replaced atomically each epoch) once
    its epoch reached ``epoch``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = path.read_text().split() if path.exists() else []
        if fields and int(fields[1]) >= epoch:
            return int(fields[0])
        time.sleep(0.05)
    raise AssertionError(f"the flow never reached epoch {epoch} ({path})")


def test_sigterm_mid_loop_then_retry_resumes_from_the_save_after_the_signal(metaflow_home, tmp_path):
    """A real run: SIGTERM to the train task at epoch >= 5; the step saves (a 32 MB state, so in
    the background) and returns; the flush makes it durable before the task dies; @retry
    resumes from exactly that save."""
    progress = tmp_path / "progress"
    env = {**os.environ, "USERNAME": "tester", "METAFLOW_DEFAULT_DATASTORE": "local",
           "METAFLOW_DEFAULT_METADATA": "local", "PREEMPT_PROGRESS": str(progress)}
    proc = subprocess.Popen(
        [sys.executable, str(TEST_FLOWS / "preempt_flow.py"), "--no-pylint", "run"],
        cwd=metaflow_home, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        os.kill(wait_for_epoch(progress, 5), signal.SIGTERM)
        output, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-4000:]
    assert "SIGTERM received in step 'train'" in output and "stops after preemption" in output
    run_id = re.search(r"run-id (\S+?)\)?:", output).group(1)
    run = Run(f"PreemptFlow/{run_id}")
    task = run["train"].task
    assert task.current_attempt == 1
    saved = [a for a in Checkpoint().list(task=task, attempt=0) if a.metadata.get("preempted")]
    assert len(saved) == 1 and saved[0].size > 32 << 20
    assert task.data.resumed_from == saved[0].key and task.data.resumed_at == saved[0].step >= 5
    assert task.data.epoch == 20 and task.data.big[0] == saved[0].step


def test_the_preemptible_example_resumes_from_the_save_made_after_sigterm(run_flow):
    """flows/preemptible.py sends itself SIGTERM at epoch 7: it saves at 7 and returns, the
    retry resumes at 7 (not at 5, its last periodic save) and ends with the uninterrupted history."""
    from conftest import FLOWS

    result = run_flow(FLOWS / "preemptible.py", "run")
    assert "attempt 1: resumed at epoch 7 (saved after the SIGTERM)" in result.output
    assert "12 epochs, the same history as an uninterrupted run" in result.output
