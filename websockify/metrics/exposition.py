"""The Prometheus text format (version 0.0.4) of one snapshot of the server's figures.

Pure: numbers in, bytes out.  The master gathers a ``Snapshot`` (the summed
worker counters, its own figures, the tunnel registry's) and this renders
it; names follow Prometheus's conventions (``websockify_`` prefix,
``_total`` counters, seconds and bytes as base units).
"""

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from websockify.metrics import counters as c

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Snapshot:
    """What one scrape reports."""

    words: Sequence[int]                          # counters.Totals.sum()'s first part
    lookups: Dict[str, Sequence[int]] = field(default_factory=dict)
    workers_serving: int = 0
    worker_restarts: int = 0
    reloads: int = 0
    reload_failures: int = 0
    start_time: float = 0.0
    #: (agents connected, streams open), or None without --tunnel-config.
    tunnels: Optional[Tuple[int, int]] = None


def _value(number: float) -> str:
    if isinstance(number, int):
        return str(number)
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    return repr(float(number))


def _labels(pairs: Sequence[Tuple[str, str]]) -> str:
    if not pairs:
        return ""
    escaped = ('%s="%s"' % (name, value.replace("\\", "\\\\").replace("\n", "\\n")
                                        .replace('"', '\\"')) for name, value in pairs)
    return "{" + ",".join(escaped) + "}"


class _Writer:
    def __init__(self) -> None:
        self.lines: List[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append("# HELP %s %s" % (name, help_text))
        self.lines.append("# TYPE %s %s" % (name, kind))

    def sample(self, name: str, value: float, *labels: Tuple[str, str]) -> None:
        self.lines.append("%s%s %s" % (name, _labels(labels), _value(value)))

    def one(self, name: str, kind: str, help_text: str, value: float) -> None:
        self.family(name, kind, help_text)
        self.sample(name, value)

    def histogram(self, name: str, help_text: str, words: Sequence[int],
                  where: c.HistogramWords) -> None:
        self.family(name, "histogram", help_text)
        for bound, count in where.buckets(words):
            self.sample(name + "_bucket", count, ("le", _value(float(bound))))
        self.sample(name + "_sum", words[where.sum] / 1_000_000)
        self.sample(name + "_count", words[where.count])


def render(snapshot: Snapshot) -> bytes:
    """The exposition of ``snapshot``, every family always present (zeros included)."""
    words = snapshot.words
    out = _Writer()
    out.one("websockify_start_time_seconds", "gauge",
            "When the master started, in seconds since the Unix epoch.", snapshot.start_time)
    out.one("websockify_workers", "gauge",
            "Worker processes serving now (booted, not draining).", snapshot.workers_serving)
    out.one("websockify_worker_restarts_total", "counter",
            "Workers that exited unasked and were replaced.", snapshot.worker_restarts)
    out.one("websockify_reloads_total", "counter",
            "Reloads begun (SIGHUP).", snapshot.reloads)
    out.one("websockify_reload_failures_total", "counter",
            "Reloads whose new workers could not start (the previous ones kept serving).",
            snapshot.reload_failures)
    out.one("websockify_connections_total", "counter",
            "TCP connections accepted by the workers.", words[c.CONNECTIONS])
    out.one("websockify_sessions_open", "gauge",
            "WebSocket sessions open now.", words[c.SESSIONS_OPEN])
    out.family("websockify_sessions_total", "counter",
               "WebSocket sessions ended, by outcome (their close code).")
    for outcome in c.OUTCOMES:
        out.sample("websockify_sessions_total", words[c.SESSIONS[outcome]],
                   ("outcome", outcome))
    out.family("websockify_refusals_total", "counter",
               "Requests refused with an HTTP error status, by status.")
    for status in c.STATUSES:
        out.sample("websockify_refusals_total", words[c.REFUSALS[status]], ("status", status))
    out.histogram("websockify_handshake_duration_seconds",
                  "From accepting a connection to sending its 101 (TLS included).",
                  words, c.HANDSHAKE)
    out.histogram("websockify_session_duration_seconds",
                  "How long ended WebSocket sessions lasted.", words, c.SESSION)
    out.family("websockify_bytes_total", "counter",
               "WebSocket payload bytes relayed, by direction.")
    out.sample("websockify_bytes_total", words[c.BYTES_FROM_CLIENT], ("direction", "from_client"))
    out.sample("websockify_bytes_total", words[c.BYTES_TO_CLIENT], ("direction", "to_client"))
    out.family("websockify_token_lookups_total", "counter",
               "Token plugin lookups, by plugin and result.")
    for plugin in sorted(snapshot.lookups):
        for position, result in enumerate(c.LOOKUP_RESULTS):
            out.sample("websockify_token_lookups_total", snapshot.lookups[plugin][position],
                       ("plugin", plugin), ("result", result))
    out.one("websockify_tls_handshakes_total", "counter",
            "TLS handshakes begun with clients.", words[c.TLS_HANDSHAKES])
    out.one("websockify_tls_handshake_failures_total", "counter",
            "TLS handshakes with clients that failed or timed out.", words[c.TLS_FAILURES])
    if snapshot.tunnels is not None:
        agents, streams = snapshot.tunnels
        out.one("websockify_tunnel_agents_connected", "gauge",
                "Reverse-tunnel agents connected now.", agents)
        out.one("websockify_tunnel_streams_open", "gauge",
                "Streams open now through the connected agents.", streams)
    return ("\n".join(out.lines) + "\n").encode("utf-8")
