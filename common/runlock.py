"""One run per output directory: an exclusive advisory lock on OUTPUT_DIR/.run.lock.

The lock is ``flock(2)`` on an open file, so the kernel releases it when the
process ends in any way (a SIGKILL included): a dead run never leaves a stale
lock. The holder writes who it is (host, pid, start time) into the file, for
the message a second run prints. Where the file system has no such locks (some
network file systems), the run says so once and goes on unlocked.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from typing import Optional

LOCK_FILE = ".run.lock"
_held = []  # open lock files of this process, kept open (and so locked) until it exits


class RunLocked(RuntimeError):
    """Another live run holds the output directory."""


def acquire(output_dir: str, log=print) -> Optional[str]:
    """Take the lock; return None, or a description of the run that holds it. Unsupported: log once, go on."""
    import fcntl

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_FILE)
    f = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        try:
            info = json.loads(holder)
            who = f"host {info['host']}, pid {info['pid']}, started {info['started']}"
        except (ValueError, KeyError, TypeError):
            who = "holder unknown"
        return who
    except OSError as err:
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            log(f"warning: {output_dir} does not support file locks ({err.strerror}); running without the "
                "one-run-per-directory guard")
            f.close()
            return None
        raise
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}) + "\n")
    f.flush()
    _held.append(f)
    return None


def lock_run_dir(accelerator, output_dir: str, log=print) -> None:
    """The main process takes the lock; when it cannot, every process raises RunLocked together (no hang)."""
    holder = acquire(output_dir, log) if accelerator.is_main_process else None
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        holder = broadcast_object_list([holder], from_process=0)[0]
    if holder is not None:
        raise RunLocked(f"--output_dir {output_dir}: another run is using it ({holder}); wait for it to end or "
                        "choose another --output_dir")
