"""The bundled demo: a TCP echo target and a page that talks to it through the bridge."""
