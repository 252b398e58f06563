"""``python -m websockify.demo``: what ``make run`` starts.

Runs the bundled TCP echo target on 127.0.0.1:5901 and websockify on port
6080 serving the demo page, so http://localhost:6080/ shows bytes crossing
the bridge with nothing else installed.
"""

import os
import signal
import subprocess
import sys

from websockify.addr import format_host_port

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    port = argv[0] if argv else "6080"
    target_port = argv[1] if len(argv) > 1 else "5901"
    target = format_host_port("127.0.0.1", target_port)
    echo = subprocess.Popen([sys.executable, "-m", "websockify.demo.echo", target])
    print("Open http://localhost:%s/ in a browser; Ctrl-C stops the demo." % port, flush=True)
    try:
        from websockify.cli import main as websockify_main
        return websockify_main(["--web", HERE, port, target])
    finally:
        echo.send_signal(signal.SIGTERM)
        echo.wait(5)


if __name__ == "__main__":
    sys.exit(main())
