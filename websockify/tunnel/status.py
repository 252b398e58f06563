"""The tunnel status page: the document (plain values) and its HTML rendering.

Pure: the registry's rows, the configuration and ``now`` in, a dict or a
string out.  Times are Unix seconds (floats) in JSON and UTC in the HTML.
"""

import html
import time
from typing import Iterable, Mapping

STATUS_VERSION = 1


def build_document(config, rows: Iterable[Mapping], now: float) -> dict:
    """One entry per configured agent (connected or not) and per openly registered
    one, in ID order."""
    by_id = {row["id"]: row for row in rows}
    http_path = getattr(config, "http_path", "/t/")
    ids = set(config.agents)
    if getattr(config, "open", False):
        ids.update(row["id"] for row in by_id.values() if row.get("open"))
    agents = []
    for agent_id in sorted(ids):
        entry = config.agents.get(agent_id)
        row = by_id.get(agent_id, {})
        connected = bool(row.get("connected"))
        connects = int(row.get("connects", 0))
        listen = "%s:%d" % entry.listen if entry is not None and entry.listen else None
        bridge = bool(entry is not None and entry.token)
        http = entry.http if entry is not None else bool(row.get("open"))
        agents.append({
            "id": agent_id,
            "nickname": entry.nickname if entry is not None else "",
            "open": entry is None,
            "connected": connected,
            "peer": row.get("peer") if connected else None,
            "connected_since": row.get("connected_since") if connected else None,
            "reconnects": max(0, connects - 1),
            "open_streams": int(row.get("open_streams", 0)) if connected else 0,
            "bytes_to_agent": int(row.get("bytes_to_agent", 0)),
            "bytes_from_agent": int(row.get("bytes_from_agent", 0)),
            "token_expires": row.get("token_expires") if connected else None,
            "worker": int(row.get("worker", 0)) if connected else None,
            "listen": listen,
            "bridge": bridge,
            "faces": {"tcp": listen,
                      "bridge": "?token=%s" % agent_id if bridge else None,
                      "http": "%s%s/" % (http_path, agent_id) if http else None},
            "viewers": int(row.get("viewers", 0)),
            "requests": int(row.get("requests", 0)),
        })
    return {"version": STATUS_VERSION, "now": now, "path": config.path,
            "http_path": http_path, "agents": agents}


def _when(value) -> str:
    if value is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value))


def render_html(document: Mapping) -> str:
    """A small table, one row per agent."""
    head = ("ID", "nickname", "node", "faces", "peer", "connected since", "reconnects",
            "open streams", "viewers", "requests", "bytes to agent", "bytes from agent",
            "token expires")
    rows = []
    for agent in document["agents"]:
        faces = ", ".join("%s %s" % (name, where) for name, where in agent["faces"].items()
                          if where) or "-"
        cells = (agent["id"], agent["nickname"] or "", agent.get("node") or "-", faces,
                 agent["peer"] or "-", _when(agent["connected_since"]),
                 str(agent["reconnects"]), str(agent["open_streams"]), str(agent["viewers"]),
                 str(agent["requests"]), str(agent["bytes_to_agent"]),
                 str(agent["bytes_from_agent"]), _when(agent["token_expires"]))
        rows.append("<tr>%s</tr>" % "".join("<td>%s</td>" % html.escape(cell)
                                             for cell in cells))
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>websockify tunnels"
            "</title></head><body>\n<h1>Tunnels</h1>\n<p>%d agent(s), %d connected, at %s</p>\n"
            "<table border=\"1\">\n<tr>%s</tr>\n%s\n</table>\n</body></html>\n"
            % (len(document["agents"]),
               sum(1 for agent in document["agents"] if agent["connected"]),
               html.escape(_when(document["now"])),
               "".join("<th>%s</th>" % html.escape(name) for name in head),
               "\n".join(rows)))
