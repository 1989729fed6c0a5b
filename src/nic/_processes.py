"""How nic starts worker processes, and the one mistake that makes them hang.

Reader processes (``nic.compress``), folds run in parallel (``nic.learn``) and DDP ranks
(``nic.encoder_training``) are started with ``spawn``: CUDA cannot be used after a fork,
and a forked process would inherit the parent's torch threads and locks.  A spawned
process imports the calling script again before it runs anything.  A script that calls
nic at its top level, without the ``if __name__ == "__main__":`` guard, would then run the
whole job again inside every worker, and, when it reaches a slide the parent has locked,
wait for it while the parent waits for that worker.  :func:`spawn_context` and
:func:`check_main_guard` turn that into an error, raised at once in the worker (which the
user sees on stderr) and reported by the parent (:data:`WORKER_DIED_HINT`).
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

from nic.errors import NicError

__all__ = ["MAIN_GUARD_HINT", "WORKER_DIED_HINT", "check_main_guard", "spawn_context"]

#: What to do when a spawned worker failed while it started.
MAIN_GUARD_HINT = (
    'a script that calls nic must do so under `if __name__ == "__main__":`, since worker processes '
    "import the script again when they start"
)

#: Why a spawned worker ends without a result, for the parent's message.
WORKER_DIED_HINT = (
    f"it was killed (e.g. out of memory), or it failed while starting, e.g. because {MAIN_GUARD_HINT} "
    "(its error is printed above)"
)


def check_main_guard() -> None:
    """Raise :class:`NicError` when called while this process is a spawned worker that is
    still importing the parent's script, i.e. from a script's unguarded top level."""
    if getattr(mp.current_process(), "_inheriting", False):
        raise NicError(
            f"nic was called while a worker process was starting and importing the main script: {MAIN_GUARD_HINT}"
        )


def spawn_context() -> Any:
    """The ``spawn`` multiprocessing context, after :func:`check_main_guard`."""
    check_main_guard()
    return mp.get_context("spawn")
