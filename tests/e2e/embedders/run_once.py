"""An embedder shaped like Emscripten's test harness: a run-once WebSocketProxy
started with multiprocessing.Process(target=wsp.start_server).

argv: listen_port target_port [start method: fork (default), spawn, forkserver]
"""

import multiprocessing
import sys

import websockify

if __name__ == "__main__":
    wsp = websockify.WebSocketProxy(verbose=True, listen_host="127.0.0.1",
                                    listen_port=int(sys.argv[1]), target_host="127.0.0.1",
                                    target_port=int(sys.argv[2]), run_once=True)
    context = multiprocessing.get_context(sys.argv[3] if len(sys.argv) > 3 else "fork")
    proc = context.Process(target=wsp.start_server)
    proc.start()
    proc.join(60)
    print("websockify process exited with %r" % (proc.exitcode,), flush=True)
