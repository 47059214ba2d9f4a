"""The reconnect-outage measurement (`python -m atlax.bench.outage`) runs end to end with real
processes and reports a served connection after the relay's restart. It measures; nothing here
asserts how long the outage was."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_outage_measurement_reports_the_first_served_connection(tmp_path: Path) -> None:
    out = tmp_path / "outage.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "atlax.bench.outage",
            "--down",
            "1",
            "--settle",
            "0",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["down_s"] == 1 and run["signal"] == "SIGKILL"
    assert run["relay_listening_after_s"] >= 0
    assert run["outage_after_return_s"] >= 0
    assert run["outage_total_s"] >= 1  # the relay was down for a second at least
    assert all(d >= 0 for d in run["agent_retry_delays_s"])
    assert "outage after return" in result.stdout
