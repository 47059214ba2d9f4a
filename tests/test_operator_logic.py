"""The operator's pure parts, without an API server: the election's rules on a fake clock, the
aggregation of relay reports into a TunnelAgent's status, the sync's desired state."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from atlax_operator.claims import Holdings
from atlax_operator.election import Election, LeaseRecord
from atlax_operator.reports import AgentReport, RelayReport, report_lease_name
from atlax_operator.status import ConnectedReason, PortsReason, live_agent, service_keys
from atlax_operator.sync import cluster_replicas, desired_state, live_tunnels, serving_readiness

WALL = datetime(2025, 1, 1, tzinfo=UTC)


def wall(t: float) -> datetime:
    return WALL + timedelta(seconds=t)


class Api:
    """A Lease with optimistic concurrency, as the API server keeps it."""

    def __init__(self) -> None:
        self.record: LeaseRecord | None = None
        self.version = 0

    def read(self) -> LeaseRecord | None:
        return self.record

    def write(self, record: LeaseRecord) -> LeaseRecord | None:
        current = None if self.record is None else self.record.version
        if record.version != current:
            return None  # 409: someone wrote since that read
        self.version += 1
        self.record = replace(record, version=str(self.version))
        return self.record


def attempt(election: Election, api: Api, now: float) -> bool:
    want = election.observe(api.read(), now, wall(now))
    if want is None:
        return False
    written = api.write(want)
    if written is None:
        return False
    election.written(written, now)
    return election.leading(now)


def test_the_first_candidate_creates_the_lease_and_leads() -> None:
    api, a, b = Api(), Election("a", 15, 10, 2), Election("b", 15, 10, 2)
    assert attempt(a, api, 0.0)
    assert api.record is not None and api.record.holder == "a" and api.record.transitions == 0
    assert api.record.duration == 15 and api.record.acquire_time == wall(0)
    assert not attempt(b, api, 0.5)
    assert b.holder == "a" and not b.leading(0.5)


def test_a_renewing_leader_keeps_the_lease_and_others_wait() -> None:
    api, a, b = Api(), Election("a", 15, 10, 2), Election("b", 15, 10, 2)
    assert attempt(a, api, 0.0)
    for t in range(2, 60, 2):
        assert attempt(a, api, float(t))
        assert not attempt(b, api, t + 1.0)  # every renewal restarts b's count
    assert api.record is not None and api.record.acquire_time == wall(0)  # renewals keep it
    assert api.record.renew_time == wall(58)


def test_a_silent_leader_is_replaced_after_the_lease_duration_by_the_followers_clock() -> None:
    """The follower counts from when it saw the record change, with its own clock: the holder's
    timestamps (another machine's clock) are never compared with it."""
    api, a, b = Api(), Election("a", 15, 10, 2), Election("b", 15, 10, 2)
    assert attempt(a, api, 0.0)
    assert not attempt(b, api, 100.0)  # first sight of a's record at b's time 100
    assert b.expires_in(100.0) == 15.0
    assert not attempt(b, api, 114.9)
    assert attempt(b, api, 115.0)
    assert api.record is not None and api.record.holder == "b"
    assert api.record.transitions == 1 and api.record.acquire_time == wall(115)
    assert not a.leading(10.0)  # a stopped renewing at 0: past its own renew deadline


def test_a_leader_that_cannot_renew_stops_before_anyone_else_may_take_over() -> None:
    api, a, b = Api(), Election("a", 15, 10, 2), Election("b", 15, 10, 2)
    assert attempt(a, api, 0.0)
    assert not attempt(b, api, 0.0)
    assert a.leading(9.9) and a.leading_for(9.0) == pytest.approx(1.0)
    assert not a.leading(10.0)  # renewals failed for the renew deadline: stop acting
    assert not attempt(b, api, 14.9)  # the others still wait: no two leaders at once
    assert attempt(b, api, 15.0)


def test_a_leader_that_sees_another_holder_stops_at_once() -> None:
    api, a, b = Api(), Election("a", 15, 10, 2), Election("b", 15, 10, 2)
    assert attempt(a, api, 0.0)
    assert not attempt(b, api, 0.0)
    assert attempt(b, api, 15.0)  # a was partitioned away and b took over
    assert a.leading(9.0)
    a.observe(api.read(), 9.0, wall(9))  # a's next read: someone else holds it
    assert not a.leading(9.0) and a.holder == "b"


def test_two_candidates_writing_at_once_one_wins() -> None:
    api, a, b = Api(), Election("a", 15, 10, 2), Election("b", 15, 10, 2)
    want_a = a.observe(api.read(), 0.0, wall(0))
    want_b = b.observe(api.read(), 0.0, wall(0))
    assert want_a is not None and want_b is not None
    written = api.write(want_a)
    assert written is not None
    a.written(written, 0.0)
    assert api.write(want_b) is None  # its read is stale: 409
    assert a.leading(0.0) and not b.leading(0.0)


def test_a_released_lease_is_taken_at_once() -> None:
    api, a, b = Api(), Election("a", 15, 10, 2), Election("b", 15, 10, 2)
    assert attempt(a, api, 0.0)
    assert not attempt(b, api, 1.0)
    release = a.release(wall(2))
    assert release is not None and release.holder == "" and not a.leading(2.0)
    assert api.write(release) is not None
    assert attempt(b, api, 2.5)  # no holder: no need to wait out the duration
    assert api.record is not None and api.record.transitions == 1
    assert a.release(wall(3)) is None  # not ours any more


@pytest.mark.parametrize(("duration", "deadline", "retry"), [(10, 10, 2), (15, 10, 0), (5, 10, 2)])
def test_election_timings_must_be_ordered(duration: float, deadline: float, retry: float) -> None:
    with pytest.raises(ValueError, match="retry period < renew deadline < lease duration"):
        Election("a", duration, deadline, retry)


# -- status from reports -------------------------------------------------------------------------

WEB = service_keys([{"name": "web", "port": 8080}])


def relay(pod: str, instances: int = 1, **agents: AgentReport) -> RelayReport:
    return RelayReport(pod, ready=True, instances=instances, relay_id=pod, agents=agents)


def test_an_agent_connected_to_every_ready_instance_is_up() -> None:
    reports = [
        relay("r1", home=AgentReport(WEB, 1, "198.51.100.7:4000", bytes_in=10, bytes_out=5)),
        relay("r2", 2, home=AgentReport(WEB, 2, "198.51.100.7:4001", bytes_in=1, bytes_out=2)),
        RelayReport("r3", ready=False, error="starting"),  # not ready: not counted
    ]
    live = live_agent("home", WEB, reports)
    assert (live.connected_instances, live.relay_instances, live.tunnels) == (3, 3, "3/3")
    assert live.reason is ConnectedReason.TUNNEL_UP and live.connected
    assert live.message == "tunnels to all 3 relay instances"
    assert live.ports.reason is PortsReason.OPEN
    assert live.ports.message == "ports web:8080 open on all 2 relays"
    assert (live.bytes_in, live.bytes_out) == (11, 7)


def test_an_agent_connected_to_some_instances_is_partial() -> None:
    reports = [relay("r1", home=AgentReport(WEB, 1)), relay("r2", 2, home=AgentReport(WEB, 1))]
    live = live_agent("home", WEB, reports)
    assert live.reason is ConnectedReason.PARTIAL and not live.connected
    assert live.tunnels == "2/3" and live.message == "tunnels to 2 of 3 relay instances"


def test_one_relay_reads_as_before() -> None:
    up = live_agent("home", WEB, [relay("r1", home=AgentReport(WEB, 1, "203.0.113.9:5000"))])
    assert up.message == "tunnel up from 203.0.113.9:5000"
    assert up.ports.message == "ports web:8080 open on the relay"
    down = live_agent("home", WEB, [relay("r1", home=AgentReport(WEB, 0))])
    assert down.reason is ConnectedReason.TUNNEL_DOWN and down.tunnels == "0/1"


def test_ports_not_yet_open_everywhere_are_pending() -> None:
    live = live_agent("home", WEB, [relay("r1", home=AgentReport(WEB)), relay("r2")])
    assert live.ports.reason is PortsReason.PENDING
    assert live.ports.message == "ports web:8080 open on 1 of 2 relays"


def test_a_relay_that_refused_the_ports_names_itself() -> None:
    refused = AgentReport(refused="PortConflict", message="port 8080 is in use")
    live = live_agent("home", WEB, [relay("r1", home=AgentReport(WEB)), relay("r2", home=refused)])
    assert live.ports.reason is PortsReason.PORT_CONFLICT
    assert live.ports.message == "relay r2: port 8080 is in use"


def test_no_ready_relay_says_why() -> None:
    live = live_agent("home", WEB, [RelayReport("r1", ready=False, error="cannot reach it")])
    assert live.ports.reason is PortsReason.RELAY_UNAVAILABLE
    assert live.message == "relay not reachable: cannot reach it" and live.tunnels == "0/0"
    assert live_agent("home", WEB, []).message == "no relay is ready yet"


def test_a_report_survives_its_json_and_counters_are_not_material() -> None:
    report = relay("r1", 2, home=AgentReport(WEB, 2, "p", "2025-01-01T00:00:00Z", 5, 6, 1))
    assert RelayReport.from_json(report.to_json()) == report
    busier = relay("r1", 2, home=AgentReport(WEB, 2, "p", "2025-01-01T00:00:09Z", 50, 60, 3))
    assert busier.material() == report.material()
    assert relay("r1", 2, home=AgentReport(WEB, 1, "p")).material() != report.material()


def test_report_lease_names_fit_a_name() -> None:
    assert report_lease_name("atlax-7c9f-abcde") == "atlax-report-atlax-7c9f-abcde"
    long = report_lease_name("p" * 253)
    assert len(long) <= 253 and long != report_lease_name("p" * 252 + "q")


# -- the sync's desired state --------------------------------------------------------------------


PIN = "sha256:" + "A" * 43 + "="


def agent(
    name: str, *ports: int, deleting: bool = False, pins: tuple[str, ...] = (PIN,), **spec: object
) -> dict[str, object]:
    """A TunnelAgent; `pins`: its status.keyPins (what the controller wrote with its certificate)."""
    metadata: dict[str, object] = {"name": name}
    if deleting:
        metadata["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    services = [{"name": f"s{p}", "port": p} for p in ports]
    status = {"keyPins": list(pins)} if pins else {}
    return {"metadata": metadata, "spec": {"services": services, **spec}, "status": status}


def holdings(ports: dict[str, str], shared: dict[str, object] | None = None) -> Holdings:
    annotations = {"atlax.dev/ports": json.dumps(ports)}
    if shared:
        annotations["atlax.dev/hostnames"] = json.dumps(shared)
    return Holdings.read(annotations, [(7443, "TCP")])


def test_only_agents_whose_claims_are_all_granted_are_pushed() -> None:
    held = holdings(
        {"80": "ns/web", "81": "ns/web", "90": "ns/other", "82": "ns/moved", "84": "ns/unpinned"}
    )
    desired = desired_state(
        [
            agent("web", 80, 81, maxStreams=5),
            agent("moved", 83),  # its spec names a port not granted (yet): 82 is still its own
            agent("thief", 90),  # granted to someone else
            agent("gone", 80, deleting=True),
            agent("unpinned", 84, pins=()),  # no certificate yet: no key it may present
        ],
        held,
        "ns",
        replicas=3,
    )
    assert set(desired.specs) == {"web"}
    assert desired.specs["web"] == {
        "services": [{"name": "s80", "port": 80}, {"name": "s81", "port": 81}],
        "pins": [PIN],
        "max_streams": 5,
    }
    assert desired.existing == {"web", "moved", "thief", "unpinned"} and desired.replicas == 3
    # What the relay may keep of an agent not pushed: nothing granted to someone else.
    assert desired.may_keep("moved", {"services": [{"name": "s82", "port": 82}]})
    assert not desired.may_keep("thief", {"services": [{"name": "s90", "port": 90}]})
    assert not desired.may_keep("gone", {"services": [{"name": "s80", "port": 80}]})
    assert not desired.may_keep("stray", {"services": []})


def test_a_shared_port_is_pushed_once_its_hostnames_are_granted() -> None:
    item = agent("nas")
    item["spec"] = {
        "services": [
            {"name": "web", "port": 443, "route": "tls", "hostnames": ["nas.example.com"]},
            {"name": "dns", "port": 53, "protocol": "udp"},
        ]
    }
    shared = {"443": {"route": "tls", "hostnames": {"nas.example.com": "ns/nas"}}}
    desired = desired_state([item], holdings({"53/udp": "ns/nas"}, shared), "ns")
    assert desired.specs["nas"]["services"] == [
        {"name": "web", "port": 443, "route": "tls", "hostnames": ["nas.example.com"]},
        {"name": "dns", "port": 53, "protocol": "udp"},
    ]
    other = {"443": {"route": "tls", "hostnames": {"nas.example.com": "ns/other"}}}
    assert desired_state([item], holdings({"53/udp": "ns/nas"}, other), "ns").specs == {}
    assert desired_state([item], holdings({}, shared), "ns").specs == {}  # no 53/udp yet


def test_the_relay_spec_carries_every_service_option() -> None:
    item = agent("web")
    item["spec"] = {
        "services": [
            {
                "name": "web",
                "port": 80,
                "proxyProtocol": "v2",
                "allowedSourceRanges": ["192.0.2.0/24"],
                "maxConnections": 7,
            }
        ]
    }
    desired = desired_state([item], holdings({"80": "ns/web"}), "ns")
    assert desired.specs["web"]["services"] == [
        {
            "name": "web",
            "port": 80,
            "proxy_protocol": "v2",
            "allow": ["192.0.2.0/24"],
            "max_connections": 7,
        }
    ]


def test_tunnels_are_counted_per_instance_when_the_relay_lists_them() -> None:
    assert live_tunnels({"connected": True}) == 1 and live_tunnels({"connected": False}) == 0
    instances = [{"instance": "2a5f01c3", "connected": True}, {"instance": "0b1c2d3e"}]
    assert live_tunnels({"connected": True, "instances": instances}) == 2
    assert live_tunnels({"connected": False, "instances": []}) == 0


def test_a_new_relay_pod_serves_once_the_connected_agents_reached_it() -> None:
    """Serving readiness (the sync's /readyz, the pod's readiness): the relay has its state, and
    every agent connected elsewhere holds a tunnel to each of its instances, or the grace passed."""
    online, offline = agent("online", 80), agent("offline", 81)
    online["status"] = {**online["status"], "connectedInstances": 2}  # type: ignore[dict-item]
    held = holdings({"80": "ns/online", "81": "ns/offline"})
    desired = desired_state([online, offline], held, "ns")
    assert desired.connected == {"online"}

    def report(tunnels: int, ready: bool = True) -> RelayReport:
        agents = {"online": AgentReport(tunnels=tunnels), "offline": AgentReport()}
        return RelayReport("relay-3", ready, instances=2, agents=agents)

    assert serving_readiness(None, report(0), 0, 60) == (
        False,
        "the relay does not have its state yet",
    )
    assert serving_readiness(desired, report(0, ready=False), 0, 60)[0] is False
    assert serving_readiness(desired, report(1), 5, 60) == (
        False,
        "waiting for the tunnels of online",
    )
    # Every instance of the pod (its workers) holds the tunnel: ready; the agent that is
    # offline everywhere is not waited for.
    assert serving_readiness(desired, report(2), 5, 60)[0] is True
    assert serving_readiness(desired, report(0), 60, 60) == (
        True,
        "waited 60s for the tunnels of online",
    )


def test_the_cluster_size_counts_pods_whose_relay_can_take_agents() -> None:
    """Relay pods in the EndpointSlices (ready or not) that are not terminating and whose sync
    reports their relay ready, and this pod: a starting pod counts once it can take agents (they
    must find it before it is Ready), a terminating one at once no more."""
    endpoints = {"a": False, "b": False, "c": True, "d": False}  # c terminating
    assert cluster_replicas(endpoints, {"a", "b", "c"}, "a") == 2  # d has no ready relay yet
    assert cluster_replicas(endpoints, {"a", "b", "c", "d"}, "a") == 3
    assert cluster_replicas({}, set(), "new") == 1  # itself, before its endpoint is listed
