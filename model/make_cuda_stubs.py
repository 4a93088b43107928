#!/usr/bin/env python3
"""Let the slim (CPU-only) PyPI torch wheel be imported from Python.

The Linux torch wheels on PyPI are CUDA builds: `torch/_C` links libtorch_python.so, which
links libtorch_cuda.so, cuDNN, NCCL, cuBLAS, cuFFT, ... Installed with `--no-deps` (plus the
two small wheels that libtorch_cpu.so itself needs: nvidia-cuda-runtime, nvidia-cuda-cupti),
`import torch` fails with "libcudnn.so.9: cannot open shared object file". The full set of
CUDA wheels is ~2 GB. For CPU work (model export, tests) none of those functions is ever
called, so this script builds tiny stand-in libraries that only satisfy the dynamic linker:
for every missing library, a shared object with that soname that defines the symbols torch
needs from it (with the right symbol versions), each a function returning 1 (an error code
in the CUDA APIs) that is never reached on CPU.

Usage (needs readelf and a C compiler: binutils and gcc/cc):
    python3 model/make_cuda_stubs.py [--torch-lib DIR] [--into DIR]

--torch-lib: torch's lib folder (default: found from this interpreter's torch, not imported).
--into:      where to write the stubs (default: that same lib folder, which torch's libraries
             search through their RPATH ($ORIGIN), so `import torch` then needs no environment
             variable). Real CUDA libraries installed later take precedence: their folders come
             first in the RPATH. Running it again rebuilds the stubs; existing real libraries
             are never overwritten. Do not use a venv with stubs to link a CUDA binary.
"""

import argparse
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile

MARKER = "coral-cuda-stub"


def readelf(*args):
    return subprocess.run(["readelf", "-W", *args], check=True, capture_output=True, text=True).stdout


def dyn_symbols(path):
    """(name, version or None, defined, type, bind) of each dynamic symbol."""
    out = []
    for line in readelf("--dyn-syms", path).splitlines():
        p = line.split()
        if len(p) < 8 or not p[0].endswith(":") or not p[0][:-1].isdigit():
            continue
        m = re.match(r"([^@]+)@+([^ ]+)", p[7])
        name, ver = (m.group(1), m.group(2)) if m else (p[7], None)
        if ver is not None:
            ver = ver.split(" ")[0]
        out.append((name, ver, p[6] != "UND", p[3], p[4]))
    return out


def version_files(path):
    """version name -> library file, from the version-needs section."""
    result, current = {}, None
    for line in readelf("-V", path).splitlines():
        m = re.search(r"File: (\S+)", line)
        if m:
            current = m.group(1)
        m = re.search(r"Name: (\S+)", line)
        if m and current:
            result[m.group(1)] = current
    return result


def ldd(path, lib_path=None):
    env = dict(os.environ, LD_LIBRARY_PATH=lib_path) if lib_path else None
    out = subprocess.run(["ldd", path], env=env, capture_output=True, text=True).stdout
    found, missing = set(), set()
    for line in out.splitlines():
        if "not found" in line:
            missing.add(line.split()[0])
        else:
            m = re.search(r"=> (/\S+)", line)
            if m:
                found.add(m.group(1))
    return found, missing


def missing_libraries(torch_lib, extension):
    return sorted(ldd(extension, torch_lib)[1])


def is_stub(path):
    try:
        if os.path.getsize(path) > 1 << 20:  # stubs are a few kB; torch's own libraries are large
            return False
        with open(path, "rb") as f:
            return MARKER.encode() in f.read()
    except OSError:
        return False


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--torch-lib")
    ap.add_argument("--into")
    ap.add_argument("--cc", default=os.environ.get("CC") or shutil.which("gcc") or "cc")
    args = ap.parse_args(argv)

    torch_lib = args.torch_lib
    if torch_lib is None:
        spec = importlib.util.find_spec("torch")
        if spec is None or not spec.origin:
            sys.exit("torch is not installed in this interpreter")
        torch_lib = os.path.join(os.path.dirname(spec.origin), "lib")
    torch_lib = os.path.abspath(torch_lib)
    into = os.path.abspath(args.into or torch_lib)
    torch_dir = os.path.dirname(torch_lib)
    extension = (glob.glob(os.path.join(torch_dir, "_C.*.so")) or [None])[0]
    if extension is None:
        sys.exit(f"no torch/_C extension next to {torch_lib}")

    # old stubs would hide what is really missing: set them aside first
    for path in glob.glob(os.path.join(into, "*.so*")):
        if is_stub(path):
            os.remove(path)
    missing = missing_libraries(torch_lib, extension)
    if not missing:
        print("torch's libraries are all present: nothing to stub")
        return 0

    users = [extension] + sorted(glob.glob(os.path.join(torch_lib, "*.so*")))
    site = os.path.dirname(torch_dir)
    # everything that will be loaded: torch's own and NVIDIA's present libraries, the system
    # libraries they use, and the Python interpreter (it defines the Py* symbols)
    interpreter = os.path.realpath(sys.executable)
    present = (users + glob.glob(os.path.join(site, "nvidia", "**", "*.so*"), recursive=True)
               + sorted(ldd(extension, torch_lib)[0]) + [interpreter] + sorted(ldd(interpreter)[0]))
    defined = set()
    for lib in present:
        for name, _, is_def, _, _ in dyn_symbols(lib):
            if is_def:
                defined.add(name)
    ver_file = {}
    for lib in users:
        ver_file.update(version_files(lib))

    # symbols that no present library defines, grouped by the library (via version) that should
    per_lib = {so: {} for so in missing}  # soname -> {version or None: {name: type}}
    unversioned = {}
    for lib in users:
        for name, ver, is_def, typ, bind in dyn_symbols(lib):
            if is_def or name in defined or bind == "WEAK":
                continue
            if ver is None:
                unversioned[name] = typ
                continue
            so = ver_file.get(ver, ver)
            if so in per_lib:
                per_lib[so].setdefault(ver, {})[name] = typ
    os.makedirs(into, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for so, versions in per_lib.items():
            lines = [f'const char coral_stub_marker[] = "{MARKER}: never called on CPU";']
            script = []
            seen = set()
            for ver, names in sorted(versions.items()):
                for name, typ in sorted(names.items()):
                    seen.add(name)
                    lines.append(f"char {name}[8];" if typ == "OBJECT" else f"long {name}(void) {{ return 1; }}")
                script.append(ver + " { global: " + " ".join(n + ";" for n in sorted(names)) + " };")
            # unversioned references resolve against any loaded library: give each stub all of them
            for name, typ in sorted(unversioned.items()):
                if name not in seen:
                    lines.append(f"char {name}[8];" if typ == "OBJECT" else f"long {name}(void) {{ return 1; }}")
            c_file = os.path.join(tmp, so + ".c")
            with open(c_file, "w") as f:
                f.write("\n".join(lines) + "\n")
            cmd = [args.cc, "-shared", "-fPIC", "-O0", "-w", "-o", os.path.join(into, so), c_file,
                   f"-Wl,-soname,{so}"]
            if script:
                map_file = os.path.join(tmp, so + ".map")
                with open(map_file, "w") as f:
                    f.write("\n".join(script) + "\n")
                cmd.append(f"-Wl,--version-script={map_file}")
            subprocess.run(cmd, check=True)
    still = missing_libraries(torch_lib if into == torch_lib else f"{torch_lib}:{into}", extension)
    if still:
        sys.exit(f"still missing after stubbing: {still}")
    print(f"wrote {len(missing)} stub libraries into {into}: {' '.join(missing)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
