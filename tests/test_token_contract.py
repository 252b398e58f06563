"""websockify 0.13's plugin contract, with the plugins called directly.

Subclasses, embedders and 0.13's own tests build a plugin with ``cls(src)``
and call ``lookup(token)`` themselves: what it returns (the target as the
store holds it, or None) and what it does not raise are checked here,
without a server.  The expected values are 0.13's answers, found by
reading and running its code.
"""

import string

import pytest
from hypothesis import given, settings, strategies as st

from websockify.plugins import tokens as tp


# -- parse_source_args ------------------------------------------------------------------

# websockify 0.13's parse_source_args() answers, found by running it: the
# first fourteen are its own test's, the rest the odd corners of its regex.
SOURCE_ARGS_013 = [
    ('', ['']),
    (':', ['', '']),
    ('::', ['', '', '']),
    ('"', ['"']),
    ('""', ['""']),
    ('"""', ['"""']),
    ('"localhost"', ['localhost']),
    ('"localhost":', ['localhost', '']),
    ('"localhost"::', ['localhost', '', '']),
    ('"local:host"', ['local:host']),
    ('"local:host:"pass"', ['"local', 'host', 'pass']),
    ('"local":"host"', ['local', 'host']),
    ('"local":host"', ['local', 'host"']),
    ('localhost:6379:1:pass"word:"my-app-namespace:dev"',
     ['localhost', '6379', '1', 'pass"word', 'my-app-namespace:dev']),
    ('a:b:"c:d":e', ['a', 'b', 'c:d', 'e']),
    ('host:::pw', ['host', '', '', 'pw']),
    ('h::::"ns1:ns2"', ['h', '', '', '', 'ns1:ns2']),
    ('"a"\n', ['a']),
    ('"a"\n:b', ['"a"\n', 'b']),
    ('"a:b"\n', ['a:b']),
    ('"a:b"c', ['"a', 'b"c']),
    ('"a"b":c', ['"a"b"', 'c']),
    ('"":x', ['""', 'x']),
    (':"a:b"', ['', 'a:b']),
    ('a:""', ['a', '""']),
    ('"a"\n\n', ['"a"\n\n']),
    (':\n', ['', '\n']),
    ('"\n"', ['\n']),
    ('x:"y"\n', ['x', 'y']),
    ('"::1":6379', ['::1', '6379']),
    ('[::1]:6379', ['[', '', '1]', '6379']),
    ('a"b:c', ['a"b', 'c']),
    ('"a:b', ['"a', 'b']),
]


@pytest.mark.parametrize("src, expected", SOURCE_ARGS_013)
def test_parse_source_args_gives_013s_answers(src, expected):
    assert tp.parse_source_args(src) == expected


@settings(max_examples=500)
@given(st.text(alphabet=st.sampled_from('ab:" \n\r\\é'), max_size=40) | st.text(max_size=40))
def test_parse_source_args_never_raises(src):
    fields = tp.parse_source_args(src)
    assert fields and all(isinstance(field, str) for field in fields)
    # at most one field per colon, plus one
    assert len(fields) <= src.count(":") + 1


_PLAIN = st.text(alphabet=string.ascii_letters + string.digits + "-_.@ \n", max_size=8)


@given(st.lists(_PLAIN, min_size=1, max_size=6))
def test_parse_source_args_splits_plain_fields_at_colons(parts):
    assert tp.parse_source_args(":".join(parts)) == parts


@given(st.lists(_PLAIN | st.text(alphabet="ab:", min_size=1, max_size=8).filter(
    lambda part: ":" in part), min_size=1, max_size=6))
def test_parse_source_args_quoted_fields_keep_their_colons(parts):
    src = ":".join('"%s"' % part if ":" in part else part for part in parts)
    assert tp.parse_source_args(src) == parts
