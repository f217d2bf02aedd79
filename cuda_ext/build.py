"""Build the native kernels ahead of time: ``python -m cuda_ext.build``.

Compiles every native build into the JIT cache that later processes load from: the hash grid and
the real-time renderer, each as a CPU build and (where torch sees a CUDA device) a CUDA build.
The builds run at once, one process each: a build is one or two translation units, so a lone
build leaves most cores of a GPU machine idle while nvcc and the torch headers take their time.
Then this process loads each build from the cache and prints what is available.

Exit status 1 when a CPU build fails (so CI can tell), and with ``--require-cuda`` also when a
CUDA build fails or no CUDA device is visible.  ``--json FILE`` writes the same report as JSON.
The GPU architecture comes from ``TORCH_CUDA_ARCH_LIST`` (9.0 for H100/H200) or the device.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from types import ModuleType
from typing import Callable

import torch

from . import _backend
from . import realtime as _realtime

#: family -> (kind -> loader), the reason-of-failure function
FAMILIES: dict[str, tuple[dict[str, Callable[[], ModuleType | None]], Callable[[], str]]] = {
    "hashgrid": ({"cpu": _backend.cpu_module, "cuda": _backend.cuda_module}, _backend.unavailable_reason),
    "realtime": ({"cpu": _realtime.cpu_module, "cuda": _realtime.cuda_module}, _realtime.unavailable_reason),
}


def _build_one(spec: str) -> int:
    """Child process: build (or load) one ``family:kind``; exit status 0 when it loads."""
    family, kind = spec.split(":")
    loaders, reason = FAMILIES[family]
    ok = loaders[kind]() is not None
    if not ok:
        print(reason(), file=sys.stderr)
    return 0 if ok else 1


def build_all(kinds: list[str]) -> dict:
    """Build every family for ``kinds`` concurrently (child processes), then load them here.

    Returns ``{"build_dir", "cpu_isa", "seconds", "builds": {"hashgrid:cpu": {"ok", "reason"}, ...}}``.
    """
    start = time.perf_counter()
    specs = [f"{family}:{kind}" for family in FAMILIES for kind in kinds]
    children = [subprocess.Popen([sys.executable, "-m", "cuda_ext.build", "--one", spec], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for spec in specs]
    for child in children:
        child.communicate()
    builds = {}
    for spec in specs:
        family, kind = spec.split(":")
        loaders, reason = FAMILIES[family]
        ok = loaders[kind]() is not None  # loads from the cache the child filled (or says why not)
        builds[spec] = {"ok": ok, "reason": "" if ok else reason()}
    return {"build_dir": str(_backend.build_dir()), "cpu_isa": _backend.cpu_isa(),
            "seconds": round(time.perf_counter() - start, 2), "builds": builds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cuda_ext.build", description=__doc__.splitlines()[0])
    parser.add_argument("--require-cuda", action="store_true", help="fail unless the CUDA builds load too")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one child build
    args = parser.parse_args(argv)
    if args.one:
        return _build_one(args.one)


    has_cuda = torch.cuda.is_available()
    report = build_all(["cpu", "cuda"] if has_cuda else ["cpu"])
    if not has_cuda:
        for family in FAMILIES:
            report["builds"][f"{family}:cuda"] = {"ok": False,
                                                  "reason": "torch has no CUDA device (torch.cuda.is_available() "
                                                            "is False)"}
    print(f"cuda_ext build folder: {report['build_dir']} ({report['seconds']} s)")
    for spec, entry in report["builds"].items():
        family, kind = spec.split(":")
        label = f"{kind} ({report['cpu_isa']})" if kind == "cpu" else kind
        print(f"  {family:9s} {label:13s}: {'ok' if entry['ok'] else 'unavailable'}")
        if not entry["ok"]:
            print(f"    ({entry['reason']})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    cpu_ok = all(e["ok"] for s, e in report["builds"].items() if s.endswith(":cpu"))
    cuda_ok = all(e["ok"] for s, e in report["builds"].items() if s.endswith(":cuda"))
    return 0 if cpu_ok and (cuda_ok or not args.require_cuda) else 1


if __name__ == "__main__":
    sys.exit(main())
