"""Ascend data parallelism, one process per device: who am I, read from the standard environment variables.

RANK_SIZE (processes in the job, default 1), RANK_ID (this process, 0..RANK_SIZE-1), RANK_TABLE_FILE (HCCL's
rank table, needed when RANK_SIZE > 1) and ASCEND_DEVICE_ID, else DEVICE_ID (the NPU this process drives).
`python -m effnet_exp.tools.launch_ascend` sets them. No TensorFlow import here.
"""
import json
import os
from collections import namedtuple

from effnet_exp.errors import UserError

AscendEnv = namedtuple("AscendEnv", ["rank_size", "rank_id", "rank_table_file", "device_id"])


def _int_var(environ, name, minimum):
    text = environ.get(name)
    if text is None or text.strip() == "":
        return None
    try:
        value = int(text.strip())
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise UserError("environment variable {}={!r} is not an integer >= {}".format(name, text, minimum))
    return value


def read_ascend_env(environ=None):
    """The AscendEnv of this process; UserError naming the variable at fault."""
    environ = os.environ if environ is None else environ
    rank_size = _int_var(environ, "RANK_SIZE", 1)
    rank_size = 1 if rank_size is None else rank_size
    rank_id = _int_var(environ, "RANK_ID", 0)
    device_var = "ASCEND_DEVICE_ID" if environ.get("ASCEND_DEVICE_ID", "").strip() else "DEVICE_ID"
    device_id = _int_var(environ, device_var, 0)
    table = environ.get("RANK_TABLE_FILE") or None
    if rank_size == 1:
        if rank_id not in (None, 0):
            raise UserError("environment variable RANK_ID={} but RANK_SIZE is 1 (unset or 1)".format(rank_id))
        return AscendEnv(1, 0, table, device_id)
    if rank_id is None:
        raise UserError("environment variable RANK_SIZE={} needs RANK_ID (0..{}) too".format(
            rank_size, rank_size - 1))
    if rank_id >= rank_size:
        raise UserError("environment variable RANK_ID={} is not below RANK_SIZE={}".format(rank_id, rank_size))
    if table is None:
        raise UserError("environment variable RANK_SIZE={} needs RANK_TABLE_FILE (HCCL's rank table JSON)".format(
            rank_size))
    if device_id is None:
        raise UserError("environment variable RANK_SIZE={} needs ASCEND_DEVICE_ID (or DEVICE_ID): the NPU of "
                        "rank {}".format(rank_size, rank_id))
    listed = rank_table_devices(table)
    if listed != rank_size:
        raise UserError("environment variable RANK_TABLE_FILE={} lists {} devices but RANK_SIZE={}".format(
            table, listed, rank_size))
    return AscendEnv(rank_size, rank_id, table, device_id)


def rank_table_devices(path):
    """How many devices a rank table lists: the "version 1.0" format (server_list) or the older group_list."""
    try:
        with open(path) as f:
            table = json.load(f)
    except (IOError, OSError) as err:
        raise UserError("environment variable RANK_TABLE_FILE={}: cannot read it ({})".format(
            path, err.strerror or err))
    except ValueError as err:
        raise UserError("environment variable RANK_TABLE_FILE={}: not JSON ({})".format(path, err))
    try:
        if "server_list" in table:
            return sum(len(server["device"]) for server in table["server_list"])
        return sum(len(instance["devices"]) for group in table["group_list"]
                   for instance in group["instance_list"])
    except (KeyError, TypeError) as err:
        raise UserError("environment variable RANK_TABLE_FILE={}: neither a server_list nor a group_list rank "
                        "table (missing {})".format(path, err))
