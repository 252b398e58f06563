"""Plugins: classes named on the command line and loaded by the master.

``loader`` turns a name into a class (shared by token and authentication
plugins); ``tokens`` holds the token plugins, which
``websockify.token_plugins`` re-exports under websockify 0.13's names.
"""
