"""The export report of an exported run folder: `python -m effnet_exp.tools.export_report RUN [key=value ...]`.

RUN is the run folder of a `mode=export` run; its saved config (dataset, device, export.*) is used, with the
key=value overrides on top (e.g. export.report_images=500 export.report_runs=100 device.intra_op_threads=1).
Writes RUN/export/report.md and report.json (the same as `mode=export export.report=true`) and prints the table.
Exit status 2 with one `error:` line when RUN or a setting is at fault.
"""
import argparse
import logging
import os
import sys

from omegaconf import OmegaConf

from effnet_exp import run_folder
from effnet_exp.errors import UserError
from effnet_exp.experiment import prepare
from effnet_exp.inference.export_report import report_markdown, report_of_spec
from effnet_exp.modes import Mode
from effnet_exp.resume import typed_config


def saved_config(run_dir, overrides):
    """The run's saved config with mode=export, export.report=true and the overrides."""
    path = os.path.join(run_dir, run_folder.SAVED_CONFIG)
    if not os.path.isfile(path):
        raise UserError("{} is not a run folder of effnet-exp (no {})".format(run_dir, run_folder.SAVED_CONFIG))
    try:
        cfg = OmegaConf.merge(typed_config(OmegaConf.load(path), path), OmegaConf.from_dotlist(list(overrides)))
    except Exception as err:  # OmegaConf's validation errors name the key and value
        raise UserError("{}: {}".format(path, str(err).splitlines()[0]))
    cfg.mode = Mode.export
    cfg.export.report = True
    return cfg


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m effnet_exp.tools.export_report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="the run folder of a mode=export run (it holds export/export.json)")
    parser.add_argument("overrides", nargs="*", help="key=value settings over the run's saved config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    run_dir = os.path.abspath(args.run_dir)
    try:
        spec = prepare(saved_config(run_dir, args.overrides), run_dir)
        report = report_of_spec(spec)
    except UserError as err:
        sys.stderr.write("error: {}\n".format(err))
        return 2
    sys.stdout.write(report_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
