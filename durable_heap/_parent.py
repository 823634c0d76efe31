"""Child processes that die with their parent, even a SIGKILLed one (``serve --workers``).

A ``durable-heap serve --workers N`` parent killed without a chance to stop its
children would otherwise leave the ZEO server holding the heap file's lock and
the workers serving the shared socket.
"""

from __future__ import annotations

import os
import sys
import threading
import time

__all__ = ["ZEO_CHILD", "die_with_parent"]


def die_with_parent(parent: int, sig: int | None = None) -> None:
    """Have this process get `sig` (SIGTERM) when the process `parent` ends, even by SIGKILL.

    On Linux the kernel does it
    (``prctl(PR_SET_PDEATHSIG)``; it fires when the thread that started us
    ends, and the parent starts its children from its main thread); elsewhere
    a daemon thread watches for the parent to go (``getppid`` changes when
    the process is re-parented). If the parent is gone already, the signal
    comes now. SIGTERM lets each child stop as it does on a service manager's
    SIGTERM: a worker drains its requests and closes the heap, the ZEO server
    closes the file.
    """
    import signal

    signum = signal.SIGTERM if sig is None else sig
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1  # <linux/prctl.h>
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(pr_set_pdeathsig, int(signum), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
        if armed:
            if os.getppid() != parent:  # it ended before the signal was armed
                os.kill(os.getpid(), signum)
            return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signum)

    threading.Thread(target=watch, name="durable-heap-parent-watch", daemon=True).start()


#: The program (``python -c``) of the ZEO server child of ``serve --workers``, with the
#: arguments ``PARENT_PID FOLDER zeo-options...``: it dies with the parent, runs
#: ``durable-heap zeo``, and removes its socket's private folder when it ends.
ZEO_CHILD = """
import os, sys
from durable_heap._parent import die_with_parent
parent, folder, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
die_with_parent(parent)
from durable_heap.cli import main
try:
    code = main(["zeo", *args])
finally:
    try:
        os.rmdir(folder)
    except OSError:
        pass
sys.exit(code)
"""
