"""The augmentation preview tool: its --op mode against PIL on real photographs, its grid, its errors."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageOps
from sklearn.datasets import load_sample_image

from conftest import REPO
from effnet_exp.tools import preview_augment

FILL = (128, 128, 128)


def preview(args, cwd):
    """The tool as a user runs it (one process: the op and error tests call its main() in this one)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "effnet_exp.tools.preview_augment"] + list(args), cwd=str(cwd),
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=300)


def preview_here(args, capsys):
    code = preview_augment.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two real photographs as lossless PNGs (so that the tool and PIL read the same pixels): an odd-sized crop
    of china.jpg and flower.jpg whole."""
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name, pixels in (("china", load_sample_image("china.jpg")[40:241, 100:403]),
                         ("flower", load_sample_image("flower.jpg"))):
        path = str(folder / (name + ".png"))
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def _read(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_op_mode_equals_pil_on_whole_images(photos, tmp_path, capsys):
    # Invert and Posterize (level 5: int(5 / 10 * 4) = 2 bits) are PIL's ImageOps functions exactly; Rotate at
    # level 5 is 15 degrees counter-clockwise about the centre, nearest neighbour, grey fill: PIL's rotate.
    expected = {
        "Invert": lambda im: ImageOps.invert(im),
        "Posterize": lambda im: ImageOps.posterize(im, 2),
        "Rotate": lambda im: im.rotate(15.0, resample=Image.NEAREST, fillcolor=FILL),
    }
    for op, oracle in expected.items():
        out = tmp_path / op
        code, _, err = preview_here(photos + ["--op", op, "--magnitude", "5", "--out", str(out)], capsys)
        assert code == 0, err
        for path in photos:
            ours = _read(str(out / (os.path.splitext(os.path.basename(path))[0] + ".png")))
            theirs = np.asarray(oracle(Image.open(path).convert("RGB")))
            assert ours.shape == theirs.shape
            differ = np.any(ours != theirs, axis=-1).mean()
            # Nearest-neighbour sampling may round a pixel centre that falls exactly between two pixels the
            # other way; nothing else may differ.
            assert differ == 0.0 if op != "Rotate" else differ < 0.005, (op, path, differ)


def test_grid_shows_the_training_views_and_repeats(photos, tmp_path, capsys):
    args = photos + ["--samples", "3", "dataset.augment=randaugment", "model.image_size=64"]
    first = preview(args + ["--out", str(tmp_path / "a.png")], tmp_path)
    assert first.returncode == 0, first.stderr
    again = preview_here(args + ["--out", str(tmp_path / "b.png")], capsys)
    plain = preview_here(photos + ["--samples", "3", "model.image_size=64", "--out", str(tmp_path / "c.png")],
                         capsys)
    assert again[0] == 0 and plain[0] == 0, again[2] + plain[2]
    grid = _read(str(tmp_path / "a.png"))
    assert grid.shape == (2 * 64 + 2, 3 * 64 + 2 * 2, 3)  # 2 rows, 3 columns, 2-pixel white gaps
    assert np.array_equal(grid, _read(str(tmp_path / "b.png")))  # the same seed: the same views
    cells = [grid[r * 66:r * 66 + 64, c * 66:c * 66 + 64] for r in range(2) for c in range(3)]
    assert len({cell.tobytes() for cell in cells}) == 6  # every view its own crop and policy draw
    assert not np.array_equal(grid, _read(str(tmp_path / "c.png")))  # the policy is applied
    assert "dataset.augment=randaugment" in first.stdout

    # MixUp on top: each view blended with its partner in the batch (view k with view 5 - k), with the printed lambda.
    code, out, err = preview_here(args + ["train.mixup_alpha=0.4", "--out", str(tmp_path / "m.png")], capsys)
    assert code == 0, err
    lam = float(re.search(r"MixUp with lambda ([0-9.]+)", out).group(1))
    mixed = _read(str(tmp_path / "m.png"))
    mixed_cells = [mixed[r * 66:r * 66 + 64, c * 66:c * 66 + 64] for r in range(2) for c in range(3)]
    for k in range(6):
        blend = lam * cells[k].astype(np.float64) + (1 - lam) * cells[5 - k].astype(np.float64)
        # lambda is printed to 3 decimals and each side was rounded to whole levels: within 1.5 levels.
        assert np.abs(mixed_cells[k] - blend).max() <= 1.5, k


@pytest.mark.parametrize("args, named", [
    (["--op", "Spin", "--out", "x"], "--op=Spin"),
    (["missing.png", "--out", "x.png"], "missing.png"),
    (["dataset.augment=sometimes", "--out", "x.png"], "dataset.augment"),
    (["dataset.randaugment.magnitude=40", "--out", "x.png"], "dataset.randaugment.magnitude=40"),
])
def test_bad_input_is_one_error_line(photos, tmp_path, capsys, monkeypatch, args, named):
    monkeypatch.chdir(tmp_path)
    code, _, err = preview_here(photos[:1] + args, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], err
    assert not os.listdir(str(tmp_path))
