#!/bin/sh
# Starts `atlax agent` from a mounted bundle or from environment variables.
#   mounted:  /etc/atlax/agent/{tls.crt,tls.key,ca.crt,relay}   (ATLAX_BUNDLE to change the path)
#   env:      ATLAX_RELAY=host:port ATLAX_CA=<PEM> ATLAX_CERT=<PEM> ATLAX_KEY=<PEM>
#   always:   ATLAX_SERVICES="smb=127.0.0.1:445,web=127.0.0.1:8080"
# Extra arguments are passed to `atlax agent`.
set -eu
bundle="${ATLAX_BUNDLE:-/etc/atlax/agent}"
if [ -n "${ATLAX_CERT:-}" ]; then
    bundle="$(mktemp -d)"   # /tmp: mount a tmpfs there with a read-only root filesystem
    umask 077
    printf '%s\n' "$ATLAX_CA" > "$bundle/ca.crt"
    printf '%s\n' "$ATLAX_CERT" > "$bundle/tls.crt"
    printf '%s\n' "$ATLAX_KEY" > "$bundle/tls.key"
    printf '%s' "${ATLAX_RELAY:?ATLAX_RELAY is required with ATLAX_CERT}" > "$bundle/relay"
fi
for f in tls.crt tls.key ca.crt; do
    [ -r "$bundle/$f" ] || { echo "atlax-agent: missing $bundle/$f (mount Secret atlax-agent-NAME there, or set ATLAX_CERT/ATLAX_KEY/ATLAX_CA)" >&2; exit 1; }
done
relay="${ATLAX_RELAY:-$(cat "$bundle/relay" 2>/dev/null || true)}"
[ -n "$relay" ] || { echo "atlax-agent: no relay address (file $bundle/relay or ATLAX_RELAY)" >&2; exit 1; }
set -- --relay "$relay" --ca "$bundle/ca.crt" --cert "$bundle/tls.crt" --key "$bundle/tls.key" "$@"
old_ifs=$IFS; IFS=','
for service in ${ATLAX_SERVICES:-}; do
    [ -n "$service" ] && set -- "$@" --service "$service"
done
IFS=$old_ifs
exec atlax agent "$@"
