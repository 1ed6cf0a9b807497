"""What a run and a sweep show a person: the console, learning curves, the per-job status file and the sweep
report. Only `console` loads TensorFlow (to quiet it); matplotlib is drawn with only by `plots`
and `eval_plots`.
"""
