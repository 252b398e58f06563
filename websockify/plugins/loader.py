"""Dotted names -> classes, for --token-plugin and --auth-plugin.

A bare name (``TokenFile``) is looked up in the default module
(``websockify.token_plugins``), as websockify 0.13 does; a dotted name
(``mypackage.plugins.MyPlugin``) is imported as it is.
"""

import importlib
from typing import Any, Optional

from websockify.errors import ConfigError


class PluginLoadError(ConfigError):
    """The named plugin cannot be imported or instantiated."""


def load_class(name: str, default_module: str, what: str = "plugin") -> Any:
    """The class (or any callable) called ``name``; PluginLoadError if there is none."""
    name = (name or "").strip()
    if not name:
        raise PluginLoadError("%s: empty class name" % what)
    if "." in name:
        module_name, _, attr = name.rpartition(".")
    else:
        module_name, attr = default_module, name
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginLoadError("%s %s: cannot import module %s: %s"
                              % (what, name, module_name, exc)) from None
    except Exception as exc:  # a plugin module that fails while importing
        raise PluginLoadError("%s %s: importing %s failed: %s: %s"
                              % (what, name, module_name, type(exc).__name__, exc)) from None
    try:
        cls = getattr(module, attr)
    except AttributeError:
        raise PluginLoadError("%s %s: module %s has no %r" % (what, name, module_name, attr)) from None
    if not callable(cls):
        raise PluginLoadError("%s %s is not a class" % (what, name))
    return cls


def instantiate(name: str, source: Optional[str], default_module: str,
                what: str = "plugin") -> Any:
    """``cls(source)`` as websockify 0.13 does; errors become one-line ConfigErrors."""
    cls = load_class(name, default_module, what)
    try:
        return cls(source)
    except ConfigError:
        raise
    except SystemExit as exc:
        # websockify 0.13's plugins call sys.exit() on a bad source.
        raise PluginLoadError("%s %s gave up on its source %r (exit %s)"
                              % (what, name, source, exc.code)) from None
    except Exception as exc:
        raise PluginLoadError("%s %s: cannot use source %r: %s: %s"
                              % (what, name, source, type(exc).__name__, exc)) from None
