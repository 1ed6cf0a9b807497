"""SIGTERM / SIGINT during training: finish the step, save a checkpoint, exit non-zero."""
import logging
import signal
import threading

from effnet_exp.errors import UserError

log = logging.getLogger(__name__)


class Interrupted(UserError):
    """Training stopped by a signal after saving; exit status 128 + the signal number."""

    def __init__(self, message, signum):
        super(Interrupted, self).__init__(message)
        self.exit_code = 128 + signum


class StopRequests(object):
    """Context manager that turns SIGTERM/SIGINT into a flag the loop checks after each step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = None
        self._previous = {}

    @property
    def requested(self):
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now, without saving
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received signal %d: saving a checkpoint after this step, then stopping", signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def error(self, step, checkpoint):
        name = signal.Signals(self.signum).name
        return Interrupted("stopped by {} at step {}; checkpoint {} saved (run again with the same run "
                           "folder to continue)".format(name, step, checkpoint), self.signum)
