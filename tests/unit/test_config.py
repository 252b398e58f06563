"""The configuration (websockify.config): built from keyword arguments as from argv, immutable."""

import dataclasses
import os

import pytest

from websockify import cli
from websockify.config import OPTIONS, Config, defaults
from websockify.errors import UsageError


def test_from_kwargs_equals_the_command_line():
    by_argv = cli.parse_args(["--heartbeat", "5", "--web", ".", "--workers", "3",
                              "127.0.0.1:6080", "localhost:5900"])
    by_kwargs = Config.from_kwargs(listen_host="127.0.0.1", listen_port=6080,
                                   target_host="localhost", target_port=5900,
                                   heartbeat=5.0, web=".", workers=3,
                                   listen_fds=by_argv.listen_fds)
    assert by_kwargs == by_argv
    assert by_kwargs.web == os.path.abspath(".")
    assert by_kwargs.heartbeat == 5.0 and by_kwargs.connect_timeout == 10.0


def test_defaults_cover_every_option():
    values = defaults()
    assert set(values) == {opt.dest for opt in OPTIONS}
    assert values["graceful_timeout"] == 30.0 and values["verbose"] is False


def test_unknown_keyword_is_a_type_error_naming_it():
    with pytest.raises(TypeError) as info:
        Config.from_kwargs(listen_port=6080, bogus=1, heartbaet=2)
    assert str(info.value) == "unknown option(s): bogus, heartbaet"


@pytest.mark.parametrize("kwargs, message", [
    ({"heartbeat": -1.0}, "--heartbeat must not be negative"),
    ({"connect_timeout": 0.0}, "--connect-timeout must be positive"),
    ({"workers": 0}, "--workers must be at least 1"),
    ({"max_frame_size": 100}, "--max-frame-size must be at least 126 bytes"),
    ({"heartbeat_timeout": 3.0}, "--heartbeat-timeout needs --heartbeat"),
    ({"token_source": "x"}, "You must use --token-plugin to use --token-source"),
    ({"unix_listen_mode": "9x"}, "Error parsing listen unix socket mode"),
])
def test_kwargs_are_checked_as_the_command_line_is(kwargs, message):
    with pytest.raises(UsageError) as info:
        Config.from_kwargs(listen_port=6080, target_host="h", target_port=1, **kwargs)
    assert str(info.value) == message


def test_parsed_values():
    config = Config.from_kwargs(listen_port=6080, echo=True, unix_listen_mode="640",
                                syslog="127.0.0.1:514", trusted_proxy="10.0.0.0/8")
    assert config.unix_listen_mode == 0o640
    assert str(config.syslog) == "127.0.0.1:514"
    assert config.trusted_proxy is not None and not isinstance(config.trusted_proxy, str)


def test_config_cannot_be_changed_only_replaced():
    config = Config.from_kwargs(listen_port=6080, target_host="h", target_port=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.target_port = 2
    with pytest.raises(TypeError):
        config.options["heartbeat"] = 3.0
    moved = config.replace(target_host="127.0.0.1", target_port=4242)
    assert (moved.target_host, moved.target_port) == ("127.0.0.1", 4242)
    assert (config.target_host, config.target_port) == ("h", 1)
    assert moved.options == config.options


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError):
        Config.from_kwargs(listen_port=6080, echo=True).no_such_option
