"""Figures drawn off the critical path. matplotlib takes about a second a figure set (docs/performance.md,
"Evaluation outputs"), so the run hands each figure to one background thread and goes on: training keeps
training while an evaluation's figures are drawn. One thread draws everything, in order, so matplotlib is never
used by two threads at once. A figure that fails is logged (the numbers matter more than the pictures).

run() waits for the drawings before it returns (experiment.run: finish()), so a finished run or sweep job has all
its files; after an error or an interrupt it waits only for the figure being drawn, each written atomically."""
import logging
import threading
from collections import OrderedDict

log = logging.getLogger(__name__)


class Drawer(object):
    def __init__(self):
        self._changed = threading.Condition()
        self._pending = OrderedDict()  # key -> (function, args), oldest first
        self._running = False  # a worker thread exists; it ends when nothing is pending

    def submit(self, key, function, *args):
        """Calls function(*args) in the background. A pending job of the same key (the same file) is replaced:
        only the newest figure of a file is worth drawing."""
        with self._changed:
            self._pending.pop(key, None)
            self._pending[key] = (function, args)
            if not self._running:
                self._running = True
                threading.Thread(target=self._work, name="effnet-exp-drawing").start()

    def finish(self, discard=False):
        """Waits until everything submitted is drawn; discard: drop what has not started."""
        with self._changed:
            if discard:
                self._pending.clear()
            try:
                while self._running:
                    self._changed.wait()
            except BaseException:  # interrupted while waiting: what has not started is not worth the wait
                self._pending.clear()
                raise

    def _work(self):
        try:
            while self._draw_next():
                pass
        except BaseException:
            self._stopped()
            raise

    def _stopped(self):
        with self._changed:
            self._running = False
            self._changed.notify_all()

    def _draw_next(self):
        """Draws the oldest pending job; False when there is none (the worker then stops, in the same locked
        moment, so a job submitted just after starts a new worker)."""
        with self._changed:
            if not self._pending:
                self._running = False
                self._changed.notify_all()
                return False
            key, (function, args) = self._pending.popitem(last=False)
        try:
            function(*args)
        except Exception as err:
            log.warning("could not draw %s: %s: %s", key, type(err).__name__, err)
        return True


_DRAWER = Drawer()
submit = _DRAWER.submit
finish = _DRAWER.finish
