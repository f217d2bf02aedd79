"""The GPU check: one command that installs, builds, tests and measures everything of citygen that
needs CUDA, made for a short loan of one H100/H200 with no network (``scripts/gpu-check OUTDIR``).

Stages, in order, each in its own process under its own time limit (a crash, a hang or a failed
assertion in one is recorded with its error, and the next stage still runs):

==============  =====  ==========================================================================
stage           limit  what it does (GPU sizes; ``--cpu-smoke`` sizes in :data:`SIZES`)
==============  =====  ==========================================================================
environment     10 s   Python, torch, CUDA, device, nvcc, nvidia-smi, CPU facts
install         30 s   ``pip install --no-index`` of the wheel folder (``scripts/make-gpu-wheels``):
                       the packages the GPU image lacks, then citygen's wheel, into the running
                       environment (or ``--install-target DIR``, the default where it is
                       read-only); the installed citygen must import the train/render path and
                       run ``citygen --help``
build           150 s  ``python -m cuda_ext.build --require-cuda`` (TORCH_CUDA_ARCH_LIST=9.0):
                       hash grid + real-time renderer, CPU and CUDA builds, at once
cuda_tests      45 s   pytest tests/test_cuda_ext.py tests/test_realtime.py tests/test_narrow_band.py (junit XML): hash grid
                       fwd/bwd and in-place accumulation vs torch, real-time kernel vs reference
                       and vs the CPU build; fails when a CUDA test was skipped
bench_encode    40 s   ``citygen bench encode --sweep-log2 18 19 20 21 22``: torch vs cuda_ext
                       (and tcnn where importable), points/s forward + backward
synth           35 s   ``citygen synth --preset tiny`` (64 images, timed apart)
train           70 s   the ``gpu`` preset on that survey for 40 s of training: steps/s, rays/s,
                       held-out PSNR/SSIM at 10, 20 and 40 s (evaluation time excluded)
render          50 s   ``citygen bench render`` on the trained block at 1920x1080 and 3840x2160:
                       FPS, time per stage, samples per pixel, peak GPU memory, PSNR vs reference
render_parity   15 s   the CUDA real-time kernel vs the CPU build, same block, same view
stream          30 s   fly-through over a synthetic 100 km2 tile of 400 packed blocks, 12 GB
                       budget: resident bytes never over budget, frames drawn while loading
==============  =====  ==========================================================================

The limits add up to 475 s, so the whole run ends inside 8 minutes even when every stage runs
into its limit.  How they were sized (estimates: no GPU run had confirmed them; the first run's
``seconds`` per stage say how to resize them): about twice the expected time of each stage on
an H100/H200 with 16 cores -- the four JIT builds at once (~60-80 s: one nvcc file and one
torch-header C++ file each; the 2-core box took 130-200 s for the two CPU ones), the torch
reference encode at 2^22 points (~0.3 s a step, 6 steps a size), the survey (~19 s on 2
cores, 2 render workers), 40 s of training plus set-up, three checkpoints and evaluations of 8
small views, two resolutions of 5+1 real-time frames plus one torch reference frame each
(4K: ~130 chunks of 65536 rays), 200 streamed frames at 1080p; the build gets the most slack
because every later stage depends on its cache.

Without a CUDA device the same check runs at small sizes (``--cpu-smoke`` forces them on a GPU
too): the CUDA-only stages (``cuda_tests``, ``render_parity``) report ``skipped: no CUDA
device``, the others really run on the CPU builds, so the script cannot rot between GPU loans
(tests/test_gpu_check.py runs it).

Writes ``OUTDIR/gpu-check.json`` (per stage: status ok/failed/skipped, error, seconds, limit,
figures; rewritten atomically after every stage, so a run cut short still leaves one),
``OUTDIR/gpu-check.log`` (every stage's output) and, when the CUDA tests ran,
``OUTDIR/cuda-tests.xml``.  Data (survey, training run) goes to ``--work`` (default: a
temporary folder, removed at the end).  Exit status 0 when no stage failed, 1 otherwise.

Stages run the checkout's code (the repository this module sits in); the install stage proves
that the wheel folder installs and that the installed citygen runs on its own, and that the
wheel was made from these same sources.  This module imports only the standard library at its
top, so it runs before anything is installed.
"""

from __future__ import annotations

# Only the standard library at the top, on purpose: scripts/gpu-check imports this module from
# the checkout before the wheels (torch aside: numpy, pyproj, rasterio, citygen ...) are
# installed; each stage imports what it needs inside its own function.
import argparse
import copy
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Stage:
    name: str
    limit_s: int          # at GPU sizes (they add up to 475 s: inside 8 minutes)
    smoke_limit_s: int    # at CPU-smoke sizes (a shared 2-core box; the first JIT build takes minutes)
    needs_cuda: bool
    what: str


STAGES: list[Stage] = [
    Stage("environment", 10, 60, False, "Python, torch, CUDA, device and toolchain facts"),
    Stage("install", 30, 180, False, "offline install of the wheel folder; the installed citygen runs alone"),
    Stage("build", 150, 900, False, "python -m cuda_ext.build: every native build ahead of time"),
    Stage("cuda_tests", 45, 300, True, "pytest on the CUDA parity tests (junit XML)"),
    Stage("bench_encode", 40, 120, False, "citygen bench encode: torch vs cuda_ext (vs tcnn), points/s sweep"),
    Stage("synth", 35, 120, False, "citygen synth: the synthetic survey the training stage uses"),
    Stage("train", 70, 180, False, "GPU preset for a fixed budget: steps/s, rays/s, held-out PSNR/SSIM over time"),
    Stage("render", 50, 120, False, "citygen bench render on the trained block: FPS, stages, samples, memory"),
    Stage("render_parity", 15, 120, True, "CUDA real-time kernel vs the CPU build on the same view"),
    Stage("stream", 30, 120, False, "streaming fly-through over a tile of many packed blocks under a budget"),
]
STAGE_NAMES = [s.name for s in STAGES]

#: Sizes per mode.  "gpu": one H100/H200; "smoke": seconds on a CPU (the same code paths).
SIZES: dict[str, dict[str, Any]] = {
    "gpu": {"encode_log2": [18, 19, 20, 21, 22], "encode_repeats": 5, "survey_preset": "tiny",
            "train_preset": "gpu", "train_overrides": {}, "eval_at_s": [10.0, 20.0, 40.0],
            "render_res": ["1920x1080", "3840x2160"], "render_frames": 5, "parity_res": (640, 360),
            "stream": {"resolution": (1920, 1080), "area_km2": 100.0, "block_size": 500.0, "budget_gb": 12.0,
                       "frames": 200}},
    "smoke": {"encode_log2": [10, 12], "encode_repeats": 2, "survey_preset": "smoke",
              "train_preset": "tiny",
              # a field small enough that a CPU step takes milliseconds: the point is the code path
              "train_overrides": {"field.n_levels": 4, "field.log2_hashmap_size": 12, "field.max_resolution": 64,
                                  "field.hidden_dim": 16, "field.semantic_hidden_dim": 16,
                                  "field.appearance_dim": 4, "rays_per_batch": 256, "render.chunk_rays": 4096,
                                  "error_sampling": 0.0},
              "eval_at_s": [1.0, 2.0], "render_res": ["48x27"], "render_frames": 2, "parity_res": (48, 27),
              "stream": {"resolution": (32, 18), "area_km2": 1.0, "block_size": 250.0, "budget_gb": 0.002,
                         "frames": 4}},
}

#: What the training and rendering path imports (checked against the installed citygen).
PATH_MODULES = ["citygen.cli", "citygen.train.trainer", "citygen.train.evaluate", "citygen.render.realtime",
                "citygen.render.streaming", "citygen.bench", "citygen.bench_render", "survey_io.synthetic",
                "cuda_ext.build", "cuda_ext.hashgrid"]

#: Files whose digest ties a wheel folder to the checkout it was made from.
SOURCE_GLOBS = ["citygen/**/*.py", "survey_io/**/*.py", "cuda_ext/**/*.py", "cuda_ext/csrc/*", "viewer/**/*.py",
                "citygen/configs/*.yaml", "setup.py"]


class Skip(Exception):
    """A stage that cannot run here (its reason is recorded)."""


class StageFailure(Exception):
    """A stage that ran and found something wrong (its message is the recorded error)."""


# -- helpers -----------------------------------------------------------------------------------------
def source_digest(root: Path = REPO) -> str:
    """sha256 over the package sources (paths and bytes) of a checkout."""
    h = hashlib.sha256()
    files = sorted({p for g in SOURCE_GLOBS for p in root.glob(g) if p.is_file() and "__pycache__" not in p.parts})
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    """Atomically (survey_io.atomic); falls back to a plain temp-and-rename where survey_io cannot
    be imported yet, so that a broken environment still leaves its report."""
    try:
        from survey_io.atomic import atomic_write_json
    except Exception:  # noqa: BLE001 -- the report must be written whatever is missing
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(obj, indent=2, default=str))
        os.replace(tmp, path)
        return
    atomic_write_json(path, json.loads(json.dumps(obj, default=str)))


def run(cmd: list[str], log, cwd: Path | None = None, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run a command inside a stage, its output into the stage's log (and returned)."""
    print(f"$ {' '.join(cmd)}", file=log, flush=True)
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          check=False)
    log.write(proc.stdout)
    log.flush()
    if check and proc.returncode != 0:
        tail = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()][-3:]
        raise StageFailure(f"{' '.join(cmd[:5])} ... exited {proc.returncode}: {' | '.join(tail)}")
    return proc


def cli(*args: str) -> list[str]:
    """The ``citygen`` command (its console script's module, so no PATH lookup is needed)."""
    return [sys.executable, "-m", "citygen.cli", *args]


@dataclass
class Context:
    out: Path            # OUTDIR: the report, the log, junit XML
    work: Path           # survey, training run, stage results
    size: str            # "gpu" or "smoke"
    cuda: bool           # torch sees a CUDA device
    wheels: Path | None
    #: install into this folder (pip --target) instead of the running environment; the stages
    #: then find it on PYTHONPATH.  None: the environment's own site-packages (where writable)
    site: Path | None = None

    @property
    def sizes(self) -> dict[str, Any]:
        return SIZES[self.size]

    @property
    def device(self) -> str:
        return "cuda" if self.cuda else "cpu"

    def to_json(self) -> dict[str, Any]:
        return {"out": str(self.out), "work": str(self.work), "size": self.size, "cuda": self.cuda,
                "wheels": str(self.wheels) if self.wheels else None, "site": str(self.site) if self.site else None}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Context":
        return cls(Path(d["out"]), Path(d["work"]), d["size"], bool(d["cuda"]),
                   Path(d["wheels"]) if d["wheels"] else None, Path(d["site"]) if d.get("site") else None)


# -- stages (each runs in its own process; returns its figures) --------------------------------------
def stage_environment(ctx: Context, log) -> dict[str, Any]:
    import torch

    fig: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable,
                           "platform": platform.platform(), "cpu_count": os.cpu_count(),
                           "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                           "cuda_available": torch.cuda.is_available(),
                           "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"),
                           "torch_extensions_dir": os.environ.get("TORCH_EXTENSIONS_DIR"),
                           "checkout_digest": source_digest()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        fig.update(device_name=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_bytes=p.total_memory,
                   multiprocessors=p.multi_processor_count)
    for tool, args in (("nvcc", ["--version"]),
                       ("nvidia-smi", ["--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])):
        exe = shutil.which(tool)
        if exe is None:
            fig[tool] = None
            continue
        out = run([exe, *args], log, check=False).stdout.strip().splitlines()
        fig[tool] = out[-1] if out else ""
    return fig


def stage_install(ctx: Context, log) -> dict[str, Any]:
    if ctx.wheels is None:
        raise Skip("no --wheels folder given (make one with scripts/make-gpu-wheels)")
    manifest_path = ctx.wheels / "manifest.json"
    if not manifest_path.is_file():
        raise StageFailure(f"{manifest_path}: no manifest: not a folder made by scripts/make-gpu-wheels")
    manifest = json.loads(manifest_path.read_text())
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest["python_version"] != here:
        raise StageFailure(f"{ctx.wheels}: wheels are for Python {manifest['python_version']}, this is {here}")
    # --isolated: no pip configuration or PIP_* variable of the machine adds a source or a constraint
    pip = [sys.executable, "-m", "pip", "--isolated", "install", "--no-index", "--find-links", str(ctx.wheels),
           "--disable-pip-version-check", "--no-input"]

    site = ctx.site
    if site is None and not os.access(sysconfig.get_paths()["purelib"], os.W_OK):
        site = ctx.work / "site"   # a read-only environment: a folder of our own on PYTHONPATH
    t0 = time.perf_counter()
    if site is None:
        # resolved against what the image has: a missing or too old dependency fails here, by name
        run([*pip, "-r", str(ctx.wheels / "requirements.txt")], log)
        run([*pip, "--no-deps", "--force-reinstall", str(ctx.wheels / manifest["citygen_wheel"])], log)
    else:
        # pip --target ignores what is installed: every wheel of the folder, no resolution
        run([*pip, "--no-deps", "--upgrade", "--target", str(site), *sorted(map(str, ctx.wheels.glob("*.whl")))],
            log)
    install_s = time.perf_counter() - t0
    # The installed citygen alone: outside the checkout, nothing of it on the path.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if site is not None:
        env["PYTHONPATH"] = str(site)
    probe = ("import importlib, json, citygen\n"
             f"mods = {PATH_MODULES!r}\n"
             "for m in mods: importlib.import_module(m)\n"
             "from citygen.config import load_config\n"
             "cfg = load_config('gpu')\n"
             "print(json.dumps({'citygen': citygen.__file__, 'gpu_preset_table': cfg.field.log2_hashmap_size}))\n")
    with tempfile.TemporaryDirectory() as alone:
        out = run([sys.executable, "-c", probe], log, cwd=Path(alone), env=env).stdout.strip().splitlines()[-1]
        installed = json.loads(out)
        if Path(installed["citygen"]).resolve().is_relative_to(REPO):
            raise StageFailure(f"citygen imported from the checkout ({installed['citygen']}), not the install")
        exe = Path(site or Path(sys.executable).parent) / ("bin" if site else "") / "citygen"
        run([str(exe) if exe.exists() else "citygen", "--help"], log, cwd=Path(alone), env=env)
    fresh = manifest["source_digest"] == source_digest()
    fig = {"install_s": round(install_s, 2), "site": str(site) if site else None,
           "wheels": manifest["wheels"], "citygen_installed_at": installed["citygen"],
           "imports_ok": PATH_MODULES, "made_from_commit": manifest.get("git_commit"),
           "wheel_matches_checkout": fresh}
    if not fresh:
        raise StageFailure("the wheel folder was made from other sources than this checkout: rerun "
                           "scripts/make-gpu-wheels (the later stages run the checkout's code)", fig)
    return fig


def stage_build(ctx: Context, log) -> dict[str, Any]:
    report = ctx.work / "build.json"
    cmd = [sys.executable, "-m", "cuda_ext.build", "--json", str(report)] + (["--require-cuda"] if ctx.cuda else [])
    proc = run(cmd, log, check=False)
    fig = json.loads(report.read_text()) if report.is_file() else {}
    if proc.returncode != 0:
        bad = {k: v["reason"] for k, v in fig.get("builds", {}).items() if not v["ok"]}
        raise StageFailure(f"cuda_ext.build exited {proc.returncode}: {bad or proc.stdout.strip()[-300:]}", fig)
    return fig


def _junit_summary(path: Path) -> dict[str, Any]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    cases = []
    for suite in suites:
        for case in suite.iter("testcase"):
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                    message = (node.get("message") or "").splitlines()[0][:300] if node.get("message") else ""
                    break
            cases.append({"name": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                          "seconds": float(case.get("time") or 0), "message": message})
    counts = {k: sum(1 for c in cases if c["outcome"] == k) for k in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "cases": cases}


def stage_cuda_tests(ctx: Context, log) -> dict[str, Any]:
    xml = ctx.out / "cuda-tests.xml"
    # every test of both files (the CPU parity tests too: the CUDA ones compare against that build);
    # the nvcc compile checks are left out: the build stage compiled the same files for sm_90
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda_ext.py",
           "tests/test_realtime.py", "tests/test_narrow_band.py", "-k", "not compile_with_nvcc and not compiles_with_nvcc",
           f"--junitxml={xml}", "-o", "junit_family=xunit2"]
    proc = run(cmd, log, cwd=REPO, check=False)
    if not xml.is_file():
        raise StageFailure(f"pytest exited {proc.returncode} without a junit report: {proc.stdout.strip()[-300:]}")
    fig = _junit_summary(xml)
    fig["junit_xml"] = str(xml)
    failed = [c for c in fig["cases"] if c["outcome"] in ("failed", "error")]
    # on a GPU every CUDA test must run: one that skips there lost its device or its build
    cuda_skipped = [c for c in fig["cases"] if c["outcome"] == "skipped" and ("cuda" in c["name"].split("::")[-1]
                    and "reports_why" not in c["name"])]
    if failed or cuda_skipped or proc.returncode != 0:
        what = [f"{c['name']}: {c['message']}" for c in failed] + [f"skipped on a GPU: {c['name']}: {c['message']}"
                                                                    for c in cuda_skipped]
        raise StageFailure(f"pytest exited {proc.returncode}; " + "; ".join(what[:5]), fig)
    return fig


def stage_bench_encode(ctx: Context, log) -> dict[str, Any]:
    raw_path = ctx.work / "bench_encode.json"
    s = ctx.sizes
    run(cli("bench", "encode", "--device", ctx.device, "--repeats", str(s["encode_repeats"]), "--out", str(raw_path),
            "--sweep-log2", *[str(k) for k in s["encode_log2"]]), log)
    raw = json.loads(raw_path.read_text())
    table: dict[str, dict[str, Any]] = {}
    for entry in raw["sweep"]:
        for r in entry["results"]:
            row = table.setdefault(r["backend"], {})
            row[str(entry["n_points"])] = r["points_per_s"] if r["available"] else None
            if not r["available"]:
                row["reason"] = r["reason"]
    fig = {"device": raw["device"], "device_name": raw["device_name"], "points_per_s": table,
           "config": raw["config"], "raw": raw}
    native = table.get("cuda_ext", {})
    if not any(isinstance(v, (int, float)) for k, v in native.items() if k != "reason"):
        raise StageFailure(f"cuda_ext did not run on {raw['device']}: {native.get('reason', '?')}", fig)
    return fig


def stage_synth(ctx: Context, log) -> dict[str, Any]:
    survey = ctx.work / "survey"
    shutil.rmtree(survey, ignore_errors=True)
    t0 = time.perf_counter()
    run(cli("synth", str(survey), "--preset", ctx.sizes["survey_preset"]), log)
    seconds = time.perf_counter() - t0
    meta = json.loads((survey / "transforms.json").read_text())
    return {"preset": ctx.sizes["survey_preset"], "seconds": round(seconds, 2), "images": len(meta["frames"]),
            "test_images": len(meta.get("test_filenames", [])), "size": [meta.get("w"), meta.get("h")],
            "path": str(survey)}


def stage_train(ctx: Context, log) -> dict[str, Any]:
    import torch

    from .config import load_config
    from .train.evaluate import evaluate
    from .train.trainer import BlockTrainer

    survey = ctx.work / "survey" / "transforms.json"
    if not survey.is_file():
        raise StageFailure(f"{survey}: no survey (the synth stage did not write one)")
    s = ctx.sizes
    run_dir = ctx.work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = {**s["train_overrides"], "device": ctx.device, "eval_at_end": False, "max_seconds": s["eval_at_s"][0]}
    cfg = load_config(s["train_preset"], overrides)
    t0 = time.perf_counter()
    trainer = BlockTrainer(cfg, survey, run_dir)
    setup_s = time.perf_counter() - t0
    curve = []
    for budget in s["eval_at_s"]:
        cfg.max_seconds = budget       # train() stops once its training time reaches this
        checkpoint = trainer.train(progress=False)
        e0 = time.perf_counter()
        report = evaluate(checkpoint, trainer.survey, run_dir / "eval", device=ctx.device, write_images=False)
        curve.append({"train_s": round(trainer.seconds, 2), "step": trainer.step,
                      "psnr": round(report["mean"]["psnr"], 3), "ssim": round(report["mean"]["ssim"], 4),
                      "eval_s": round(time.perf_counter() - e0, 2)})
        print(f"held-out at {trainer.seconds:.1f} s (step {trainer.step}): {curve[-1]}", file=log, flush=True)
        if trainer.step >= cfg.steps:
            break
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    last = lines[-1] if lines else {}
    fig = {"preset": s["train_preset"], "overrides": s["train_overrides"], "device": ctx.device,
           "hash_backend": trainer.field.encoding.backend, "rays_per_batch": cfg.rays_per_batch,
           "log2_hashmap_size": cfg.field.log2_hashmap_size, "setup_s": round(setup_s, 2),
           "steps": trainer.step, "train_s": round(trainer.seconds, 2),
           "steps_per_s": round(trainer.step / max(trainer.seconds, 1e-9), 2),
           "rays_per_s": round(trainer.step * cfg.rays_per_batch / max(trainer.seconds, 1e-9)),
           "samples_per_ray_last": last.get("samples_per_ray"), "psnr_train_last": last.get("psnr_train"),
           "heldout": curve, "run": str(run_dir)}
    if ctx.cuda:
        fig["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
        if trainer.field.encoding.backend != "cuda_ext":
            raise StageFailure(f"trained with the {trainer.field.encoding.backend!r} hash grid, not cuda_ext", fig)
    return fig


def _trained_run(ctx: Context) -> Path | None:
    run_dir = ctx.work / "run"
    # deferred: this module runs before the wheels (torch) are installed, citygen.store needs them
    from .store.layout import is_single_run

    return run_dir if is_single_run(run_dir) else None


def stage_render(ctx: Context, log) -> dict[str, Any]:
    s = ctx.sizes
    raw_path = ctx.work / "bench_render.json"
    tile = _trained_run(ctx)
    args = ["bench", "render", "--device", ctx.device, "--res", *s["render_res"], "--frames", str(s["render_frames"]),
            "--reference-frames", "1", "--no-stream", "--out", str(raw_path)]
    run(cli(*args, *(["--tile", str(tile)] if tile else [])), log)
    raw = json.loads(raw_path.read_text())
    views = {}
    for v in raw["views"]:
        rt = v["realtime"]
        views[v["resolution"]] = {"backend": v["backend"], "fps": rt["fps"], "frame_s_median": rt["frame_s_median"],
                                  "frame_s_worst": rt["frame_s_worst"], "stages_s_median": rt["stages_s_median"],
                                  "samples_per_ray": rt["samples_per_ray"], "peak_gpu_bytes": rt["peak_gpu_bytes"],
                                  "psnr_vs_reference_db": rt.get("psnr_vs_reference_db"),
                                  "speedup_vs_reference": rt.get("speedup_vs_reference"),
                                  "reference_fps": v.get("reference", {}).get("fps")}
    fig = {"field_source": raw["field_source"], "trained_block": tile is not None, "views": views, "raw": raw}
    fallback = [f"{r}: {v['fallback_reason']}" for r, v in zip(views, raw["views"]) if v["backend"] != "native"]
    if fallback:
        raise StageFailure(f"the real-time path fell back to torch ({'; '.join(fallback)})", fig)
    if tile is None:
        raise StageFailure("no trained block (the train stage failed): measured on a synthetic field instead", fig)
    return fig


def stage_render_parity(ctx: Context, log) -> dict[str, Any]:
    import numpy as np
    import torch

    from .bench_render import fly_path, pinhole
    from .render.realtime import RealtimeRenderer

    tile = _trained_run(ctx)
    if tile is None:
        raise StageFailure("no trained block (the train stage failed)")
    from .bench_render import load_bench_field

    field, render_cfg, label = load_bench_field(tile, torch.device("cpu"))
    altitude = 0.5 * float((field.aabb[1] - field.aabb[0])[:2].max())
    camera = pinhole(*ctx.sizes["parity_res"])
    views = fly_path(field.aabb.detach().numpy(), 3, altitude)
    gpu_field = copy.deepcopy(field).to("cuda")   # the occupancy grid is a submodule: it moves too
    cpu_r = RealtimeRenderer(field, render_cfg, device="cpu", backend="native")
    gpu_r = RealtimeRenderer(gpu_field, render_cfg, device="cuda", backend="native")
    rows = []
    for i, c2w in enumerate(views):
        a = cpu_r.render(camera, c2w)
        b = {k: v.cpu() for k, v in gpu_r.render(camera, c2w).items() if isinstance(v, torch.Tensor)}
        mse = float(((a["rgb"] - b["rgb"]) ** 2).mean())
        hit = (a["acc"] > 0.5) & (b["acc"] > 0.5)
        rows.append({"view": i, "psnr_db": -10 * math.log10(max(mse, 1e-20)),
                     "rgb_max_abs": float((a["rgb"] - b["rgb"]).abs().max()),
                     "depth_median_abs_m": float((a["depth"] - b["depth"])[hit].abs().median()) if hit.any() else None,
                     "class_agreement": float((a["semantics"].argmax(-1) == b["semantics"].argmax(-1)).float().mean()),
                     "samples_per_ray_cpu": float(a["n_samples"].float().mean()),
                     "samples_per_ray_cuda": float(b["n_samples"].float().mean())})
    fig = {"field_source": label, "resolution": "x".join(map(str, ctx.sizes["parity_res"])), "views": rows,
           "psnr_db_min": min(r["psnr_db"] for r in rows), "bound_db": 35.0}
    # the bound of the parity tests (tests/test_realtime.py): float16 storage on the GPU only
    if fig["psnr_db_min"] < 35.0 or not np.isfinite(fig["psnr_db_min"]):
        raise StageFailure(f"CUDA vs CPU build: {fig['psnr_db_min']:.1f} dB < 35 dB", fig)
    return fig


def stage_stream(ctx: Context, log) -> dict[str, Any]:
    import torch

    from .bench_render import bench_streaming, stream_field_config

    st = ctx.sizes["stream"]
    result = bench_streaming(torch.device(ctx.device), st["resolution"], st["area_km2"], st["block_size"],
                             int(st["budget_gb"] * 1e9), st["frames"], stream_field_config(ctx.size == "gpu"),
                             altitude=250.0)
    if not result.get("available"):
        raise StageFailure(f"no native real-time build for {ctx.device}: {result.get('reason')}", result)
    result["within_budget"] = result["peak_resident_bytes"] <= result["budget_bytes"]
    if not result["within_budget"]:
        raise StageFailure(f"resident bytes {result['peak_resident_bytes']} over the budget {result['budget_bytes']}",
                           result)
    return result


STAGE_FUNCS: dict[str, Callable[[Context, Any], dict[str, Any]]] = {
    "environment": stage_environment, "install": stage_install, "build": stage_build,
    "cuda_tests": stage_cuda_tests, "bench_encode": stage_bench_encode, "synth": stage_synth,
    "train": stage_train, "render": stage_render, "render_parity": stage_render_parity, "stream": stage_stream,
}


def _run_stage_here(name: str, ctx: Context, result_path: Path) -> int:
    """Child process: run one stage, write {status, error, figures} to ``result_path``."""
    result: dict[str, Any] = {"status": "ok", "error": None, "figures": {}}
    try:
        result["figures"] = STAGE_FUNCS[name](ctx, sys.stdout)
    except Skip as skip:
        result.update(status="skipped", reason=str(skip))
    except StageFailure as err:
        result.update(status="failed", error=str(err.args[0]),
                      figures=err.args[1] if len(err.args) > 1 else {})
    except BaseException as err:  # noqa: BLE001 -- any crash is this stage's recorded failure
        traceback.print_exc()
        result.update(status="failed", error=f"{type(err).__name__}: {err}".strip().splitlines()[0][:500])
    write_json(result_path, result)
    return 0


# -- the driver --------------------------------------------------------------------------------------
def _stage_env(ctx: Context) -> dict[str, str]:
    env = dict(os.environ)
    # the checkout's code in every stage (see the module docstring), whatever the cwd
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *([str(ctx.site)] if ctx.site else []),
                                         *filter(None, [os.environ.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")   # H100/H200 (sm_90): no build for other archs
    return env


def _launch(stage: Stage, ctx: Context, limit: int, log) -> dict[str, Any]:
    result_path = ctx.work / "stages" / f"{stage.name}.json"
    result_path.unlink(missing_ok=True)
    ctx_path = ctx.work / "context.json"
    cmd = [sys.executable, "-m", "citygen.gpu_check", "--stage", stage.name, "--context", str(ctx_path)]
    log.write(f"\n===== stage {stage.name} (limit {limit} s): {stage.what}\n")
    log.flush()
    start = time.perf_counter()
    # a session of its own, so that a stage over its limit goes down with everything it started
    proc = subprocess.Popen(cmd, cwd=REPO, env=_stage_env(ctx), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        proc.wait(timeout=limit)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    seconds = time.perf_counter() - start
    if timed_out:
        entry = {"status": "failed", "error": f"time limit of {limit} s exceeded (killed)", "figures": {}}
    elif result_path.is_file():
        entry = json.loads(result_path.read_text())
    else:
        entry = {"status": "failed", "error": f"the stage process died (exit status {proc.returncode}) before "
                                              "writing its result: see the log", "figures": {}}
    return {"name": stage.name, "status": entry["status"], "error": entry.get("error"),
            "reason": entry.get("reason"), "seconds": round(seconds, 2), "limit_s": limit,
            "needs_cuda": stage.needs_cuda, "figures": entry.get("figures", {})}


def check(out: Path, wheels: Path | None = None, cpu_smoke: bool = False, only: list[str] | None = None,
          work: Path | None = None, keep_work: bool = False, site: Path | None = None) -> dict[str, Any]:
    """Run the check (module docstring) and return the report it wrote to ``out/gpu-check.json``."""
    out.mkdir(parents=True, exist_ok=True)
    own_work = work is None
    work = Path(tempfile.mkdtemp(prefix="citygen-gpu-check-")) if work is None else work
    (work / "stages").mkdir(parents=True, exist_ok=True)
    report_path, log_path = out / "gpu-check.json", out / "gpu-check.log"
    (out / "cuda-tests.xml").unlink(missing_ok=True)
    started = time.time()
    report: dict[str, Any] = {"check": "citygen gpu-check", "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                         time.gmtime(started)),
                              "argv": sys.argv, "stages": []}
    ctx = Context(out=out, work=work, size="smoke", cuda=False, wheels=wheels, site=site)
    try:
        with open(log_path, "w", encoding="utf-8") as log:
            for stage in STAGES:
                if only and stage.name not in only and stage.name != "environment":
                    continue   # the environment always runs: it says whether there is a CUDA device
                limit = stage.limit_s if ctx.size == "gpu" else stage.smoke_limit_s
                if stage.needs_cuda and not ctx.cuda:
                    entry = {"name": stage.name, "status": "skipped", "error": None, "reason": "no CUDA device",
                             "seconds": 0.0, "limit_s": limit, "needs_cuda": True, "figures": {}}
                    log.write(f"\n===== stage {stage.name}: skipped: no CUDA device\n")
                else:
                    write_json(work / "context.json", ctx.to_json())
                    entry = _launch(stage, ctx, limit, log)
                if stage.name == "install" and entry["figures"].get("site"):
                    ctx.site = Path(entry["figures"]["site"])   # the later stages import from there
                if stage.name == "environment":
                    ctx.cuda = bool(entry["figures"].get("cuda_available"))
                    ctx.size = "gpu" if ctx.cuda and not cpu_smoke else "smoke"
                    report.update(size=ctx.size, cuda=ctx.cuda,
                                  limits_sum_s=sum(s.limit_s if ctx.size == "gpu" else s.smoke_limit_s
                                                   for s in STAGES))
                report["stages"].append(entry)
                line = f"[gpu-check] {stage.name:14s} {entry['status']:8s} {entry['seconds']:7.1f} s"
                detail = entry.get("error") or entry.get("reason")
                print(line + (f"  ({detail})" if detail else ""), flush=True)
                log.write(line + (f"  ({detail})" if detail else "") + "\n")
                log.flush()
                _finish(report, started)
                write_json(report_path, report)
    finally:
        if own_work and not keep_work:
            shutil.rmtree(work, ignore_errors=True)
    return report


def _finish(report: dict[str, Any], started: float) -> None:
    report["seconds"] = round(time.time() - started, 2)
    report["summary"] = {k: sum(1 for s in report["stages"] if s["status"] == k) for k in ("ok", "failed", "skipped")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu-check", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, nargs="?", help="where gpu-check.json and gpu-check.log go")
    parser.add_argument("--wheels", type=Path, help="wheel folder from scripts/make-gpu-wheels to install first")
    parser.add_argument("--install-target", type=Path, help="install the wheels into this folder (pip --target; "
                        "the default where the environment is read-only) instead of the running environment")
    parser.add_argument("--cpu-smoke", action="store_true", help="small sizes even where a GPU is present")
    parser.add_argument("--only", help=f"comma-separated stages to run (of: {', '.join(STAGE_NAMES)}; "
                                       "environment always runs)")
    parser.add_argument("--work", type=Path, help="data folder (default: a temporary one, removed at the end)")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary data folder")
    parser.add_argument("--stage", help=argparse.SUPPRESS)    # internal: run one stage in this process
    parser.add_argument("--context", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        ctx = Context.from_json(json.loads(args.context.read_text()))
        return _run_stage_here(args.stage, ctx, ctx.work / "stages" / f"{args.stage}.json")
    if args.out is None:
        parser.error("OUTDIR is required")
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    unknown = sorted(set(only or []) - set(STAGE_NAMES))
    if unknown:
        print(f"gpu-check: error: --only: unknown stage(s) {', '.join(unknown)} (known: {', '.join(STAGE_NAMES)})",
              file=sys.stderr)
        return 2
    if args.wheels is not None and not args.wheels.is_dir():
        print(f"gpu-check: error: {args.wheels}: --wheels is not a folder", file=sys.stderr)
        return 2
    report = check(args.out.resolve(), args.wheels.resolve() if args.wheels else None, args.cpu_smoke, only,
                   args.work.resolve() if args.work else None, args.keep_work,
                   args.install_target.resolve() if args.install_target else None)
    print(f"[gpu-check] {report['summary']} in {report['seconds']} s -> {args.out / 'gpu-check.json'}")
    return 0 if report["summary"]["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
