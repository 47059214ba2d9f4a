"""The benchmark's fast smoke mode: proves `python -m atlax.bench` works. No timing thresholds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from atlax.bench.__main__ import METRICS

ATLAX_ONLY = {"idle_10k_rss_mb", "stalled_neighbour_ratio"}


def test_quick_benchmark_writes_every_metric(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "atlax.bench", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(out.read_text())["metrics"]
    assert set(metrics) == set(METRICS)
    for name, row in metrics.items():
        assert row["unit"] == METRICS[name][0]
        assert row["atlax"] > 0, name
        if name in ATLAX_ONLY:
            assert row["ssh_r"] is None and row["direct"] is None
        else:
            assert row["ssh_r"] > 0 and row["direct"] > 0, name
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "atlax/ssh -R" in result.stdout
