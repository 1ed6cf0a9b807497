"""What `python run.py` shows on the console: our lines (progress, results, errors). TensorFlow's go to run.log.

Every logging decision of a run is made here, once, by quiet_console():
- TensorFlow's C++ log: TF_CPP_MIN_LOG_LEVEL=1 unless the user set it (0 shows everything, 1 hides INFO such as
  the cpu_feature_guard banner and keeps warnings and errors, 2 hides warnings too, 3 errors too; both stacks).
  TensorFlow 2.2x writes its oneDNN notice while it loads, before that level applies, so TensorFlow is loaded
  here with the process's stderr appended to run.log.
- The console handler of Hydra's job_logging shows only CONSOLE_LOGGERS. Everything else (TensorFlow's Python
  logger with the deprecation notices of the legacy ops used on purpose, absl, other libraries) and Python's
  warnings, routed into logging as "py.warnings", reach run.log only: Hydra's file handler keeps every record.
"""
import contextlib
import logging
import os
import sys

TF_CPP_MIN_LOG_LEVEL = "1"
# Ours, and Hydra's (a sweep's launches, the sweepers' results).
CONSOLE_LOGGERS = ("effnet_exp", "hydra", "hydra_plugins")


class OurLines(logging.Filter):
    """Passes the records of CONSOLE_LOGGERS and their children."""

    def filter(self, record):
        return record.name.split(".", 1)[0] in CONSOLE_LOGGERS


def quiet_console():
    """For run.py's job, after Hydra configured logging and before anything imports TensorFlow (this loads it)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", TF_CPP_MIN_LOG_LEVEL)
    logging.captureWarnings(True)
    root = logging.getLogger()
    for handler in root.handlers:
        if not isinstance(handler, logging.FileHandler) and isinstance(handler, logging.StreamHandler):
            handler.addFilter(OurLines())
    run_logs = [h.baseFilename for h in root.handlers if isinstance(h, logging.FileHandler)]
    with _stderr_appended_to(run_logs[0]) if run_logs else contextlib.nullcontext():
        import tensorflow  # noqa: F401  (loaded here for the redirection above)


@contextlib.contextmanager
def _stderr_appended_to(path):
    """The process's file descriptor 2, where TensorFlow's C++ code writes, appended to path meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "a") as target:
        os.dup2(target.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
