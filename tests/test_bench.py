"""The benchmark's fast smoke mode: proves `python -m atlax.bench` works. No timing thresholds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from atlax.bench.__main__ import METRICS

ATLAX_ONLY = {
    "idle_10k_rss_mb",
    "stalled_neighbour_ratio",
    "sni_connect_p50_ms",  # through Atlax's port shared by SNI (compare hello_connect_*)
    "sni_connect_p99_ms",
    "throughput_100_workers_2",
    "convergence_ms",
    "rollout_failed",
}
NO_SSH = {"udp_rtt_p50_us", "udp_rtt_p99_us"}  # ssh -R carries no UDP


def test_quick_benchmark_writes_every_metric(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "atlax.bench", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(out.read_text())["metrics"]
    assert set(metrics) == set(METRICS)
    for name, row in metrics.items():
        assert row["unit"] == METRICS[name][0]
        if name == "rollout_failed":  # a count whose target is 0 (tests/test_ha.py asserts it)
            assert row["atlax"] >= 0 and row["attempted"] > 0
        else:
            assert row["atlax"] > 0, name
        if name in ATLAX_ONLY:
            assert row["ssh_r"] is None and row["direct"] is None
        elif name in NO_SSH:
            assert row["ssh_r"] is None and row["direct"] > 0, name
        else:
            assert row["ssh_r"] > 0 and row["direct"] > 0, name
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "atlax/ssh -R" in result.stdout


def test_the_run_ends_with_table_and_json_when_matplotlib_is_missing(tmp_path: Path) -> None:
    """The chart is optional: without matplotlib the run still ends well (it used to crash with
    `No module named 'matplotlib'` after measuring everything) and says how to get the chart."""
    out = tmp_path / "bench.json"
    script = (
        "import sys; sys.modules['matplotlib'] = None  # as if not installed: the import fails\n"
        "from atlax.bench.__main__ import main\n"
        f"sys.exit(main(['--quick', '--json', {str(out)!r}]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "atlax/ssh -R" in result.stdout
    assert set(json.loads(out.read_text())["metrics"]) == set(METRICS)
    assert not out.with_suffix(".png").exists()
    assert (
        "no chart: matplotlib is not installed (pip install 'atlax[bench]'); "
        f"{out.with_suffix('.png')} skipped"
    ) in result.stderr
