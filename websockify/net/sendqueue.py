"""Sending a queue of buffers on a non-blocking socket: one system call, no copies.

The relay's socket ends, an agent's link and a tunnel stream's user each
keep what they still have to send as a list of buffers; ``send_some``
sends the front of that list at once (sendmsg gathers several buffers on
a plain socket) and leaves the unsent rest in place.
"""

from typing import List

#: Buffers gathered into one sendmsg at most (Linux's IOV_MAX is 1024).
IOV_MAX = 512


def send_some(sock, out: List, plain: bool = True) -> int:
    """Send from the front of ``out``; returns the bytes sent.

    Several buffers go in one sendmsg when ``plain`` (a TLS socket sends
    one buffer at a time).  What was sent leaves ``out``; a buffer sent in
    part is replaced by a view of its rest, not a copy.  BlockingIOError
    and InterruptedError are the caller's to catch.
    """
    if plain and len(out) > 1:
        sent = sock.sendmsg(out[:IOV_MAX])
    else:
        sent = sock.send(out[0])
    left = sent
    # Whole buffers (an empty one too) leave; the rest of a partial one stays.
    while out and left >= len(out[0]):
        left -= len(out[0])
        del out[0]
    if left:
        out[0] = memoryview(out[0])[left:]
    return sent
