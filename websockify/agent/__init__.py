"""websockify-agent: the service side of a reverse tunnel, dialing out to a websockify server.

cli.py        argv -> AgentConfig, main()
transport.py  the agent's I/O (gevent): dial, the mux over the WebSocket, service connections
backoff.py    when to dial again: exponential back-off with full jitter (pure)
tokens.py     the bearer token: a file read at each connection, or lines from stdin
"""
