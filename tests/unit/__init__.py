"""Pure tests: bytes, events and fake processes in; no socket and no server process."""
