"""The kill test (benchmarks/kill_test.py) at a reduced count; the README reports a full run."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_sigkill_at_random_instants_never_loses_or_corrupts_a_checkpoint():
    """24 SIGKILLs over local disk and S3, landing during payload and manifest writes, with 10% of
    storage calls failing transiently, each attempt's clock up to 30 minutes off the others' and
    gc (default grace) running throughout, then 96 hostile inputs: after every kill only loadable
    checkpoints are listed, nothing acknowledged is lost, load() restores the newest exactly,
    every fault is retried and every bad input is refused."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "kill_test.py"), "--kills", "24", "--bad-inputs", "96",
         "--fault-rate", "0.1", "--seed", "7", "--skew-minutes", "30"],
        capture_output=True, text=True, timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert result["kills"] == 24 and result["problems"] == 0
    assert result["corrupt loads"] == 0 and result["lost"] == 0
    assert result["local: checkpoints committed"] > 0 and result["s3: checkpoints committed"] > 0
    assert result["killed while writing a payload"] > 0 and result["killed while writing the manifest"] > 0
    assert result["faults injected"] > 0 and result["faults retried"] == result["faults injected"]
    assert result["bad inputs tried"] == 96 and result["bad inputs accepted"] == 0
    assert result["local: gc passes during saves"] > 0 and result["s3: gc passes during saves"] > 0
