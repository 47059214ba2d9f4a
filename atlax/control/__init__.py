"""The relay's control socket: `server` (the API, over a registry protocol) and `client`.

Nothing is imported here, so that `atlax.control.client` stays free of the relay.
"""
