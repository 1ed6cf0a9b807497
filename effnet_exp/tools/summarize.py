"""Rebuilds the report of an existing sweep folder: `python -m effnet_exp.tools.summarize DIR [--no-figure]`.

Writes DIR/summary.csv, DIR/summary.md and DIR/summary.png from the job folders' own files (the same code as
the callback run at the end of `python run.py -m ...`); prints summary.md. Exit status 1 when a job of the
sweep did not complete, 2 when DIR is no sweep folder.
"""
import argparse
import os
import sys

from effnet_exp.reporting.sweep_summary import SUMMARY_MD, find_jobs, write_report


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m effnet_exp.tools.summarize", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", help="a sweep folder, e.g. multirun_sweeps/2026-11-28/10-00-00.123456")
    parser.add_argument("--no-figure", action="store_true", help="skip summary.png (no matplotlib needed)")
    args = parser.parse_args(argv)

    if not os.path.isdir(args.sweep_dir):
        sys.stderr.write("error: {}: no such folder\n".format(args.sweep_dir))
        return 2
    if not find_jobs(os.path.abspath(args.sweep_dir)):
        sys.stderr.write("error: {} holds no job folders (none with .hydra/overrides.yaml or status.json)\n"
                         .format(args.sweep_dir))
        return 2
    report = write_report(args.sweep_dir, figure=not args.no_figure)
    with open(os.path.join(report.sweep_dir, SUMMARY_MD)) as f:
        sys.stdout.write(f.read())
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
