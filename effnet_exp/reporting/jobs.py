"""The per-job status file of a sweep job, and the share of the cores a job of a parallel launcher gets."""
import datetime
import logging
import os
import socket
import time

from omegaconf import OmegaConf

from effnet_exp.run_folder import atomic_write_json, read_json

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
RUNNING, COMPLETED, FAILED, INTERRUPTED = "running", "completed", "failed", "interrupted"


def first_line(err):
    """The error's first line, or its type's name when it has no message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _now():
    return datetime.datetime.now().isoformat(timespec="seconds")


class JobStatus(object):
    """<run folder>/status.json: running → completed (with the returned top-1), failed (with the error) or
    interrupted (by a signal).

    Written for every multirun job, and for a single run that continues a folder which already has one
    (`python run.py resume=<job folder>`), so a resumed job's row in the sweep report follows it.
    """

    def __init__(self, run_dir, job_num, overrides):
        self.path = os.path.join(run_dir, STATUS_FILE)
        self.started = time.time()
        self.record = {"status": RUNNING, "job_num": job_num, "overrides": list(overrides),
                       "started": _now(), "pid": os.getpid(), "host": socket.gethostname(),
                       "error": None, "error_type": None, "result": None}
        previous = read_json(self.path) or {}
        self.record["runs"] = int(previous.get("runs") or 0) + 1  # > 1 for a resumed job
        self._write()

    @classmethod
    def open(cls, run_dir, hydra_cfg, multirun):
        """A JobStatus for a sweep job (or a resumed one), else None (plain single runs keep no status file)."""
        if not multirun and not os.path.isfile(os.path.join(run_dir, STATUS_FILE)):
            return None
        job = hydra_cfg.job
        num = job.get("num") if multirun else (read_json(os.path.join(run_dir, STATUS_FILE)) or {}).get("job_num")
        return cls(run_dir, num, hydra_cfg.overrides.task)

    def _write(self):
        try:
            atomic_write_json(self.path, self.record)
        except (IOError, OSError) as err:
            log.warning("cannot write %s: %s", self.path, err)

    def _end(self, status):
        self.record.update(status=status, finished=_now(), wall_sec=round(time.time() - self.started, 3))
        self._write()

    def completed(self, result):
        self.record["result"] = result if result == result else None  # NaN is no JSON
        self._end(COMPLETED)

    def failed(self, err):
        self.record.update(error=first_line(err), error_type=type(err).__name__)
        self._end(FAILED)

    def interrupted(self, stop):
        """stop: the Interrupted, or a message."""
        self.record.update(error=first_line(stop), error_type="Interrupted")
        self._end(INTERRUPTED)


def share_cores(cfg, hydra_cfg):
    """With hydra/launcher=joblib, each job's TensorFlow thread pools get cores // n_jobs threads.

    Only when device.intra_op_threads is 0 (TensorFlow's choice, which would give every job all the cores);
    an explicit device.intra_op_threads / inter_op_threads wins. Returns the thread count set, or None.
    """
    target = OmegaConf.select(hydra_cfg, "launcher._target_") or ""
    if "joblib" not in str(target).lower() or cfg.device.intra_op_threads:
        return None
    cores = _cores()
    n_jobs = int(OmegaConf.select(hydra_cfg, "launcher.n_jobs") or -1)
    if n_jobs < 0:  # joblib: -1 is all cores, -2 all but one, ...
        n_jobs = max(1, cores + 1 + n_jobs)
    threads = max(1, cores // max(1, n_jobs))
    cfg.device.intra_op_threads = threads
    if not cfg.device.inter_op_threads:
        cfg.device.inter_op_threads = threads
    log.info("hydra/launcher=joblib with n_jobs=%d on %d cores: device.intra_op_threads=%d, "
             "device.inter_op_threads=%d for this job", n_jobs, cores, threads, cfg.device.inter_op_threads)
    return threads


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
