"""The Atlax operator: TunnelAgent custom resources -> certificates, relay ports, status.

Lives in the directory `operator/` (not a package of that name: `operator` is a standard-library
module) and is installed as the package `atlax_operator`.
"""

GROUP = "atlax.dev"
VERSION = "v1alpha1"
PLURAL = "tunnelagents"
KIND = "TunnelAgent"
FINALIZER = "atlax.dev/cleanup"  # on every TunnelAgent while the operator runs (kopf)
