"""The HAProxy fixture of the high-availability tests: atlax/bench/haproxy.py (the benchmark uses
the same load balancer, so it lives in the package)."""

from atlax.bench.haproxy import (
    FRONTEND_HOST,
    HAPROXY,
    SERVER_HOSTS,
    Frontend,
    HAProxy,
    HAProxyError,
    Server,
    shared_port,
)

__all__ = [
    "FRONTEND_HOST",
    "HAPROXY",
    "SERVER_HOSTS",
    "Frontend",
    "HAProxy",
    "HAProxyError",
    "Server",
    "shared_port",
]
