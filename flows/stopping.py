"""Stopping quickly and cleanly on SIGINT and SIGTERM.

``stop_on_signals`` turns the first SIGINT or SIGTERM into :class:`Stopped` (a
``KeyboardInterrupt``) in the main thread, wherever the worker is. Everything on
that path is already safe to abandon: a failed batch commits no offsets, a
publish interrupted part-way purges what it wrote (or ``Memory.recover`` does at
the next start), and a batch published but not committed is resumed, not
rebuilt, at the next start (``flows.resume``). A watchdog ends the process after
``Settings.stop_grace_s`` if the clean-up hangs; a second signal ends it at once.

``start_prefect_api`` keeps Prefect's temporary API server alive through a
signal sent to the whole process group (Ctrl-C in a terminal, ``kill -- -PGID``).
Prefect starts that server as a child in our group, so the signal used to stop it
first, and the flow then retried the dead API for ~140 s before it could exit.
Started here, it runs in a session of its own and gets SIGTERM when this process
dies (Linux); Prefect's own exit handler stops it after our last API call.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import NoReturn

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SERVER_STOP_S = 1.0  # the temporary API server's time to stop before it is killed


class Stopped(KeyboardInterrupt):
    """The process was asked to stop by ``signum``; exit status ``128 + signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_received: list[int] = []  # the stop signal, once one came (inside ``stop_on_signals``)


def stop_signal(error: BaseException | None = None) -> int | None:
    """The signal of a stop request, if one came or ``error`` stands for one.

    ``error`` stands for a stop when it is, or was raised from or during, ``Stopped``
    or Prefect's ``TerminationSignal`` (a flow run turns SIGTERM into it, and sends the
    signal again to the handler it replaced once the run has ended). Beam re-raises
    what a DoFn raised as a ``RuntimeError``: that must stop the worker, not be retried.
    """
    from prefect.exceptions import TerminationSignal

    for e in error_chain(error):
        if isinstance(e, Stopped):
            return e.signum
        if isinstance(e, TerminationSignal):
            return e.signal
    return _received[0] if _received else None


def error_chain(error: BaseException | None) -> Iterator[BaseException]:
    """``error`` and the errors it was raised from or during."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


@contextmanager
def stop_on_signals(grace_s: float) -> Iterator[None]:
    """Raise ``Stopped`` on the first SIGINT/SIGTERM; exit by force ``grace_s`` later."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if _received:  # asked twice: stop now
            os._exit(128 + signum)
        _received.append(signum)
        watchdog = threading.Timer(grace_s, os._exit, (128 + signum,))
        watchdog.daemon = True
        watchdog.start()
        raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    _handler.append(handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _received.clear()
        _handler.clear()


_handler: list = []  # the handler of the active ``stop_on_signals``


def rearm() -> None:
    """Put the active ``stop_on_signals`` handler back on SIGTERM inside a flow run.

    A Prefect flow run replaces it with its own bridge, whose ``TerminationSignal``
    a library on the way may swallow; then nothing records the stop (a probe ran
    on through 5 batches after a SIGTERM in a test run). Prefect restores ours when the run ends.
    """
    if _handler and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _handler[0])


def exit_now(code: int) -> NoReturn:
    """Flush the logs, run the exit handlers (Prefect stops its temporary server), then
    exit without the interpreter's teardown: with torch, spaCy and Beam loaded, that
    teardown took 5-7 s, during which the watchdog thread cannot run.

    The logs go first: Prefect ships them to its API, and its exit handlers would
    flush them only after stopping the server (then wait 5 s for a dead server)."""
    logging.shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def start_prefect_api() -> None:
    """Start Prefect's temporary API server in its own session, unless an API is
    configured (``PREFECT_API_URL``), ephemeral mode is off, or one runs already."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    if None not in SubprocessASGIServer._instances:
        # Prefect's own calls (SubprocessASGIServer()) get this instance: the port-keyed
        # singleton of its ephemeral mode.
        _own_session_server()().start()


@functools.cache
def _own_session_server() -> type:
    """Prefect's ``SubprocessASGIServer``, started in a session of its own."""
    import prefect
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class OwnSessionServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            # As SubprocessASGIServer._run_uvicorn_command (prefect 3.9), plus
            # preexec_fn: its own session, and SIGTERM when we die.
            return subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "--app-dir",
                    str(prefect.__module_path__.parent),
                    "--factory",
                    "prefect.server.api.server:create_app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--log-level",
                    "error",
                    "--lifespan",
                    "on",
                ],
                env={
                    **os.environ,
                    "PREFECT_UI_ENABLED": "0",
                    "PREFECT__SERVER_EPHEMERAL": "1",
                    "PREFECT__SERVER_FINAL": "1",
                    **get_current_settings().to_environment_variables(exclude_unset=True),
                },
                preexec_fn=_detach,
            )

        def stop(self) -> None:
            # Prefect waits 5 s for the server to stop before it kills it, and at our
            # exit it takes that long (the events websocket of this process is open).
            if self.server_process is not None and self.server_process.poll() is None:
                self.server_process.terminate()
                try:
                    self.server_process.wait(timeout=SERVER_STOP_S)
                except subprocess.TimeoutExpired:
                    self.server_process.kill()
            super().stop()

    return OwnSessionServer


_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _detach() -> None:
    """In the forked child, before exec: a new session; SIGTERM when the parent dies."""
    os.setsid()
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
