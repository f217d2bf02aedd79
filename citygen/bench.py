"""Throughput benchmarks behind ``citygen bench``: numbers as JSON, never timed tests.

``bench_encode`` times one training step's worth of hash-grid work (forward, then backward to
the parameters) for every backend available in this process, on the same points and the same
parameters, and reports points per second with the torch reference as 1.0x.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict

import torch

from .errors import CitygenError
from .fields.hash_encoding import HashEncoding, HashGridConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_fwd_bwd(encode: Callable[[torch.Tensor], torch.Tensor], params: list[torch.Tensor], x: torch.Tensor,
                  repeats: int, warmup: int) -> list[float]:
    """Seconds per forward + backward (to the parameters), one entry per timed repeat."""
    grad_out = None
    times = []
    for step in range(warmup + repeats):
        for p in params:
            p.grad = None
        _sync(x.device)
        start = time.perf_counter()
        y = encode(x)
        if grad_out is None:
            grad_out = torch.ones_like(y) / y.shape[1]
        y.backward(grad_out)
        _sync(x.device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nerfstudio_encoder(config: HashGridConfig, device: torch.device):
    """nerfstudio's pure-torch HashEncoding with the same grid shape, or None when absent."""
    try:
        from nerfstudio.field_components.encodings import HashEncoding as NsHashEncoding
    except Exception:  # noqa: BLE001 -- optional peer; any import failure means "not here"
        return None
    max_res = round(config.base_resolution * config.per_level_scale ** (config.n_levels - 1))
    enc = NsHashEncoding(num_levels=config.n_levels, min_res=config.base_resolution, max_res=max_res,
                         log2_hashmap_size=config.log2_hashmap_size,
                         features_per_level=config.n_features_per_level, implementation="torch")
    return enc.to(device)


def bench_encode(n_points: int = 2**16, config: HashGridConfig | None = None, repeats: int = 5,
                 warmup: int = 1, device: str = "auto", seed: int = 0) -> dict:
    """Forward + backward throughput of every available hash-grid backend.

    Args:
        n_points: points per step.
        config: grid shape (default: 16 levels x 2 features, 2^19 table, base 16).
        repeats: timed steps per backend (the median is reported).
        warmup: untimed steps first (JIT builds, allocator warm-up).
        device: "cpu", "cuda" or "auto" (cuda when available).
        seed: seed of the points and parameters.

    Returns:
        A JSON-ready dict: machine, config, and one result per backend with points/s and the
        speed-up over the torch reference.
    """
    config = config or HashGridConfig()
    if device == "cuda" and not torch.cuda.is_available():
        raise CitygenError(None, "bench: --device cuda, but torch sees no CUDA device here")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    torch.manual_seed(seed)
    x = torch.rand(n_points, 3, device=dev)
    reference = HashEncoding(config, backend="torch").to(dev)

    candidates: list[tuple[str, torch.nn.Module | None, str]] = [("torch", reference, "")]
    for backend in ("cuda_ext", "tcnn"):
        try:
            enc = HashEncoding(config, backend=backend).to(dev)
            enc.load_state_dict(reference.state_dict())
            candidates.append((backend, enc, ""))
        except Exception as err:  # noqa: BLE001 -- a missing backend is reported, not fatal
            candidates.append((backend, None, str(err)))
    ns = _nerfstudio_encoder(config, dev)
    candidates.append(("nerfstudio-torch", ns, "" if ns is not None else "nerfstudio is not installed"))

    results = []
    base_rate = None
    for name, enc, why in candidates:
        if enc is None:
            results.append({"backend": name, "available": False, "reason": why})
            continue
        try:
            times = _time_fwd_bwd(enc, list(enc.parameters()), x, repeats, warmup)
        except Exception as err:  # noqa: BLE001 -- e.g. tcnn on a CPU tensor
            results.append({"backend": name, "available": False, "reason": f"{type(err).__name__}: {err}"})
            continue
        median = statistics.median(times)
        rate = n_points / median
        if name == "torch":
            base_rate = rate
        results.append({"backend": name, "available": True, "seconds_median": round(median, 5),
                        "seconds_min": round(min(times), 5), "points_per_s": round(rate),
                        "speedup_vs_torch": round(rate / base_rate, 2) if base_rate else None})

    return {
        "benchmark": "encode",
        "what": "hash-grid forward + backward to the parameters, points per second",
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "n_points": n_points,
        "repeats": repeats,
        "config": asdict(config),
        "results": results,
    }


def bench_encode_sweep(sizes: list[int], **kwargs) -> dict:
    """:func:`bench_encode` at each of ``sizes`` points (same grid, backends and seed): how
    throughput grows with the batch until the device is full.  ``kwargs`` go to ``bench_encode``.

    Returns the first run's machine and config fields, and ``sweep``: per size, its results.
    """
    if not sizes:
        raise CitygenError(None, "bench: the sweep needs at least one size")
    runs = [bench_encode(n_points=n, **kwargs) for n in sizes]
    out = {k: v for k, v in runs[0].items() if k not in ("n_points", "results")}
    out["sweep"] = [{"n_points": r["n_points"], "results": r["results"]} for r in runs]
    return out
