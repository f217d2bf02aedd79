"""Checkpoints: one safetensors file (model, occupancy grid, optimizer state, RNG state) plus a
JSON sidecar (config, georef, AABB scale/offset, step, classes, image names, RNG states,
optimizer hyper-parameters).  Both are written atomically, the tensors first, so a sidecar
always names a complete tensor file; the sidecar records the tensor file's size so that a
truncated file is caught before it is parsed.  Never pickle.

Layout of ``<run>/checkpoints/``: ``step_0001000.safetensors`` + ``step_0001000.json``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from survey_io.atomic import atomic_path, atomic_write_json

from ..errors import CitygenError

FORMAT = "citygen-checkpoint/1"
#: a run folder's checkpoint folder.
CHECKPOINTS_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d+)\.json$")


def checkpoint_paths(directory: Path, step: int) -> tuple[Path, Path]:
    stem = f"step_{step:07d}"
    return directory / f"{stem}.safetensors", directory / f"{stem}.json"


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """Flatten an optimizer's state into named tensors and its param groups into JSON."""
    sd = optimizer.state_dict()
    tensors = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"optim.{pid}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    for g in groups:
        g["betas"] = list(g["betas"]) if "betas" in g else None
    return tensors, groups


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], groups: list[dict],
                      source: Path) -> None:
    """Load state written by :func:`optimizer_tensors` into ``optimizer``."""
    state: dict[int, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    sd = optimizer.state_dict()
    if len(groups) != len(sd["param_groups"]):
        raise CitygenError(source, f"optimizer has {len(sd['param_groups'])} parameter groups, checkpoint {len(groups)}")
    for g_now, g_saved in zip(sd["param_groups"], groups):
        if g_now["params"] != g_saved["params"]:
            raise CitygenError(source, "optimizer parameter layout differs from the checkpoint's")
        g_now.update({k: (tuple(v) if k == "betas" else v) for k, v in g_saved.items() if k != "params"})
    sd["state"] = state
    optimizer.load_state_dict(sd)


def save_checkpoint(directory: Path, step: int, tensors: dict[str, Tensor], meta: dict[str, Any],
                    keep: int = 3) -> Path:
    """Write ``step_<step>`` (tensors + sidecar) into ``directory``; keep the newest ``keep``.

    Returns the sidecar path.
    """
    directory.mkdir(parents=True, exist_ok=True)
    st_path, json_path = checkpoint_paths(directory, step)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(st_path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    meta = {**meta, "format": FORMAT, "step": step, "tensors_file": st_path.name,
            "tensors_bytes": st_path.stat().st_size}
    atomic_write_json(json_path, meta)
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        for p in checkpoint_paths(directory, old):
            p.unlink(missing_ok=True)
    return json_path


def list_checkpoints(directory: Path) -> list[int]:
    """Steps of the checkpoints in ``directory``, ascending."""
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := _NAME.match(p.name)))


def resolve_checkpoint(path: Path) -> Path:
    """The sidecar of a checkpoint given as a sidecar, a tensor file, a checkpoints folder or a run folder."""
    path = Path(path)
    if path.suffix == ".json":
        return path
    if path.suffix == ".safetensors":
        return path.with_suffix(".json")
    for directory in (path / CHECKPOINTS_DIR, path):
        steps = list_checkpoints(directory)
        if steps:
            return checkpoint_paths(directory, steps[-1])[1]
    raise CitygenError(path, "no checkpoint found (expected checkpoints/step_*.json)")


def read_sidecar(json_path: Path) -> dict[str, Any]:
    """The checked JSON sidecar of a checkpoint, without its tensors.

    Raises:
        CitygenError naming the sidecar when it is missing, not JSON, not a citygen sidecar, or
        lacks (or has malformed) the fields every reader relies on: config, aabb, classes, step.
    """
    json_path = Path(json_path)
    try:
        meta = json.loads(json_path.read_text())
    except FileNotFoundError:
        raise CitygenError(json_path, "checkpoint sidecar not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CitygenError(json_path, f"checkpoint sidecar is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "tensors_file" not in meta:
        raise CitygenError(json_path, f"not a citygen checkpoint sidecar (expected format {FORMAT!r})")
    missing = [k for k in ("config", "aabb", "classes", "step") if k not in meta]
    if missing:
        raise CitygenError(json_path, f"checkpoint sidecar lacks {missing}")
    if not isinstance(meta["config"], dict):
        raise CitygenError(json_path, "checkpoint sidecar 'config' must be an object")
    try:
        aabb = np.asarray(meta["aabb"], dtype=np.float64)
    except (TypeError, ValueError):
        aabb = np.zeros(0)
    if aabb.shape != (2, 3) or not np.all(np.isfinite(aabb)) or np.any(aabb[1] <= aabb[0]):
        raise CitygenError(json_path, f"checkpoint sidecar 'aabb' must be finite [[min xyz], [max xyz]] with "
                                      f"max > min, got {str(meta['aabb'])[:80]}")
    if not isinstance(meta["classes"], list) or not all(isinstance(c, str) for c in meta["classes"]):
        raise CitygenError(json_path, "checkpoint sidecar 'classes' must be a list of names")
    if isinstance(meta["step"], bool) or not isinstance(meta["step"], int) or meta["step"] < 0:
        raise CitygenError(json_path, f"checkpoint sidecar 'step' must be an integer >= 0, got {meta['step']!r}")
    return meta


def check_finite(tensors: dict[str, Tensor], source: Path) -> None:
    """Refuse NaN or inf in any floating-point tensor: a diverged run's weights render nothing
    (an all-nodata export), and resuming from them cannot recover."""
    for name, t in tensors.items():
        if t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise CitygenError(source, f"tensor {name!r} has {bad} NaN or inf value(s) of {t.numel()}: "
                                           "the run diverged; use an earlier checkpoint")


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint (see :func:`resolve_checkpoint` for ``path``): (tensors, sidecar meta).

    Raises:
        CitygenError naming the file when the sidecar or the tensor file is missing, truncated
        or corrupt, or a tensor holds NaN or inf.
    """
    json_path = resolve_checkpoint(path)
    meta = read_sidecar(json_path)
    st_path = json_path.parent / Path(str(meta["tensors_file"])).name
    if not st_path.is_file():
        raise CitygenError(st_path, "checkpoint tensor file not found")
    size = st_path.stat().st_size
    if size != meta.get("tensors_bytes", size):
        raise CitygenError(st_path, f"checkpoint tensor file is truncated or corrupt ({size} bytes, "
                                    f"the sidecar says {meta['tensors_bytes']})")
    try:
        tensors = load_file(str(st_path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CitygenError(st_path, f"checkpoint tensor file is corrupt ({err})") from None
    check_finite(tensors, st_path)
    return tensors, meta


def load_module_state(module: torch.nn.Module, state: dict[str, Tensor], source: Path, prefix: str = "model.",
                      config_note: str = "its sidecar's config") -> None:
    """``module.load_state_dict(state)``, refusing a checkpoint whose tensors do not fit the module
    built from ``config_note`` with one line naming the first tensor that differs (torch's own
    error spans many lines and names no file)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        which = f"lacks {prefix}{missing[0]}" if missing else f"has an unexpected tensor {prefix}{unexpected[0]}"
        raise CitygenError(source, f"checkpoint does not fit {config_note}: it {which}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CitygenError(source, f"checkpoint does not fit {config_note}: tensor {prefix}{k} has shape "
                                       f"{tuple(state[k].shape)}, the config gives {tuple(v.shape)}")
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise CitygenError(source, f"checkpoint does not fit {config_note} ({str(err).splitlines()[0]})") from None
