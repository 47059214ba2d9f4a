"""The real-cluster end to end, as part of the test command: hack/cluster-e2e.sh brings up a
single-node Kubernetes on this machine (hack/cluster), builds both images from the Dockerfiles,
installs the chart and runs the scenario of hack/e2e/scenario.sh. Its step timings are printed
as they happen; the whole log is kept in .tools/cluster-e2e.log.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from conftest import ROOT

SCRIPT = ROOT / "hack" / "cluster-e2e.sh"
LOG = ROOT / ".tools" / "cluster-e2e.log"
TIMING = re.compile(r"^ {2,}\S.* +[0-9.]+s$")  # the summary's lines
BUDGET = 3 * 3600  # cold: Kubernetes, CoreDNS and the base image built first (bounded inside)


@pytest.mark.cluster
@pytest.mark.timeout(BUDGET + 60)
def test_cluster_end_to_end(capsys: pytest.CaptureFixture[str]) -> None:
    if os.geteuid() != 0:
        pytest.skip("hack/cluster needs root: it runs containerd, the kubelet and kube-proxy")
    LOG.parent.mkdir(exist_ok=True)
    lines: list[str] = []
    with LOG.open("w") as log, capsys.disabled():
        print()
        proc = subprocess.Popen(
            [str(SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            lines.append(line)
            if line.startswith(("e2e:", "hack/cluster", "cluster e2e")) or TIMING.match(line):
                print(line, end="", flush=True)
        returncode = proc.wait(BUDGET)
    assert returncode == 0, f"hack/cluster-e2e.sh failed (log: {LOG}):\n" + "".join(lines[-120:])
    assert lines and lines[-1].startswith("cluster e2e: OK")
