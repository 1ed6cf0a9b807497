"""What a run and a sweep show a person: learning curves, the per-job status file and the sweep report.

Nothing here imports TensorFlow; matplotlib is imported (lazily, Agg backend) only by `plots`.
"""
