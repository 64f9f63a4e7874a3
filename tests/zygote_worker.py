"""Stand-in for one worker of an accelerate launch in the suite: the zygote forks the worker (tests/zygote.py).

torchrun runs ``zygote_worker SCRIPT ARGS`` (``accelerate launch --no_python``) where it would run
``python -u SCRIPT ARGS``. This process (stdlib only, started with ``-I -S``: milliseconds) passes its
environment, directory, argv and stdin/stdout/stderr to the zygote, which forks the worker with the libraries
already imported; it relays the signals torchrun sends (a failed peer: SIGTERM) and ends as the worker ended, by
the same exit status or the same signal.
"""

import json
import os
import signal
import socket
import sys


def main() -> None:
    # The relay is in place before the worker exists: a signal that comes before its pid is held, then passed on.
    worker, held = {}, []

    def relay(received, _frame):
        if "pid" in worker:
            os.kill(worker["pid"], received)
        else:
            held.append(received)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1):
        signal.signal(sig, relay)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(os.environ["REVIVAL_ZYGOTE_WORKERS"])
    request = {"script": sys.argv[1], "args": sys.argv[2:], "cwd": os.getcwd(), "env": dict(os.environ)}
    socket.send_fds(sock, [(json.dumps(request) + "\n").encode()], [0, 1, 2])
    replies = sock.makefile("rb")
    worker["pid"] = json.loads(replies.readline())["pid"]
    for sig in held:
        os.kill(worker["pid"], sig)
    line = replies.readline()
    code = json.loads(line)["returncode"] if line else 1
    if code < 0:  # killed by a signal: end the same way, as torchrun would have seen the worker end
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    main()
