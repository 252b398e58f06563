"""Reverse tunnels: agents behind NAT dial out to the server, users reach their services through it.

``config`` reads ``--tunnel-config`` (our TOML layout or reverse_websockify's
``config.toml``) into an immutable TunnelConfig; ``agent_token`` signs and
verifies the agents' HS256 tokens.
"""
