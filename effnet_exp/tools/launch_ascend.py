"""Start one training process per Ascend device, the standard HCCL launch, and fail the job if any rank fails.

    python -m effnet_exp.tools.launch_ascend --devices 8 --rank-table rank_table.json -- experiment=... [overrides]

Each rank runs `run.py device=ascend hydra.run.dir=<run folder> <overrides>` with RANK_SIZE, RANK_ID,
RANK_TABLE_FILE, ASCEND_DEVICE_ID and DEVICE_ID set; rank 0 writes the run folder (checkpoints, eval.json,
TensorBoard), rank k>0 only its own log and metrics under <run folder>/rank_<k>/, and every rank resumes from the
run folder's checkpoints (docs/distributed.md). Each rank's stdout and stderr
go to <run folder>/logs/rank_<k>.log. When a rank exits with an error the others are stopped (SIGTERM, then
SIGKILL after --grace seconds) and the launcher exits with that rank's status. `--exec -- CMD ARGS` runs CMD
instead of run.py (with the same environment and logs).
"""
import argparse
import datetime
import os
import signal
import subprocess
import sys
import time

from effnet_exp.devices.ascend_env import rank_table_devices
from effnet_exp.errors import UserError

RUN_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "run.py")


class LaunchError(Exception):
    pass


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m effnet_exp.tools.launch_ascend",
        description="One process per Ascend device (RANK_SIZE/RANK_ID/ASCEND_DEVICE_ID set for each).")
    parser.add_argument("--devices", type=int, required=True, help="number of devices = processes (RANK_SIZE)")
    parser.add_argument("--first-device", type=int, default=0, help="device id of rank 0 (default 0)")
    parser.add_argument("--rank-table", help="HCCL rank table JSON (default: $RANK_TABLE_FILE); needed for >1 device")
    parser.add_argument("--run-dir", help="the run folder (default outputs/<date>/<time>)")
    parser.add_argument("--log-dir", help="one log file per rank here (default <run folder>/logs)")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("--exec", dest="exec_command", action="store_true",
                        help="the arguments after -- are a whole command, not run.py overrides")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then run.py overrides (or a command)")
    args = parser.parse_args(argv)
    if args.args and args.args[0] == "--":
        args.args = args.args[1:]
    if args.devices < 1:
        parser.error("--devices must be at least 1")
    if args.first_device < 0:
        parser.error("--first-device must be >= 0")
    if args.exec_command and not args.args:
        parser.error("--exec needs a command after --")
    return args


def rank_environments(devices, first_device, rank_table, environ=None):
    """The environment of each rank: RANK_SIZE, RANK_ID, RANK_TABLE_FILE, ASCEND_DEVICE_ID and DEVICE_ID."""
    environ = dict(os.environ if environ is None else environ)
    table = rank_table or environ.get("RANK_TABLE_FILE")
    if devices > 1:
        if not table:
            raise LaunchError("--devices {} needs --rank-table FILE (or RANK_TABLE_FILE): HCCL's rank table".format(
                devices))
        table = os.path.abspath(table)
        try:
            listed = rank_table_devices(table)
        except UserError as err:
            raise LaunchError(str(err).replace("environment variable RANK_TABLE_FILE=", "--rank-table "))
        if listed != devices:
            raise LaunchError("--rank-table {} lists {} devices but --devices {}".format(table, listed, devices))
    envs = []
    for rank in range(devices):
        env = dict(environ)
        env.update({"RANK_SIZE": str(devices), "RANK_ID": str(rank),
                    "ASCEND_DEVICE_ID": str(first_device + rank), "DEVICE_ID": str(first_device + rank)})
        env.setdefault("JOB_ID", "10087")
        if table:
            env["RANK_TABLE_FILE"] = table
        else:
            env.pop("RANK_TABLE_FILE", None)
        envs.append(env)
    return envs


def rank_commands(args, run_dir):
    if args.exec_command:
        return [list(args.args) for _ in range(args.devices)]
    command = [sys.executable, RUN_PY, "device=ascend", "hydra.run.dir={}".format(run_dir)] + list(args.args)
    return [list(command) for _ in range(args.devices)]


class Job(object):
    """The running ranks; stops them all when one fails."""

    def __init__(self, commands, envs, log_dir, grace):
        self.commands, self.envs, self.log_dir, self.grace = commands, envs, log_dir, grace
        self.procs, self.logs = [], []

    def log_path(self, rank):
        return os.path.join(self.log_dir, "rank_{}.log".format(rank))

    def start(self):
        for rank, (command, env) in enumerate(zip(self.commands, self.envs)):
            log_file = open(self.log_path(rank), "ab")
            self.logs.append(log_file)
            # Own session: stopping a rank stops whatever it started too.
            self.procs.append(subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def wait(self):
        """0 when every rank succeeded; else the failing rank's status (128 + signal when it was killed)."""
        while True:
            running = False
            for rank, proc in enumerate(self.procs):
                code = proc.poll()
                if code is None:
                    running = True
                elif code != 0:
                    status = 128 - code if code < 0 else code
                    sys.stderr.write("launch_ascend: rank {} exited with status {} (log: {}); stopping the other "
                                     "ranks\n".format(rank, status, self.log_path(rank)))
                    sys.stderr.write(tail(self.log_path(rank)))
                    self.stop()
                    return status
            if not running:
                return 0
            time.sleep(0.2)

    def stop(self, sig=signal.SIGTERM):
        for proc in self.procs:
            _signal(proc, sig)
        deadline = time.time() + self.grace
        for proc in self.procs:
            try:
                proc.wait(timeout=max(deadline - time.time(), 0.01))
            except subprocess.TimeoutExpired:
                _signal(proc, signal.SIGKILL)
                proc.wait()

    def close(self):
        for f in self.logs:
            f.close()


def _signal(proc, sig):
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def tail(path, lines=20):
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except (IOError, OSError):
        return ""
    last = text.splitlines()[-lines:]
    return "".join("  | {}\n".format(line) for line in last)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    now = datetime.datetime.now()
    run_dir = os.path.abspath(args.run_dir or os.path.join("outputs", now.strftime("%Y-%m-%d"),
                                                           now.strftime("%H-%M-%S.%f")))
    log_dir = os.path.abspath(args.log_dir or os.path.join(run_dir, "logs"))
    try:
        envs = rank_environments(args.devices, args.first_device, args.rank_table)
    except LaunchError as err:
        sys.stderr.write("error: {}\n".format(err))
        return 2
    if not args.exec_command and not os.path.isfile(RUN_PY):
        sys.stderr.write("error: {} not found; use --exec -- <command>\n".format(RUN_PY))
        return 2
    os.makedirs(log_dir, exist_ok=True)
    job = Job(rank_commands(args, run_dir), envs, log_dir, args.grace)

    def forward(signum, frame):
        sys.stderr.write("launch_ascend: signal {}, stopping all ranks\n".format(signum))
        job.stop(signum)
        job.close()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    job.start()
    print("launch_ascend: {} rank(s) started; run folder {}; logs {}/rank_<k>.log".format(
        args.devices, run_dir, log_dir))
    sys.stdout.flush()
    try:
        status = job.wait()
    finally:
        job.close()
    if status == 0:
        print("launch_ascend: all {} rank(s) finished".format(args.devices))
    return status


if __name__ == "__main__":
    sys.exit(main())
