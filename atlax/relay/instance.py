"""Who this relay process is among the relay instances serving the same addresses.

An instance has a random 32-bit id, new at every start, and expects `workers * replicas` instances
in all (the cluster size, which it tells its agents: docs/protocol.md, "Relay instances"). The
replicas come from the config file or the control API (`PUT /cluster`); a change is announced to
every tunnel. With a control socket the instance counts as synced (its control state applied,
`/readyz` true) once a control client has set its cluster, which a client does after pushing its
agents.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import anyio

from ..protocol.frames import MAX_CLUSTER_SIZE


def new_instance_id(taken: set[int] | frozenset[int] = frozenset()) -> int:
    """A random nonzero 32-bit instance id that none of `taken` has."""
    while True:
        candidate = secrets.randbits(32)
        if candidate and candidate not in taken:
            return candidate


class Instance:
    def __init__(
        self,
        *,
        id: int | None = None,
        workers: int = 1,
        replicas: int = 1,
        synced: bool = True,
    ) -> None:
        self.id = id if id is not None else new_instance_id()
        self.workers = workers
        self.replicas = replicas
        self.on_size: Callable[[int], None] | None = None  # told every change of `size`
        self.synced_event = anyio.Event()
        if synced:
            self.synced_event.set()

    @property
    def name(self) -> str:
        return f"{self.id:08x}"

    @property
    def size(self) -> int:
        return min(MAX_CLUSTER_SIZE, self.workers * self.replicas)

    @property
    def synced(self) -> bool:
        return self.synced_event.is_set()

    def snapshot(self) -> dict[str, Any]:
        return {
            "instance": self.name,
            "instances": [self.name],
            "workers": self.workers,
            "replicas": self.replicas,
            "size": self.size,
            "synced": self.synced,
        }

    async def set_cluster(self, replicas: int) -> dict[str, Any]:
        """The replicas a control client counted; marks the control state applied."""
        before = self.size
        self.replicas = replicas
        self.synced_event.set()
        if self.size != before and self.on_size is not None:
            self.on_size(self.size)
        return self.snapshot()
