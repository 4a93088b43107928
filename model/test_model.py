#!/usr/bin/env python3
"""Checks of the exported musicnn-msd TorchScript model.

    python3 model/test_model.py                     # all checks; exits non-zero on failure
    python3 model/test_model.py --update-reference  # rewrite reference.json and
                                                    # reference-int8.json from the .pt files
    python3 -m pytest model/test_model.py           # same checks under pytest

(a) the committed musicnn-msd.pt matches its manifest and reproduces reference.json; the
    other models (musicnn-msd-int8, musicnn-msd-mtt, musicnn-msd-mtt-int8) reproduce their
    reference-*.json, the int8 ones stay within cosine 0.995 of their fp32 twins, and the
    fused model's MSD half is musicnn-msd's output;
(b) re-running convert_musicnn.py into a temp dir gives the same outputs (and, with the
    manifest's torch version, the same bytes);
(c) only when `tensorflow` is importable: the network agrees with musicnn's own TF graph
    (built from the wheel's models.py, weights restored with TF's Saver), and the log-mel
    front-end with librosa's when librosa is importable.

Needs torch and numpy; (b) needs the musicnn wheel (cached, or fetched with pip).
"""

import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import unittest
import warnings

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
PT = os.path.join(HERE, "musicnn-msd.pt")
MANIFEST = os.path.join(HERE, "musicnn-msd.json")
REFERENCE = os.path.join(HERE, "reference.json")
INT8_PT = os.path.join(HERE, "musicnn-msd-int8.pt")
INT8_MANIFEST = os.path.join(HERE, "musicnn-msd-int8.json")
INT8_REFERENCE = os.path.join(HERE, "reference-int8.json")
FUSED_PT = os.path.join(HERE, "musicnn-msd-mtt.pt")
FUSED_INT8_PT = os.path.join(HERE, "musicnn-msd-mtt-int8.pt")


def manifest_of(pt):
    return pt[:-3] + ".json"


def reference_of(pt):
    """reference.json for musicnn-msd, reference-<rest of the name>.json for the others."""
    stem = os.path.basename(pt)[:-3]
    return os.path.join(HERE, "reference.json" if stem == "musicnn-msd" else
                        "reference-" + stem[len("musicnn-msd-"):] + ".json")


# The models besides musicnn-msd: (file, its fp32 twin or None, embedding_dim, cpu_only).
VARIANTS = [(INT8_PT, PT, 200, True), (FUSED_PT, None, 400, False), (FUSED_INT8_PT, FUSED_PT, 400, True)]
# The int8 model against the fp32 one, per embedding. On real music (60 Debian game-music
# tracks, 8 windows each, model/README.md) the worst was 0.9992; the pure-tone reference
# clips are the hardest case seen (0.9972), so 0.995 leaves room without hiding a broken
# quantization (an unquantized-scale bug or a wrong zero point gives < 0.9).
INT8_MIN_COSINE = 0.995
SR = 16000
WINDOW = 47616

# The reference clips: plain closed forms, evaluated in float64 then rounded to float32.
CLIPS = {
    "A": "0.4*sin(2*pi*440*n/16000) + 0.2*sin(2*pi*1234.5*n/16000)*(0.5 + 0.5*sin(2*pi*0.5*n/16000))",
    "B": "0.3*sin(2*pi*110*n/16000) + 0.2*sin(2*pi*660*n/16000)*sin(2*pi*4*n/16000)^2"
         " + 0.1*sin(2*pi*3000*n/16000 + 0.5*sin(2*pi*5*n/16000))",
}


def clip(name, length=2 * WINDOW):
    n = np.arange(length, dtype=np.float64)
    w = 2.0 * math.pi / SR
    if name == "A":
        x = 0.4 * np.sin(w * 440.0 * n) + 0.2 * np.sin(w * 1234.5 * n) * (0.5 + 0.5 * np.sin(w * 0.5 * n))
    elif name == "B":
        x = (0.3 * np.sin(w * 110.0 * n) + 0.2 * np.sin(w * 660.0 * n) * np.sin(w * 4.0 * n) ** 2
             + 0.1 * np.sin(w * 3000.0 * n + 0.5 * np.sin(w * 5.0 * n)))
    else:
        raise KeyError(name)
    return x.astype(np.float32)


def cases():
    """name -> (description, input [B, N] float32)."""
    a, b = clip("A"), clip("B")
    return {
        "single": ("[1, 95232]: clip A (two windows)", a[None, :]),
        "batch": ("[2, 95232]: clips A and B", np.stack([a, b])),
        "windows": ("[4, 47616]: A[0:47616], A[47616:95232], B[0:47616], B[47616:95232]",
                    np.stack([a[:WINDOW], a[WINDOW:], b[:WINDOW], b[WINDOW:]])),
    }


def run_model(model, x):
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def rel_err(got, ref):
    """max |got - ref| over each row, divided by that row's L2 norm of ref; the worst row."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.max(np.abs(got - ref), axis=-1) / np.linalg.norm(ref, axis=-1)))


def load_model(path=PT):
    with warnings.catch_warnings():  # TorchScript is deprecated upstream, but it is what tch loads
        warnings.simplefilter("ignore", DeprecationWarning)
        model = torch.jit.load(path, map_location="cpu")
    model.eval()
    return model


def write_reference(pt=PT, manifest_path=MANIFEST, reference=REFERENCE, tolerance=None):
    model = load_model(pt)
    with open(manifest_path) as f:
        manifest = json.load(f)
    out = {
        "model": manifest["name"],
        "model_sha256": manifest["sha256"],
        "sample_rate": SR,
        "clips": {k: {"formula": v, "n": "0, 1, ..., 95231 (two windows of 47616)",
                      "note": "evaluate in f64, round to f32"} for k, v in CLIPS.items()},
        "tolerance": tolerance or {
            "metric": "max over rows of max_i |got_i - ref_i| / ||ref||_2",
            "cpu": 1e-4,
            "gpu": 1e-2,
            "note": "gpu is looser: cuDNN may use TF32 for convolutions",
        },
        "cases": {},
    }
    rows = {}
    for name, (desc, x) in cases().items():
        y = run_model(model, x)
        out["cases"][name] = {"input": desc, "shape": list(y.shape),
                              "embeddings": [f"@{name}{i}@" for i in range(len(y))]}
        for i, row in enumerate(y):  # float32 printed with 9 significant digits: exact round trip
            rows[f'"@{name}{i}@"'] = "[" + ", ".join(f"{v:.9g}" for v in row) + "]"
    text = json.dumps(out, indent=1)
    for key, row in rows.items():
        text = text.replace(key, row)
    with open(reference, "w") as f:
        f.write(text + "\n")
    print(f"wrote {reference}")


INT8_TOLERANCE = {
    "metric": "max over rows of max_i |got_i - ref_i| / ||ref||_2",
    "cpu": 1e-3,
    "note": "CPU only (quantized kernels: fbgemm on x86). Looser than fp32's 1e-4: int8 steps are "
            "coarse, and a value on the edge of one may round the other way with another "
            "kernel (AVX2 against AVX-512 VNNI)",
}


# ---------------------------------------------------------------- (a)

def checked_manifest(pt, manifest_path):
    """The manifest, after checking that it names the .pt file's sha256."""
    with open(manifest_path) as f:
        manifest = json.load(f)
    with open(pt, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert digest == manifest["sha256"], f"{pt}: sha256 {digest} != manifest {manifest['sha256']}"
    return manifest


def test_manifest_and_reference():
    manifest = checked_manifest(PT, MANIFEST)
    for key, value in [("sample_rate", 16000), ("window_samples", WINDOW), ("embedding_dim", 200)]:
        assert manifest[key] == value, (key, manifest[key])
    with open(REFERENCE) as f:
        ref = json.load(f)
    # reference.json records the model it was made from (model_sha256) for information only:
    # a re-export with other bytes must still reproduce the numbers, so they are not remade.
    tol = ref["tolerance"]["cpu"]
    model = load_model()
    results = {}
    for name, (_, x) in cases().items():
        y = run_model(model, x)
        want = np.array(ref["cases"][name]["embeddings"], dtype=np.float32)
        assert y.shape == want.shape, (name, y.shape, want.shape)
        assert np.all(np.isfinite(y)), name
        err = rel_err(y, want)
        assert err <= tol, f"case {name}: relative error {err:.3g} > {tol}"
        results[name] = y
    # consistency: batching is row-independent, and a 2-window clip is the mean of its windows
    assert rel_err(results["batch"][:1], results["single"]) <= 1e-5
    w = results["windows"]
    assert rel_err(w[0:2].mean(axis=0, keepdims=True), results["single"]) <= 1e-5
    assert rel_err(w[2:4].mean(axis=0, keepdims=True), results["batch"][1:2]) <= 1e-5
    # the remainder after the last whole window is ignored; shorter than a window is an error
    x = cases()["single"][1]
    longer = np.concatenate([x, np.full((1, 1000), 0.5, np.float32)], axis=1)
    assert rel_err(run_model(model, longer), results["single"]) <= 1e-6
    try:
        run_model(model, x[:, :WINDOW - 1])
    except Exception:
        pass
    else:
        raise AssertionError("input shorter than one window was accepted")


def test_variant_models():
    """musicnn-msd-int8, musicnn-msd-mtt and musicnn-msd-mtt-int8: manifests, their references,
    int8 within cosine INT8_MIN_COSINE of its fp32 twin, rows independent of their batch, and
    the fused model exactly the scaled MSD and MTT embeddings side by side."""
    base = checked_manifest(PT, MANIFEST)
    for pt, twin, dim, cpu_only in VARIANTS:
        manifest = checked_manifest(pt, manifest_of(pt))
        assert manifest["embedding_dim"] == dim, (pt, manifest["embedding_dim"])
        assert manifest.get("cpu_only", False) == cpu_only, pt
        for key in ("sample_rate", "window_samples"):
            assert manifest[key] == base[key], (pt, key)
        assert manifest["name"] == os.path.basename(pt)[:-3], "each model has an identity of its own"
        with open(reference_of(pt)) as f:
            ref = json.load(f)
        tol = ref["tolerance"]["cpu"]
        model = load_model(pt)
        results = {}
        for name, (_, x) in cases().items():
            y = run_model(model, x)
            want = np.array(ref["cases"][name]["embeddings"], dtype=np.float32)
            assert y.shape == want.shape and np.all(np.isfinite(y)), (pt, name)
            err = rel_err(y, want)
            assert err <= tol, f"{pt} case {name}: relative error {err:.3g} > {tol}"
            if twin is not None:
                z = run_model(load_model(twin), x)
                cos = np.sum(y * z, axis=1) / (np.linalg.norm(y, axis=1) * np.linalg.norm(z, axis=1))
                assert np.all(cos >= INT8_MIN_COSINE), f"{pt} case {name}: cosine to fp32 {cos.min():.5f}"
                print(f"  {os.path.basename(pt)} {name}: cosine to {os.path.basename(twin)} >= {cos.min():.5f}")
            results[name] = y
        assert rel_err(results["batch"][:1], results["single"]) <= 1e-5, pt
        w = results["windows"]
        assert rel_err(w[0:2].mean(axis=0, keepdims=True), results["single"]) <= 1e-5, pt
    # the fused model: [MSD · s0, MTT · s1] with the MSD half exactly musicnn-msd's
    fused = load_model(FUSED_PT)
    x = cases()["batch"][1]
    y, msd = run_model(fused, x), run_model(load_model(PT), x)
    s0 = float(fused.scale[0])
    assert rel_err(y[:, :200] / s0, msd) <= 1e-6, "the fused model's MSD half is not musicnn-msd"


# ---------------------------------------------------------------- (b)

def test_reconvert_matches():
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(HERE, "convert_musicnn.py"), "--out", tmp], check=True)
        print(f"  conversion took {time.perf_counter() - t0:.1f} s")
        same_bytes = True
        for pt in [PT] + [v[0] for v in VARIANTS]:
            fresh_pt = os.path.join(tmp, os.path.basename(pt))
            fresh, committed = load_model(fresh_pt), load_model(pt)
            for name, (_, x) in cases().items():
                err = rel_err(run_model(fresh, x), run_model(committed, x))
                assert err <= 1e-6, f"{pt} case {name}: fresh export differs from committed ({err:.3g})"
            with open(manifest_of(fresh_pt)) as f, open(manifest_of(pt)) as g:
                fresh_manifest, manifest = json.load(f), json.load(g)
            same_bytes &= fresh_manifest["sha256"] == manifest["sha256"]
        print(f"  fresh export bytes {'identical to' if same_bytes else 'differ from'} the committed files")
        if torch.__version__.split("+")[0] == manifest["torch"]:
            assert same_bytes, "same torch version but the export is not byte-identical"
        with open(os.path.join(tmp, "LICENSE-musicnn"), "rb") as f, \
                open(os.path.join(HERE, "LICENSE-musicnn"), "rb") as g:
            assert f.read() == g.read(), "LICENSE-musicnn differs from the wheel's"


# ---------------------------------------------------------------- (c)

def test_tensorflow_crosscheck():
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # musicnn's tf.compat.v1.layers need tf_keras
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError:
        print("  NOTICE: tensorflow is not importable; TF cross-check skipped")
        raise unittest.SkipTest("tensorflow not installed")
    import zipfile

    sys.path.insert(0, HERE)
    import convert_musicnn as conv

    wheel = conv.find_wheel()
    model = load_model()
    x = np.concatenate(list(cases()["batch"][1]))  # clips A and B
    windows = torch.from_numpy(x[: (len(x) // WINDOW) * WINDOW].reshape(-1, WINDOW))
    with torch.inference_mode():
        patches = model.logmel(windows)  # [4, 187, 96]
        torch_dense = model.network(patches).numpy()
    patches = patches.numpy()

    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tmp)
        sys.path.insert(0, tmp)
        try:
            from musicnn import models
        finally:
            sys.path.remove(tmp)
        graph = tf.Graph()
        with graph.as_default():
            with tf.name_scope("model"):
                ph = tf.compat.v1.placeholder(tf.float32, [None, 187, 96])
                is_training = tf.compat.v1.placeholder(tf.bool)
                models.define_model(ph, is_training, "MSD_musicnn", 50)
            dense = graph.get_tensor_by_name("model/dense/BiasAdd:0")  # Essentia's embedding output
            ckpt = os.path.join(tmp, "musicnn", "MSD_musicnn") + "/"
            with tf.compat.v1.Session(graph=graph) as sess:
                tf.compat.v1.train.Saver().restore(sess, ckpt)
                tf_dense = sess.run(dense, {ph: patches, is_training: False})
        err = rel_err(torch_dense, tf_dense)
        print(f"  network vs TF graph (model/dense/BiasAdd): relative error {err:.3g}")
        assert err <= 1e-4, err

        try:
            import librosa
        except ImportError:
            print("  NOTICE: librosa is not importable; front-end check skipped")
            return
        fb = librosa.filters.mel(sr=SR, n_fft=512, n_mels=96)
        assert np.abs(fb - conv.mel_filterbank()).max() <= 1e-6
        ref_patches = []
        for w in range(windows.shape[0]):
            # musicnn's batch_data(), without its float16 rounding; reflect padding as in librosa < 0.10
            mel = librosa.feature.melspectrogram(y=windows[w].numpy(), sr=SR, hop_length=256, n_fft=512,
                                                 n_mels=96, pad_mode="reflect").T
            ref = np.log10(10000 * mel + 1)
            assert ref.shape == patches[w].shape, (ref.shape, patches[w].shape)
            ferr = np.abs(ref - patches[w]).max() / np.abs(ref).max()
            print(f"  log-mel window {w} vs librosa: relative error {ferr:.3g}")
            assert ferr <= 1e-4, ferr
            ref_patches.append(ref.astype(np.float32))
        # end to end: librosa front-end + TF network, mean over each clip's two windows
        with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
            tf.compat.v1.train.Saver().restore(sess, ckpt)
            tf_win = sess.run(dense, {ph: np.stack(ref_patches), is_training: False})
        tf_emb = tf_win.reshape(2, -1, tf_win.shape[-1]).mean(axis=1)
        err = rel_err(run_model(model, cases()["batch"][1]), tf_emb)
        print(f"  embedding vs librosa + TF graph (end to end): relative error {err:.3g}")
        assert err <= 1e-4, err


def main(argv):
    if "--update-reference" in argv:
        write_reference()
        write_reference(FUSED_PT, manifest_of(FUSED_PT), reference_of(FUSED_PT))
        for pt in (INT8_PT, FUSED_INT8_PT):
            write_reference(pt, manifest_of(pt), reference_of(pt), INT8_TOLERANCE)
        return 0
    passed = failed = skipped = 0
    for test in (test_manifest_and_reference, test_variant_models, test_reconvert_matches,
                 test_tensorflow_crosscheck):
        print(f"{test.__name__} ...")
        try:
            test()
        except unittest.SkipTest as e:
            skipped += 1
            print(f"{test.__name__}: SKIPPED ({e})")
        except Exception as e:  # noqa: BLE001 - report every failure, keep going
            failed += 1
            print(f"{test.__name__}: FAILED: {type(e).__name__}: {e}")
        else:
            passed += 1
            print(f"{test.__name__}: ok")
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
