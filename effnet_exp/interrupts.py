"""SIGTERM and SIGINT in any phase of any mode: the first signal stops the run cleanly, a second one at once.

The first signal raises Interrupted in the main thread as soon as Python has control again (after the current
sess.run). Interrupted is a BaseException, so no `except Exception` swallows it and Hydra passes it on to
run.py. Inside deferred() (the training step loop, a folder swap) the signal is only noted; the code there
checks requested() at a safe point, and leaving deferred() raises it. A second signal ends the process from a
watcher thread, even while the main thread waits inside TensorFlow: one `error:` line, exit 128 + signal.
"""
import contextlib
import logging
import os
import signal
import sys
import threading

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# For the fault tests: EFFNET_EXP_SIGNAL_AT=<point>[@<n>][:<SIGNAL>[:<count>]] makes the process send itself the
# signal (SIGTERM by default, count times) when it reaches fault_point(<point>) for the n-th time (default 1).
SIGNAL_AT = "EFFNET_EXP_SIGNAL_AT"


class Interrupted(BaseException):
    """The run was stopped by a signal; exit status 128 + the signal number."""

    def __init__(self, signum, message):
        super(Interrupted, self).__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum

    def __reduce__(self):  # a launcher's worker process may send it back to the sweep's process
        return Interrupted, (self.signum, str(self))


class _State(object):
    def __init__(self):
        self.signum = None
        self.deferring = 0
        self.installed = False
        self.phase = None  # what the run is doing, for the message
        self.reached = {}  # fault point: times reached
        self.last_words = []  # callables run before a second signal ends the process


_STATE = _State()


def signal_name(signum):
    return signal.Signals(signum).name


def install():
    """Takes over SIGTERM / SIGINT for this process (once; only the main thread can)."""
    if _STATE.installed or threading.current_thread() is not threading.main_thread():
        return
    for sig in SIGNALS:
        signal.signal(sig, _handle)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    # The C-level handler writes each signal's number to write_fd at once, whatever the main thread does.
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(read_fd,), name="effnet-exp-signals", daemon=True).start()
    _STATE.installed = True


def _watch(read_fd):
    seen = 0
    while True:
        for signum in os.read(read_fd, 64):
            if signum in SIGNALS:
                seen += 1
                if seen >= 2:
                    _exit_now(signum)


def _handle(signum, frame):
    if _STATE.signum is not None:
        _exit_now(signum)
    _STATE.signum = signum
    if _STATE.deferring:
        log.warning("received %s: stopping at the next safe point", signal_name(signum))
        return
    raise _stopped(signum)


def _stopped(signum):
    doing = " while " + _STATE.phase if _STATE.phase else ""
    return Interrupted(signum, "stopped by {}{}".format(signal_name(signum), doing))


_EXITING = threading.Lock()


def _exit_now(signum):
    _EXITING.acquire()  # the watcher and the main thread's handler may both get here: one line, one exit
    for last_word in list(_STATE.last_words):
        try:
            last_word()
        except Exception:  # the process ends either way
            pass
    message = "error: stopped at once by a second {}; the last complete checkpoint and results are kept\n"
    os.write(sys.stderr.fileno(), message.format(signal_name(signum)).encode())
    os._exit(128 + signum)


def requested():
    """The signal number received so far, or None."""
    return _STATE.signum


def check():
    """Raises Interrupted if a signal came in a deferred section (for loops inside one, e.g. an evaluation
    during training)."""
    if _STATE.signum is not None:
        raise _stopped(_STATE.signum)


@contextlib.contextmanager
def deferred():
    """A section a first signal does not break into; it is raised when the section ends."""
    _STATE.deferring += 1
    try:
        yield
    finally:
        _STATE.deferring -= 1
    if not _STATE.deferring:
        check()


@contextlib.contextmanager
def last_word(callback):
    """callback runs if a second signal ends the process while this section runs."""
    _STATE.last_words.append(callback)
    try:
        yield
    finally:
        _STATE.last_words.remove(callback)


@contextlib.contextmanager
def phase(name):
    """Names what the run does in this section ("training", "evaluating", ...) in an interruption's message."""
    previous, _STATE.phase = _STATE.phase, name
    try:
        yield
    finally:
        _STATE.phase = previous


def fault_point(name):
    """A named moment of a run (see SIGNAL_AT); does nothing unless the fault tests ask for it."""
    wanted = os.environ.get(SIGNAL_AT, "").split(":")
    point, _, nth = wanted[0].partition("@")
    if point != name:
        return
    _STATE.reached[name] = _STATE.reached.get(name, 0) + 1
    if _STATE.reached[name] != int(nth or 1):
        return
    signum = signal.Signals[wanted[1]] if len(wanted) > 1 else signal.SIGTERM
    for _ in range(int(wanted[2]) if len(wanted) > 2 else 1):
        os.kill(os.getpid(), signum)
