"""The package layers (pyproject.toml's import-linter contracts), the public API of cuda_ext, and
the nerfstudio method's reuse of the trainer's losses, schedules and optimiser settings (checked
without nerfstudio, which is not installable beside the CPU torch)."""

from __future__ import annotations

import ast
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from importlinter import cli as import_linter

import citygen.nerfstudio_plugin as plugin
from citygen.config import OptimConfig, RenderConfig, TrainConfig
from citygen.train import losses, schedule, trainer
from citygen.train.optim import make_optimizer

ROOT = Path(__file__).resolve().parents[1]

CONTRACTS = ["survey-io-alone", "cuda-ext-alone", "cuda-ext-public", "viewer-on-top", "citygen-layers",
             "citygen-acyclic"]


@pytest.mark.parametrize("contract", CONTRACTS)
def test_import_contract_is_kept(contract, capsys):
    """`lint-imports` for one contract of pyproject.toml (the report is printed on failure)."""
    status = import_linter.lint_imports(config_filename=str(ROOT / "pyproject.toml"), limit_to_contracts=(contract,),
                                        no_cache=True, no_logo=True)
    report = capsys.readouterr().out
    assert status == import_linter.EXIT_STATUS_SUCCESS, report


def test_every_contract_is_tested():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    declared = [line.split("=", 1)[1].strip().strip('"') for line in text.splitlines() if line.startswith("id = ")]
    assert sorted(declared) == sorted(CONTRACTS)


def test_cli_starts_without_torch_or_the_viewer():
    """citygen/cli.py imports each subcommand's module lazily (start-up of `citygen --help`)."""
    code = ("import sys, citygen.cli; heavy = sorted(m for m in ('torch', 'rasterio', 'viewer', 'moderngl', "
            "'citygen.train', 'citygen.render', 'cuda_ext') if m in sys.modules); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# -- imports sit at the top of each module (DESIGN.md); a function imports only for a reason ------
PACKAGES = ("citygen", "viewer", "survey_io", "cuda_ext")
#: Optional extras and heavy optional dependencies (setup.py's extras, or not installable beside the
#: CPU torch): a function may import these, top-level name, without saying why.  laspy and shapely
#: are core dependencies now (setup.py), so they are imported at the top like the rest.
OPTIONAL_EXTRAS = frozenset({"glfw", "imageio_ffmpeg", "importlinter", "moderngl", "nerfstudio", "open3d",
                             "pycolmap", "ray", "tinycudann", "torchmetrics"})
#: Modules that defer on purpose throughout: the command line imports each subcommand's module in its
#: function (start-up of `citygen --help`, test above); the GPU check runs before torch is installed.
DEFERRING_MODULES = frozenset({"citygen/cli.py", "citygen/gpu_check.py"})
DEFERRED_MARK = re.compile(r"#\s*deferred:\s*\S")


def unexplained_deferred_imports(source: str, name: str) -> list[str]:
    """``name:line: statement`` for each import inside a function or method body of ``source`` that
    is neither of an optional extra nor explained by a ``# deferred: why`` comment at the end of its
    line or on the line directly above it (or above the run of import lines it opens, no blank line
    between: one comment may explain ``import torch`` / ``import torch.distributed as dist``)."""
    lines = source.splitlines()
    tree = ast.parse(source, name)
    run_start: dict[ast.stmt, ast.stmt] = {}  # each import -> the first import of its run of lines
    for node in ast.walk(tree):
        for _, value in ast.iter_fields(node):
            if not (isinstance(value, list) and value and isinstance(value[0], ast.stmt)):
                continue
            prev = None
            for stmt in value:
                if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    joined = prev is not None and stmt.lineno == prev.end_lineno + 1
                    run_start[stmt] = run_start[prev] if joined else stmt
                    prev = stmt
                else:
                    prev = None
    in_functions = {stmt for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                    for stmt in ast.walk(fn) if isinstance(stmt, (ast.Import, ast.ImportFrom))}
    bad = []
    for stmt in sorted(in_functions, key=lambda s: s.lineno):
        if isinstance(stmt, ast.Import):
            roots = {alias.name.split(".")[0] for alias in stmt.names}
        else:
            roots = {(stmt.module or "").split(".")[0]} if stmt.level == 0 else {""}
        if roots <= OPTIONAL_EXTRAS:
            continue
        own = lines[stmt.lineno - 1:stmt.end_lineno]
        first = run_start[stmt].lineno
        above = lines[first - 2].strip() if first > 1 else ""
        if any(DEFERRED_MARK.search(line) for line in own) or (above.startswith("#") and DEFERRED_MARK.match(above)):
            continue
        bad.append(f"{name}:{stmt.lineno}: {lines[stmt.lineno - 1].strip()}")
    return bad


def test_imports_inside_functions_are_optional_extras_or_say_why():
    bad = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel not in DEFERRING_MODULES:
                bad += unexplained_deferred_imports(path.read_text(encoding="utf-8"), rel)
    assert not bad, ("imports inside functions: move them to the top of the module, or say why on the line "
                     "or just above it with `# deferred: ...` (DESIGN.md):\n" + "\n".join(bad))


def test_the_deferred_import_check_flags_what_it_should():
    source = """import json

def f():
    import ray
    from open3d import core
    import torch  # deferred: a reason
    # deferred: another reason
    import torch
    import torch.distributed as dist

    import numpy
    from . import sibling
    # deferred: a reason

    import rasterio
    # deferred:
    import PIL


class A:
    def method(self):
        from ray import tune, serve
        import ray, torch

        def inner():
            # a comment, not a reason
            from ..fields import CityField
            import tinycudann
"""
    bad = unexplained_deferred_imports(source, "m.py")
    assert [line.split(":")[1] for line in bad] == ["11", "12", "15", "17", "23", "27"], bad


def test_cuda_ext_public_api():
    import cuda_ext
    import cuda_ext.optim

    for name in ("build_dir", "cpu_available", "cpu_isa", "cuda_available", "unavailable_reason"):
        assert callable(getattr(cuda_ext, name)), name
    assert cuda_ext.cpu_isa() in ("avx2", "generic")
    kernel = cuda_ext.optim.sparse_adam_kernel()
    assert kernel is None or callable(kernel)


# -- the nerfstudio method reuses the trainer's pieces -------------------------------------------
def test_nerfstudio_method_calls_the_trainers_loss_and_schedule():
    assert plugin.opacity_entropy is losses.opacity_entropy is trainer.opacity_entropy
    assert plugin.refresh_occupancy is schedule.refresh_occupancy is trainer.refresh_occupancy
    assert trainer.lr_factor is schedule.lr_factor


def test_opacity_entropy_is_the_binary_entropy():
    acc = torch.tensor([0.5, 0.1, 0.0, 1.0])
    h = [math.log(2), -(0.1 * math.log(0.1) + 0.9 * math.log(0.9)), 0.0, 0.0]
    got = float(losses.opacity_entropy(acc))
    # 0 and 1 are clamped 1e-6 inside: each contributes 1e-6 * (1 - ln 1e-6) ~ 1.5e-5
    assert got == pytest.approx(sum(h) / 4, abs=1e-5)


def test_occupancy_schedule():
    r = RenderConfig(occupancy_update_every=16, occupancy_warmup_steps=256, occupancy_cells_per_update=100)
    assert [schedule.occupancy_refresh_cells(d, r) for d in (1, 15, 16, 256, 270, 272)] == \
        [False, False, None, None, False, 100]


def test_nerfstudio_optimizer_settings_are_the_trainers():
    optim = OptimConfig(lr_grid=0.02, lr_mlp=0.005, eps=1e-12, weight_decay_mlp=1e-5)
    want = {"grid": {"lr": 0.02, "eps": 1e-12, "weight_decay": 0.0, "betas": (0.9, 0.99)},
            "mlp": {"lr": 0.005, "eps": 1e-12, "weight_decay": 1e-5, "betas": (0.9, 0.99)}}
    assert plugin.optimizer_settings(optim) == want
    cfg = TrainConfig(optim=optim)
    cfg.field.log2_hashmap_size, cfg.field.n_levels = 10, 2
    field = trainer.build_field(cfg, [[0, 0, 0], [1, 1, 1]], 2, 3, None, torch.device("cpu"))
    groups = {g["name"]: {k: g[k] for k in ("lr", "eps", "weight_decay", "betas")}
              for g in make_optimizer(field, cfg, torch.device("cpu")).param_groups}
    assert groups == want


def _nerfstudio_exponential_decay(step: int, lr_init: float, lr_pre_warmup: float, lr_final: float,
                                  warmup_steps: int, max_steps: int, ramp: str) -> float:
    """nerfstudio 1.1's ExponentialDecayScheduler (ramp "linear"), written out from its source."""
    assert ramp == "linear"
    if step < warmup_steps:
        return lr_pre_warmup + (lr_init - lr_pre_warmup) * step / warmup_steps
    t = min(max((step - warmup_steps) / (max_steps - warmup_steps), 0.0), 1.0)
    return math.exp(math.log(lr_init) * (1 - t) + math.log(lr_final) * t)


def test_nerfstudio_schedule_traces_the_trainers_learning_rate():
    optim = OptimConfig(warmup_steps=100, final_lr_fraction=0.03)
    # the trainer's curve, closed form: 1 % at step 0, full at the warmup's end, 3 % at the last step
    assert [trainer.lr_factor(s, optim, 30000) for s in (0, 100, 30000)] == pytest.approx([0.01, 1.0, 0.03])
    for lr in (1e-2, 3e-3):
        args = plugin.schedule_args(lr, optim, 30000)
        for step in (0, 1, 50, 99, 100, 101, 7000, 29999, 30000):
            want = lr * trainer.lr_factor(step, optim, 30000)
            assert _nerfstudio_exponential_decay(step, lr, **args) == pytest.approx(want, rel=1e-9), (lr, step)
