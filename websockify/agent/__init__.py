"""websockify-agent: the service side of a reverse tunnel, dialing out to a websockify rendezvous.

backoff.py    when to dial again: exponential back-off with full jitter (pure)
"""
