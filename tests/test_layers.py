"""The architecture holds: layers import one way only, and a control client carries no relay.

The contracts live in pyproject.toml ([tool.importlinter]); this runs them as part of `make test`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_relayctl_and_the_operator_load_no_relay() -> None:
    """What a control client loads at run time (`atlax relayctl` starts in atlax.cli): not the
    relay, the mux or Prometheus."""
    probe = (
        "import sys, atlax.cli, atlax.relayctl, atlax.control.client, atlax_operator.handlers\n"
        "bad = sorted(m for m in sys.modules if m in ('atlax.relay', 'atlax.mux', 'atlax.metrics',"
        " 'atlax.control.server', 'prometheus_client') or m.startswith(('atlax.relay.', "
        "'atlax.mux.', 'prometheus_client.')))\n"
        "print(' '.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
