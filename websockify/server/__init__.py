"""One worker's serving side: the HTTP handler, the pywsgi server, sessions and relays."""
