"""Sockets and TLS: listeners, socket options, TLS contexts and streams."""
