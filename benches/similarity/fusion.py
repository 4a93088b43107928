#!/usr/bin/env python3
"""Would fusing musicnn's MTT head with the MSD one give better neighbours? An offline study on
the labelled set of evaluate.py, in Python, outside corald.

    ${XDG_CACHE_HOME:-~/.cache}/coral/venv-model-check/bin/python benches/similarity/fusion.py

Takes the library evaluate.py prepared (run it once first), decodes every Ogg Vorbis and MP3
file of 60 s to 15 min with ffmpeg to 16 kHz mono, cuts the 8 windows corald takes (≈3 s at
the centres of 8 equal slices), and embeds them with the fp32 musicnn network loaded with each
checkpoint of the musicnn wheel that has its architecture: MSD_musicnn (what corald ships) and
MTT_musicnn (MagnaTagATune tags). Scores are centred cosines (the set's mean vector of each
model subtracted, as `track.similar` does). Fusion: each model's centred vector L2-normalised,
then concatenated with a weight (the cosine of the result is the weighted mean of the two
cosines). Reports leave-one-out P@1/P@5, macro (per game) and micro (per track), for games with
at least 6 tracks, every track a candidate.

The MSD_vgg and MTT_vgg heads are another architecture (VGG-like, 128-d penultimate layer)
that convert_musicnn.py does not build; they are not part of this study.
"""

import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "model"))
import convert_musicnn as cm  # noqa: E402

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "coral" / "similarity"
WINDOWS = int(os.environ.get("FUSION_WINDOWS", "8"))
K, MIN_TRACKS = 5, 6


def windows_of(path):
    try:
        raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-ac", "1", "-ar", "16000",
                              "-f", "f32le", "-"], capture_output=True, check=True, timeout=120).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    a = np.frombuffer(raw, np.float32)
    w = cm.WINDOW_SAMPLES
    if not 60 * cm.SR <= len(a) <= 900 * cm.SR:
        return None
    centres = (np.arange(WINDOWS) + 0.5) * len(a) / WINDOWS
    starts = np.clip((centres - w / 2).astype(int), 0, len(a) - w)
    return np.stack([a[s:s + w] for s in starts])


def precision(vectors, labels):
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sim = v @ v.T
    np.fill_diagonal(sim, -np.inf)
    count = defaultdict(int)
    for label in labels:
        count[label] += 1
    p1, p5 = defaultdict(list), defaultdict(list)
    for i, label in enumerate(labels):
        if count[label] < MIN_TRACKS:
            continue
        top = np.argsort(-sim[i])[:K]
        hits = [labels[j] == label for j in top]
        p1[label].append(float(hits[0]))
        p5[label].append(sum(hits) / K)
    macro = lambda p: float(np.mean([np.mean(v) for v in p.values()]))  # noqa: E731
    micro = lambda p: float(np.mean([x for v in p.values() for x in v]))  # noqa: E731
    return macro(p1), macro(p5), micro(p1), micro(p5), {k: float(np.mean(v)) for k, v in p5.items()}


def main():
    library = CACHE / "library"
    if not library.is_dir():
        raise SystemExit(f"{library} is missing: run benches/similarity/evaluate.py once first")
    torch.set_num_threads(os.cpu_count() or 1)
    wheel = cm.find_wheel()
    models = {name: cm.build_model(wheel, ckpt)[0] for name, ckpt in [("MSD", cm.CKPT_DIR), ("MTT", cm.MTT_CKPT_DIR)]}
    emb = {name: [] for name in models}
    labels = []
    files = sorted(p for p in library.rglob("*") if p.suffix.lower() in {".ogg", ".mp3"})
    for path in files:
        x = windows_of(path)
        if x is None:
            continue
        labels.append(path.parent.name)
        with torch.inference_mode():
            for name, model in models.items():
                emb[name].append(model(torch.from_numpy(x.reshape(1, -1).copy())).numpy()[0])
    print(f"{len(labels)} tracks embedded of {len(files)} Ogg/MP3 files, {WINDOWS} windows each")
    centred = {}
    for name, e in emb.items():
        e = np.array(e, np.float64)
        e = e - e.mean(axis=0)
        centred[name] = e / np.linalg.norm(e, axis=1, keepdims=True)
    variants = [("MSD (shipped)", centred["MSD"]), ("MTT", centred["MTT"])]
    for w in (0.5, 0.7):
        variants.append((f"MSD {w:.1f} + MTT {1 - w:.1f}",
                         np.concatenate([np.sqrt(w) * centred["MSD"], np.sqrt(1 - w) * centred["MTT"]], axis=1)))
    # What one stored vector can do: the raw outputs concatenated, each part scaled once by a
    # constant (its mean centred norm over the set), then centred as a whole (track.similar).
    parts = []
    for name in ("MSD", "MTT"):
        e = np.array(emb[name], np.float64)
        norm = np.linalg.norm(e - e.mean(axis=0), axis=1).mean()
        print(f"{name}: mean centred norm {norm:.4f}, mean norm {np.linalg.norm(e, axis=1).mean():.4f}")
        parts.append(e / norm)
    joint = np.concatenate(parts, axis=1)
    variants.append(("MSD + MTT, 1 vector", joint - joint.mean(axis=0)))
    print(f"{'variant':<20} {'macro P@1':>9} {'macro P@5':>9} {'micro P@1':>9} {'micro P@5':>9}  per game P@5")
    for name, v in variants:
        m1, m5, u1, u5, per = precision(v, labels)
        games = ", ".join(f"{k.split('-')[0]} {p:.3f}" for k, p in sorted(per.items()))
        print(f"{name:<20} {m1:>9.3f} {m5:>9.3f} {u1:>9.3f} {u5:>9.3f}  {games}")


if __name__ == "__main__":
    main()
