"""`atlax relay --workers N`: a supervisor of relay worker processes (docs/high-availability.md).

workers.py  the worker processes: start, sync, restart with backoff, stop
fanout.py   the control API's registry: one desired state applied to every worker, reads merged
metrics.py  /metrics: the workers' expositions summed
"""
