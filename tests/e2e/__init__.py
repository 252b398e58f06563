"""End-to-end tests: real server processes on loopback, real clients."""
