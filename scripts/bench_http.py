"""HTTP phase of scripts/bench: viewers through the tunnel's HTTP face, ours against
websocktunnel and the direct service, side by side in one run on 127.0.0.1.

Paths (one HTTP service behind them all, scripts/bench_http_service.py):
  ours            websockify --workers 2 --tunnel-config F ([tunnels] http_path = "/t/",
                  the agent's entry http = true) and websockify-agent --http; viewers
                  GET /t/<ID>/...
  ours, wst-client  the same server with websocktunnel's own client (wst-client, built
                  by ../shared/peers/build.sh) as the agent: it registers at "/" with
                  x-websocktunnel-id; viewers use the URL it writes to --out-file
  websocktunnel   websocktunnel's own server and wst-client
  direct          the service itself

Measurements:
  download        one GET of --http-size MiB (default 256), MB/s from the request to
                  the body's last byte; median of --rounds, except a path whose first
                  download took over SLOW_DOWNLOAD seconds is measured once
  small requests  VIEWERS keep-alive viewers, each doing sequential GETs of a
                  SMALL_BODY-byte body, counted for SMALL_SECONDS after a warm-up:
                  requests per second, and the bench client's own CPU share
  two instances   two of ours sharing one redis-server, the agent held by the first:
                  the same download at the other instance (carried over the internal
                  link) against the holding instance

Before any timing each path answers GET /check (16 MiB) whose CRC-32 must be
the file's; every timed download checks its Content-Length, its length and its
last bytes.  The script is loaded by scripts/bench_tunnel.py (T), with scripts/bench's
helpers (B).
"""

import os
import re
import resource
import select
import socket
import time
import zlib

VIEWERS = 100
SMALL_BODY = 100
SMALL_SECONDS = 3.0
SMALL_WARMUP = 1.0
SLOW_DOWNLOAD = 5.0
CHECK_SIZE = 16 << 20           # as bench_http_service.py's /check
TAIL = 1 << 20
HTTP_PATH = "/t/"
OURS_ID, WST_ID = "bench", "wstbench"
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
CONNECTION_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)
PATHS = ("ours", "ours-wst", "websocktunnel", "direct")
LABELS = {"ours": "ours", "ours-wst": "ours, wst-client agent",
          "websocktunnel": "websocktunnel", "direct": "direct"}


def _exited(proc, what):
    """The error for a process that should be running: its log's last line and where it is."""
    last = (proc.log_tail(1) or "no output").strip()
    return B.BenchError("%s exited (%s): %s" % (what, os.path.relpath(proc.log_path, B.ROOT),
                                                 last))


def _request(port, path, close=False):
    return ("GET %s HTTP/1.1\r\nHost: %s:%d\r\n%s\r\n" % (
        path, B.HOST, port, "Connection: close\r\n" if close else "")).encode()


def _read_head(sock, what):
    """(Content-Length, the body bytes read with the head) of a 200 answer."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise B.BenchError("%s: closed before the answer's head (%r)" % (what, data[:80]))
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if not status.startswith(b"HTTP/1.1 200") and not status.startswith(b"HTTP/1.0 200"):
        raise B.BenchError("%s: answered %r" % (what, status.decode("latin-1")))
    match = CONTENT_LENGTH.search(b"\r\n" + head)
    if not match:
        raise B.BenchError("%s: no Content-Length in %r" % (what, head.decode("latin-1")))
    return int(match.group(1)), rest


def download(port, path, size, tail, timeout=600):
    """MB/s of one GET of ``size`` bytes into a preallocated buffer; checks the last bytes."""
    what = "GET %s at port %d" % (path, port)
    sock = socket.create_connection((B.HOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    view = memoryview(bytearray(1 << 20))
    try:
        t0 = time.perf_counter()
        sock.sendall(_request(port, path, close=True))
        length, last = _read_head(sock, what)
        if length != size:
            raise B.BenchError("%s: Content-Length %d, want %d" % (what, length, size))
        got, n = T.drain(sock, size - len(last), view)
        got += len(last)
        elapsed = time.perf_counter() - t0
    finally:
        sock.close()
    if got != size:
        raise B.BenchError("%s: body of %d bytes, want %d" % (what, got, size))
    end = bytes(view[:n]) if n else last
    if tail[len(tail) - len(end):] != end[-len(tail):]:
        raise B.BenchError("%s: the body's last bytes are not the file's" % what)
    return size / elapsed / 1e6


def check(port, path, crc, length):
    """A GET of /check whose body's CRC-32 must be ``crc`` (untimed)."""
    what = "GET %s at port %d" % (path, port)
    with socket.create_connection((B.HOST, port), timeout=120) as sock:
        sock.sendall(_request(port, path, close=True))
        got_length, body = _read_head(sock, what)
        body = bytearray(body)
        while len(body) < got_length:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            body += chunk
    if got_length != length or len(body) != length or zlib.crc32(body) != crc:
        raise B.BenchError("%s: %d bytes (Content-Length %d), want %d with CRC-32 %08x"
                           % (what, len(body), got_length, length, crc))


def tree_cpu(pid):
    """CPU seconds (user + system) used so far by ``pid`` and its descendants."""
    ticks = 0
    for member in B.proc_tree(pid):
        try:
            with open("/proc/%d/stat" % member) as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])      # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def _cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def small_requests(port, path, viewers=VIEWERS, warmup=SMALL_WARMUP, seconds=SMALL_SECONDS,
                   body=SMALL_BODY):
    """(requests/s, this client's CPU seconds per second, the share of answers that closed
    their connection, the share closed without saying so) for keep-alive viewers on one
    epoll loop.

    A viewer told "Connection: close" reads its answer and reconnects; one
    whose idle connection was closed after an answer without it reconnects and
    asks again, as browsers and curl do.
    """
    request = _request(port, path)
    poller = select.epoll()
    conns = {}

    def open_viewer():
        sock = socket.create_connection((B.HOST, port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        conns[sock.fileno()] = (sock, bytearray(), [0])     # [answers on it]
        poller.register(sock.fileno(), select.EPOLLIN)
        sock.send(request)

    def close_viewer(fd):
        sock = conns.pop(fd)[0]
        poller.unregister(fd)
        sock.close()
    try:
        for _ in range(viewers):
            open_viewer()
        answers = closes = silent = 0
        counted_from = None
        begin = time.monotonic()
        while True:
            now = time.monotonic()
            if counted_from is None and now >= begin + warmup:
                counted_from = (answers, time.perf_counter(), _cpu())
            if now >= begin + warmup + seconds:
                break
            for fd, _ in poller.poll(0.1):
                sock, buf, answered = conns[fd]
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    data = b""
                if not data and not buf and answered[0]:
                    silent += 1
                    close_viewer(fd)
                    open_viewer()
                    continue
                if not data:
                    raise B.BenchError("GET %s at port %d: a viewer's connection closed "
                                       "(%d answers so far)" % (path, port, answers))
                buf += data
                while True:
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        break
                    match = CONTENT_LENGTH.search(buf, 0, end + 2)
                    if not buf.startswith(b"HTTP/1.1 200") or not match:
                        raise B.BenchError("GET %s at port %d: answered %r" % (
                            path, port, bytes(buf[:end]).decode("latin-1")))
                    length = int(match.group(1))
                    if length != body:
                        raise B.BenchError("GET %s: a %d-byte body, want %d" % (
                            path, length, body))
                    if len(buf) < end + 4 + length:
                        break
                    answers += 1
                    answered[0] += 1
                    if CONNECTION_CLOSE.search(buf, 0, end + 2):
                        closes += 1
                        close_viewer(fd)
                        open_viewer()
                        break
                    del buf[:end + 4 + length]
                    sock.send(request)
        first, t0, cpu0 = counted_from
        elapsed = time.perf_counter() - t0
        # the shares over the whole run: a window's edges would cut answers from their closes
        return ((answers - first) / elapsed, (_cpu() - cpu0) / elapsed,
                closes / max(1, answers), silent / max(1, answers))
    finally:
        for state in conns.values():
            state[0].close()
        poller.close()


# -- the processes ----------------------------------------------------------------------

def big_file(workdir, size):
    """(path, CRC-32 of its first CHECK_SIZE bytes, its last TAIL bytes); made once per size."""
    path = os.path.join(workdir, "http-body.bin")
    if not os.path.exists(path) or os.path.getsize(path) != size:
        block = os.urandom(1 << 20)
        with open(path, "wb") as handle:
            left = size
            while left > 0:
                # a different block per MiB, so a misplaced MiB shows in the CRC
                chunk = block[:min(left, len(block))]
                handle.write(chunk)
                block = block[1:] + block[:1]
                left -= len(chunk)
    with open(path, "rb") as handle:
        crc = zlib.crc32(handle.read(CHECK_SIZE))
        handle.seek(max(0, size - TAIL))
        tail = handle.read()
    return path, crc, tail


def warm(path):
    """Read ``path`` through once, so that the download timed next finds it in the page
    cache: the kernel reclaims a file left unread for a while (after a whole bench
    run 192 of its 256 MiB were resident), and the first path of a round must not
    be the one that pays for the disk (its figure was a third of the others')."""
    with open(path, "rb", buffering=0) as handle:
        while handle.read(1 << 24):
            pass


def start_service(python, path):
    script = os.path.join(B.HERE, "bench_http_service.py")
    service = B.Proc([python, script, path, str(SMALL_BODY)], "http-service", want_stdout=True)
    line = service.read_line(20)
    if not line.startswith("PORT "):
        raise B.BenchError("the HTTP service said %r" % line)
    return service, int(line.split()[1])


def ours_config(workdir):
    secret = T._write(os.path.join(workdir, "http.key"), T.SECRET.decode())
    lines = ["[tunnels]", 'path = "/tunnel/"', 'secrets = ["%s"]' % secret,
             'http_path = "%s"' % HTTP_PATH]
    for agent_id in (OURS_ID, WST_ID):
        lines += ["[tunnels.agent.%s]" % agent_id, "http = true"]
    return T._write(os.path.join(workdir, "http-tunnels.toml"), "\n".join(lines) + "\n")


def start_wst_client(bindir, workdir, port, service_port, name):
    """wst-client for WST_ID at ws://127.0.0.1:port; (proc, the path of its viewer URL)."""
    out = os.path.join(workdir, "%s.url" % name)
    if os.path.exists(out):
        os.remove(out)
    proc = B.Proc([os.path.join(bindir, "wst-client"), "ws://%s:%d" % (B.HOST, port), WST_ID,
                   str(service_port), "--token", T._token(WST_ID), "--out-file", out], name)

    def url():
        if not proc.alive():
            raise _exited(proc, "wst-client")
        with open(out) as handle:
            return handle.read().strip()
    viewer_url = T._wait(url, 60, "wst-client's viewer URL (%s)" % name)
    prefix = "http://%s:%d" % (B.HOST, port)
    if not viewer_url.startswith(prefix):
        raise B.BenchError("wst-client's viewer URL %r is not under %s" % (viewer_url, prefix))
    return proc, viewer_url[len(prefix):].rstrip("/") + "/"


def start_paths(python, env, workdir, bindir, service, service_port, procs, errors):
    """{path key: (port, URL prefix, [the server's pid, the agent's])} for every path that
    could be started (direct: the service's pid as the server's)."""
    paths = {"direct": (service_port, "/", [service.pid])}
    ours = T.OursTunnel(workdir, python, env)
    try:
        srv, port = ours.start_server(ours_config(workdir), "http-ours-server")
        procs.append(srv)
    except B.BenchError as exc:
        errors.append("HTTP / ours server: %s" % exc)
        return paths
    try:
        token = T._write(os.path.join(workdir, "http-agent.token"), T._token(OURS_ID))
        agent = B.Proc([python, "-m", "websockify.agent", "--http", "--service",
                        "%s:%d" % (B.HOST, service_port), "--server",
                        "ws://%s:%d/tunnel/%s" % (B.HOST, port, OURS_ID), "--token-file", token],
                       "http-ours-agent", env=env)
        procs.append(agent)
        T._wait(lambda: ours.connected(port, 1) or not agent.alive(), 60, "our agent")
        if not agent.alive():
            raise _exited(agent, "websockify-agent")
        paths["ours"] = (port, "%s%s/" % (HTTP_PATH, OURS_ID), [srv.pid, agent.pid])
    except B.BenchError as exc:
        errors.append("HTTP / ours: %s" % exc)
    if bindir is None:
        return paths
    for key, start in (("ours-wst", lambda: (srv, port)),
                       ("websocktunnel", lambda: T.websocktunnel_server(bindir)[:2])):
        try:
            server, wport = start()
            if server not in procs:
                procs.append(server)
            client, prefix = start_wst_client(bindir, workdir, wport, service_port,
                                              "http-%s-wst-client" % key)
            procs.append(client)
            paths[key] = (wport, prefix, [server.pid, client.pid])
        except B.BenchError as exc:
            errors.append("HTTP / %s: %s" % (LABELS[key], exc))
    return paths


# -- the phase ----------------------------------------------------------------------------

def _median(values):
    return sorted(values)[len(values) // 2] if values else None


def http_phase(tunnel, python, env, workdir, bindir, why, opts, cfg, results, errors):
    """Downloads and small requests on every path, then the two-instance download."""
    global B, T
    T = tunnel
    B = tunnel.B
    size = cfg["http_size"]
    res = results["http"] = {"size": size, "why": why, "down": {}, "rounds": {}, "rps": {},
                             "cpu": {}, "closes": {},
                             "silent": {}, "cpu_mib": {}}
    procs = []
    try:
        path, crc, tail = big_file(workdir, size)
        service, service_port = start_service(python, path)
        procs.append(service)
        paths = start_paths(python, env, workdir, bindir, service, service_port, procs,
                            errors)
        for key in [k for k in PATHS if k in paths]:
            port, prefix, _ = paths[key]
            try:
                check(port, prefix + "check", crc, min(CHECK_SIZE, size))
            except (OSError, B.BenchError) as exc:
                B.note("ERROR HTTP / %s: %s" % (LABELS[key], exc))
                errors.append("HTTP / %s: %s" % (LABELS[key], exc))
                del paths[key]
        order = [k for k in PATHS if k in paths]
        B.note("HTTP paths: %s" % ", ".join("%s at :%d%s" % (LABELS[k], paths[k][0],
                                                            paths[k][1]) for k in order))
        downs = {k: [] for k in order}
        cpus = {k: [] for k in order}
        for number in range(opts.rounds):
            B.note("HTTP download round %d of %d" % (number + 1, opts.rounds))
            for key in order[number % len(order):] + order[:number % len(order)]:
                if downs[key] and (number > 0 and size / downs[key][0] / 1e6 > SLOW_DOWNLOAD):
                    continue
                port, prefix, pids = paths[key]
                warm(path)
                try:
                    before = [tree_cpu(pid) for pid in pids]
                    downs[key].append(download(port, prefix + "big", size, tail))
                    cpus[key].append([(tree_cpu(pid) - was) * 1000 / (size / (1 << 20))
                                      for pid, was in zip(pids, before)])
                    B.note("  %s: %.1f MB/s (CPU ms per MiB: %s)" % (
                        LABELS[key], downs[key][-1],
                        " / ".join("%.2f" % ms for ms in cpus[key][-1])))
                except (OSError, B.BenchError) as exc:
                    B.note("ERROR HTTP download / %s: %s" % (LABELS[key], exc))
                    errors.append("HTTP download / %s: %s" % (LABELS[key], exc))
        for key in order:
            res["down"][key] = _median(downs[key])
            res["rounds"][key] = len(downs[key])
            if cpus[key]:
                res["cpu_mib"][key] = [_median(list(ms)) for ms in zip(*cpus[key])]
        for key in order:
            port, prefix, _ = paths[key]
            try:
                (res["rps"][key], res["cpu"][key], res["closes"][key],
                 res["silent"][key]) = small_requests(port, prefix + "small")
                B.note("  %d viewers, %s: %.0f requests/s (client CPU %.0f %%; answers that "
                       "closed their connection: %.0f %% saying so, %.0f %% silently)" % (
                           VIEWERS, LABELS[key], res["rps"][key], 100 * res["cpu"][key],
                           100 * res["closes"][key], 100 * res["silent"][key]))
            except (OSError, B.BenchError) as exc:
                B.note("ERROR HTTP small requests / %s: %s" % (LABELS[key], exc))
                errors.append("HTTP small requests / %s: %s" % (LABELS[key], exc))
    except (OSError, B.BenchError) as exc:
        B.note("ERROR HTTP phase: %s" % exc)
        errors.append("HTTP phase: %s" % exc)
        return
    finally:
        for proc in reversed(procs):
            proc.stop()
    cluster_http(python, env, workdir, size, tail, opts, res, errors)


def cluster_http(python, env, workdir, size, tail, opts, res, errors):
    """The download at the instance that does not hold the agent, against the holder's."""
    pair = T.ClusterPair(workdir, python, env)
    url = "%s%s/big" % (HTTP_PATH, T.AGENT_ID)

    def start(name):
        service, service_port = start_service(python, os.path.join(workdir, "http-body.bin"))
        try:
            procs, _, _ = pair.start(service_port, name + "-http", http_path=HTTP_PATH)
        except BaseException:
            service.stop()
            raise
        return procs + [service], pair.ports[0], pair.ports[1]
    def measure(port):
        warm(os.path.join(workdir, "http-body.bin"))
        return download(port, url, size, tail)
    res["cluster"] = {}
    T.two_instance_rounds(pair, start, measure, opts.rounds, "two instances, HTTP",
                          res["cluster"], errors)


# -- the report ---------------------------------------------------------------------------

def report(res, opts):
    def num(value, fmt="%.1f"):
        return fmt % value if value is not None else "-"

    def ratio(a, b):
        return "%.2f" % (a / b) if a and b else "-"
    down, rps, cpu = res["down"], res["rps"], res["cpu"]
    size_mib = res["size"] >> 20
    head = "| HTTP through the tunnel | %s | ours / websocktunnel | ours / direct |" % (
        " | ".join(LABELS[k] for k in PATHS))
    lines = [head, "|---|" + "---:|" * (len(PATHS) + 2)]
    lines.append("| one %d MiB download MB/s | %s | %s | %s |" % (
        size_mib, " | ".join(num(down.get(k)) for k in PATHS),
        ratio(down.get("ours"), down.get("websocktunnel")),
        ratio(down.get("ours"), down.get("direct"))))
    cpu_mib = res["cpu_mib"]
    lines.append("| CPU ms per MiB downloaded: server / agent | %s | | |" % (" | ".join(
        " / ".join("%.2f" % ms for ms in cpu_mib[k]) if k in cpu_mib else "-"
        for k in PATHS)))
    lines.append("| %d keep-alive viewers, requests/s | %s | %s | %s |" % (
        VIEWERS, " | ".join(num(rps.get(k), "%.0f") for k in PATHS),
        ratio(rps.get("ours"), rps.get("websocktunnel")),
        ratio(rps.get("ours"), rps.get("direct"))))
    lines.append("| bench client CPU during them, %% of a core | %s | | |" % (
        " | ".join(num(100 * cpu[k] if k in cpu else None, "%.0f") for k in PATHS)))
    for key, name in (("closes", "with Connection: close"), ("silent", "silently")):
        lines.append("| answers after which the connection closed %s, %% | %s | | |" % (
            name, " | ".join(num(100 * res[key][k] if k in res[key] else None, "%.0f")
                             for k in PATHS)))
    cluster = res.get("cluster") or {}
    holder, other = cluster.get("holder"), cluster.get("other")
    lines += ["", "| two instances, one Redis, HTTP face | at the holding instance | "
              "at the other instance | other / holding |", "|---|---:|---:|---:|",
              "| one %d MiB download MB/s | %s | %s | %s |" % (
                  size_mib, num(holder), num(other), ratio(other, holder))]
    rounds = res["rounds"]
    lines += ["", "HTTP: one service (scripts/bench_http_service.py, sendfile) behind every "
              "path; downloads are one GET each (Content-Length, length and last bytes "
              "checked; every path first served a 16 MiB body whose CRC-32 matched; the "
              "file is read through before each download, so it comes from the page cache), "
              "median of the rounds made (%s); small requests: %d keep-alive viewers on one "
              "epoll loop in the bench, sequential GETs of a %d-byte body, counted for %.0f s "
              "after %.0f s of warm-up; ours: --workers 2 and websockify-agent --http; two "
              "instances: %d rounds, the agent on the first.%s%s" % (
                  ", ".join("%s %d" % (LABELS[k], rounds[k]) for k in PATHS if k in rounds),
                  VIEWERS, SMALL_BODY, SMALL_SECONDS, SMALL_WARMUP, opts.rounds,
                  " websocktunnel columns skipped: %s." % res["why"] if res.get("why") else "",
                  " Two instances skipped: %s." % cluster["why"] if cluster.get("why") else "")]
    targets = [("download >= 20x websocktunnel", "websocktunnel", 20.0),
               ("download >= 0.4x direct", "direct", 0.4)]
    lines += ["", "### HTTP targets", ""]
    for name, other, factor in targets:
        measured = down.get("ours") and down.get(other)
        lines.append("- %s: %s" % (name, "n/a (not measured)" if not measured else
                                   "PASS" if down["ours"] >= factor * down[other] else "FAIL"))
    return "\n".join(lines) + "\n"
