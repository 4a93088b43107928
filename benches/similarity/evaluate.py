#!/usr/bin/env python3
"""How good are Coral's neighbours? A labelled set of game soundtracks from Debian's packages,
indexed and embedded by a real corald, scored through `track.similar` (via `coralctl`).

    benches/similarity/evaluate.py [--variant NAME:WINDOWSxPATCHES[:MODEL] ...] [--large]

For each variant (default: the shipped 8x1, i.e. 8 windows of one ~3 s patch, with corald's
default model for the machine; MODEL sets `embed.model`, e.g. `musicnn-msd` for the fp32 model
on a CPU) it starts a fresh corald (own state directory, socket and managed PostgreSQL) with
that `[embed]` setting, adds
the set as one library, waits for every embedding, then asks each embedded track for its 5
nearest neighbours. Label = the package (the game); the query itself never counts
(leave-one-out: `track.similar` never returns the query). It reports P@1 and P@5 per label,
their macro average (each game weighs the same) and the micro average (each track), and writes
them to target/similarity/<variant>.json.

The set: the music of fb-music-high, hyperrogue-music, nexuiz-music, ufoai-music,
singularity-music, planetblupi-music-ogg, drascula-music, asc-music and xblast-tnt-musics
(about 520 MB of packages; `--large` adds supertuxkart-data and 0ad-data, 2 GB more),
downloaded with `apt-get download` into ${XDG_CACHE_HOME:-~/.cache}/coral/similarity once. Only
files corald embeds count (Ogg Vorbis and MP3 of 60 s to 15 min here: sound effects, tracker
modules and raw PCM fall out), and only games with at least 6 such tracks are queried, so that
P@5 can reach 1 (the others stay in the library as distractors).

Uses target/release/corald and coralctl when they exist, else target/debug (CORALD and
CORALCTL override); needs the managed PostgreSQL of scripts/setup. Python standard library only.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "coral" / "similarity"
PACKAGES = [
    "fb-music-high",
    "hyperrogue-music",
    "nexuiz-music",
    "ufoai-music",
    "singularity-music",
    "planetblupi-music-ogg",
    "drascula-music",
    "asc-music",
    "xblast-tnt-musics",
]
LARGE_PACKAGES = ["supertuxkart-data", "0ad-data"]
AUDIO = {".ogg", ".oga", ".mp3", ".flac", ".opus", ".wav", ".m4a"}
MIN_TRACKS_PER_LABEL = 6
K = 5


def log(msg):
    print(f"==> {msg}", file=sys.stderr, flush=True)


def binaries():
    def pick(name, env):
        if os.environ.get(env):
            return Path(os.environ[env])
        for profile in ("release", "debug"):
            p = ROOT / "target" / profile / name
            if p.exists():
                return p
        sys.exit(f"evaluate: no {name}; build with: cargo build --release --workspace --features corald/embed")

    return pick("corald", "CORALD"), pick("coralctl", "CORALCTL")


def prepare_set(packages):
    """The library directory: <label>/<file>, hard links into the extracted packages."""
    debs = CACHE / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        log(f"downloading {' '.join(missing)}")
        subprocess.run(["apt-get", "download", *missing], cwd=debs, check=True)
    library = CACHE / ("library-large" if len(packages) > len(PACKAGES) else "library")
    if library.exists():
        return library
    staging = Path(tempfile.mkdtemp(dir=CACHE))
    for pkg in packages:
        deb = sorted(debs.glob(f"{pkg}_*.deb"))[-1]
        extracted = CACHE / "extract" / pkg
        if not extracted.exists():
            extracted.mkdir(parents=True)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(extracted)], check=True)
            # Quake-style games keep their music in .pk3 (zip) archives.
            for pk3 in extracted.rglob("*.pk3"):
                subprocess.run(["unzip", "-q", "-o", str(pk3), "-d", str(pk3.with_suffix(""))], check=True)
        label_dir = staging / pkg
        label_dir.mkdir()
        for f in sorted(extracted.rglob("*")):
            if f.is_file() and f.suffix.lower() in AUDIO:
                name = "_".join(f.relative_to(extracted).parts[-3:])
                os.link(f, label_dir / name)
    staging.rename(library)
    return library


def ctl(coralctl, sock, *args):
    out = subprocess.run(
        [str(coralctl), "--socket", str(sock), "--json", *args],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"coralctl {' '.join(args)}: {out.stderr.strip()}")
    return json.loads(out.stdout) if out.stdout.strip() else None


def run_variant(name, windows, patches, model, library, corald, coralctl):
    work = Path(tempfile.mkdtemp(prefix=f"coral-eval-{name}-"))
    os.chmod(work, 0o755)
    sock = work / "run" / "corald.sock"
    config = work / "corald.toml"
    config.write_text(f"[embed]\nwindows = {windows}\nwindow_patches = {patches}\n"
                      + (f"model = {json.dumps(model)}\n" if model else ""))
    env = dict(os.environ, STATE_DIRECTORY=str(work / "state"), RUNTIME_DIRECTORY=str(work / "run"))
    env.pop("NOTIFY_SOCKET", None)
    daemon_log = open(work / "corald.log", "w")
    daemon = subprocess.Popen([str(corald), "--config", str(config)], env=env, stdout=daemon_log, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            if daemon.poll() is not None:
                raise RuntimeError(f"corald exited; log: {work / 'corald.log'}")
            try:
                ctl(coralctl, sock, "status")
                break
            except (RuntimeError, json.JSONDecodeError):
                time.sleep(0.2)
        started = time.monotonic()
        ctl(coralctl, sock, "library", "add", str(library))
        while True:
            st = ctl(coralctl, sock, "status")
            if not st["active_scans"] and st["queued_scans"] == 0:
                break
            time.sleep(1)
        embed_s = time.monotonic() - started
        labels, embedded = {}, []
        for track_id in range(1, st["tracks"] + 1):
            try:
                t = ctl(coralctl, sock, "track", str(track_id))
            except RuntimeError:
                continue
            labels[t["id"]] = Path(t["path"]).parent.name
            if t["has_embedding"]:
                embedded.append(t["id"])
        count = defaultdict(int)
        for i in embedded:
            count[labels[i]] += 1
        queried = {label for label, n in count.items() if n >= MIN_TRACKS_PER_LABEL}
        p1, p5 = defaultdict(list), defaultdict(list)
        for i in embedded:
            label = labels[i]
            if label not in queried:
                continue
            hits = [labels.get(n["track"]["id"]) == label for n in ctl(coralctl, sock, "similar", str(i), "--limit", str(K))]
            p1[label].append(float(hits[0]) if hits else 0.0)
            p5[label].append(sum(hits) / K)
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
        daemon_log.close()
    per_label = {
        label: {
            "tracks": count[label],
            "p_at_1": sum(p1[label]) / len(p1[label]),
            "p_at_5": sum(p5[label]) / len(p5[label]),
        }
        for label in sorted(queried)
    }
    result = {
        "variant": name,
        "windows": windows,
        "window_patches": patches,
        "model": model or "default",
        "tracks_indexed": st["tracks"],
        "tracks_embedded": len(embedded),
        "tracks_queried": sum(len(v) for v in p5.values()),
        "labels": per_label,
        "macro_p_at_1": sum(v["p_at_1"] for v in per_label.values()) / len(per_label),
        "macro_p_at_5": sum(v["p_at_5"] for v in per_label.values()) / len(per_label),
        "micro_p_at_1": sum(sum(v) for v in p1.values()) / sum(len(v) for v in p1.values()),
        "micro_p_at_5": sum(sum(v) for v in p5.values()) / sum(len(v) for v in p5.values()),
        "index_and_embed_seconds": round(embed_s, 1),
    }
    shutil.rmtree(work, ignore_errors=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variant",
        action="append",
        help="NAME:WINDOWSxPATCHES[:MODEL], e.g. w3x10:3x10 or fp32:8x1:musicnn-msd "
        "(default: shipped:4x1); repeatable",
    )
    parser.add_argument("--large", action="store_true", help="add supertuxkart-data and 0ad-data")
    args = parser.parse_args()
    variants = []
    for v in args.variant or ["shipped:4x1"]:
        try:
            name, shape, *model = v.split(":")
            w, p = (int(x) for x in shape.split("x"))
            if len(model) > 1:
                raise ValueError
        except ValueError:
            parser.error(f"--variant takes NAME:WINDOWSxPATCHES[:MODEL], not {v!r}")
        variants.append((name, w, p, model[0] if model else None))
    corald, coralctl = binaries()
    library = prepare_set(PACKAGES + (LARGE_PACKAGES if args.large else []))
    out_dir = ROOT / "target" / "similarity"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, w, p, model in variants:
        log(f"variant {name}: {w} windows x {p} patches, model {model or 'default'}, corald {corald}")
        r = run_variant(name, w, p, model, library, corald, coralctl)
        (out_dir / f"{name}.json").write_text(json.dumps(r, indent=2) + "\n")
        print(f"\n{name} ({w}x{p}, model {r['model']}): {r['tracks_embedded']} of {r['tracks_indexed']} tracks embedded, "
              f"{r['tracks_queried']} queried, {r['index_and_embed_seconds']} s to index and embed")
        print(f"  {'label':<24} {'tracks':>6} {'P@1':>6} {'P@5':>6}")
        for label, v in r["labels"].items():
            print(f"  {label:<24} {v['tracks']:>6} {v['p_at_1']:>6.3f} {v['p_at_5']:>6.3f}")
        print(f"  {'macro':<24} {'':>6} {r['macro_p_at_1']:>6.3f} {r['macro_p_at_5']:>6.3f}")
        print(f"  {'micro':<24} {'':>6} {r['micro_p_at_1']:>6.3f} {r['micro_p_at_5']:>6.3f}")


if __name__ == "__main__":
    main()
