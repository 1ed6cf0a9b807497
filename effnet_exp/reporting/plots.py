"""The training and sweep figures, and the figure / save helpers every figure uses (eval_plots too): matplotlib
(imported by effnet_exp.optional) on the Agg canvas, with no display and no pyplot state, written atomically."""
import io

from effnet_exp.optional import matplotlib
from effnet_exp.run_folder import atomic_write_bytes


def new_figure(width, height):
    mpl = matplotlib()
    figure = mpl.Figure(figsize=(width, height), dpi=100)
    mpl.FigureCanvasAgg(figure)
    return figure


def save_png(figure, path, bottom=0.0):
    buffer = io.BytesIO()
    figure.tight_layout(rect=(0, bottom, 1, 0.95))
    figure.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())


def _integer_steps(*axes_list):
    for axes in axes_list:
        axes.xaxis.set_major_locator(matplotlib().MaxNLocator(integer=True))


def _finite(points):
    return [(x, y) for x, y in points if y is not None and y == y]


def draw_run_curves(path, title, train_records, evals):
    """curves.png of one run: loss, and train top-1 with eval top-1, against the step."""
    figure = new_figure(10, 4)
    loss_axes = figure.add_subplot(1, 2, 1)
    top1_axes = figure.add_subplot(1, 2, 2, sharex=loss_axes)
    loss = _finite([(r["step"], r.get("loss")) for r in train_records])
    if loss:
        loss_axes.plot([s for s, _ in loss], [v for _, v in loss], marker=".", label="training loss")
    loss_axes.set_xlabel("step")
    loss_axes.set_ylabel("loss (mean over the logging interval)")
    loss_axes.set_title("training loss")
    top1 = _finite([(r["step"], r.get("top1")) for r in train_records])
    if top1:
        top1_axes.plot([s for s, _ in top1], [v for _, v in top1], marker=".", label="train top-1")
    evals = _finite(evals)
    if evals:
        top1_axes.plot([s for s, _ in evals], [v for _, v in evals], marker="o", linestyle="--",
                       label="eval top-1")
    top1_axes.set_ylim(-0.02, 1.02)
    top1_axes.set_xlabel("step")
    top1_axes.set_ylabel("top-1 accuracy")
    top1_axes.set_title("accuracy")
    if top1 or evals:
        top1_axes.legend(loc="best")
    _integer_steps(loss_axes, top1_axes)
    figure.suptitle(title, fontsize=9)
    save_png(figure, path)


def draw_sweep(path, title, jobs):
    """summary.png of a sweep: every job's eval top-1 and training loss against the step, one line each.

    jobs: [(label, train_records, eval points [(step, top1)])].
    """
    Line2D = matplotlib().Line2D
    rows = (len(jobs) + 1) // 2 if len(jobs) > 6 else len(jobs)
    figure = new_figure(12, 4.5 + 0.2 * rows)
    eval_axes = figure.add_subplot(1, 2, 1)
    loss_axes = figure.add_subplot(1, 2, 2, sharex=eval_axes)
    styles = []
    for index, (label, train_records, evals) in enumerate(jobs):
        style = {"color": "C%d" % (index % 10), "linestyle": ("-", "--", ":", "-.")[index // 10 % 4]}
        styles.append(style)
        evals = _finite(evals)
        if evals:
            eval_axes.plot([s for s, _ in evals], [v for _, v in evals], marker="o", label=label, **style)
        loss = _finite([(r["step"], r.get("loss")) for r in train_records])
        if loss:
            loss_axes.plot([s for s, _ in loss], [v for _, v in loss], marker=".", label=label, **style)
    eval_axes.set_ylim(-0.02, 1.02)
    eval_axes.set_xlabel("step")
    eval_axes.set_ylabel("eval top-1")
    eval_axes.set_title("eval top-1 per job")
    loss_axes.set_xlabel("step")
    loss_axes.set_ylabel("training loss")
    loss_axes.set_title("training loss per job")
    _integer_steps(eval_axes, loss_axes)
    if jobs:  # one legend for both panels, below them: a job keeps its colour in both
        handles = [Line2D([], [], marker="o", **style) for style in styles]
        figure.legend(handles, [label for label, _, _ in jobs], loc="lower center", fontsize=8,
                      ncol=2 if len(jobs) > 6 else 1, frameon=False)
    figure.suptitle(title, fontsize=9)
    save_png(figure, path, bottom=min(0.6, (0.25 + 0.2 * rows) / (4.5 + 0.2 * rows)) if jobs else 0.0)
