"""Narrow-band marching: per-pixel [t_in, t_out] bounds in the native real-time march (CPU and
CUDA builds, one math header) against the torch reference restricted to the same intervals.
No envelope here (and no open3d): the intervals are random, of every kind, so these run on the
GPU check's machine too (citygen/gpu_check.py); the envelope that makes them lives in
tests/test_envelope.py."""

from __future__ import annotations

import pytest
import torch
from test_realtime import look_at, make_field, psnr

from citygen.render import camera_rays, render_rays
from citygen.render.realtime import FrameState, RealtimeSampling, camera_vector, finish, march, pack_field
from survey_io import Camera


def random_bands(n: int, seed: int) -> torch.Tensor:
    """Intervals of every kind: ordinary, empty (t_in > t_out), a miss (+inf), open-ended."""
    g = torch.Generator().manual_seed(seed)
    t_in = torch.rand(n, generator=g) * 20.0
    t_out = t_in + torch.rand(n, generator=g) * 8.0 - 1.0
    kind = torch.randint(0, 6, (n,), generator=g)
    t_in = torch.where(kind == 0, torch.tensor(float("inf")), t_in)
    t_in = torch.where(kind == 1, torch.tensor(float("-inf")), t_in)
    t_out = torch.where(kind == 2, torch.tensor(float("inf")), t_out)
    return torch.stack([t_in, t_out], 1).contiguous()


@pytest.mark.parametrize("eye", [(0.0, -14.0, 12.0), (9.0, 7.0, 14.0)])
def test_interval_march_matches_reference_restricted_to_the_same_intervals(realtime_cpu, eye):
    """Per-pixel (t_in, t_out) in the native march = the torch reference evaluating only the
    samples inside the same intervals: the same sample count (up to samples on an interval's end,
    rays built in float64 there and float32 here) and the same image; and a miss marches nothing."""
    field, rc = make_field()
    camera = Camera(width=24, height=18, fl_x=22.0, fl_y=22.0, cx=12.0, cy=9.0)
    c2w = look_at(eye)
    packed = pack_field(field, rc, sampling=RealtimeSampling.reference())
    code = field.appearance.weight[0]
    packed.set_appearance(code)
    band = random_bands(camera.width * camera.height, seed=3)
    state = FrameState(camera.width * camera.height, packed.n_classes, torch.device("cpu"))
    cam = camera_vector(camera, c2w)
    march(realtime_cpu, state, packed, cam, camera.width, (0, 0, camera.width, camera.height), band)
    out = finish(realtime_cpu, state, packed, cam, camera)
    origins, dirs, z_scale = camera_rays(camera, c2w)
    with torch.no_grad():
        ref = render_rays(field, origins, dirs, code, step_size=rc.step_size, occupancy=field.occupancy,
                          z_scale=z_scale, min_transmittance=rc.min_transmittance, band=band)
        full = render_rays(field, origins, dirs, code, step_size=rc.step_size, occupancy=field.occupancy,
                           z_scale=z_scale, min_transmittance=rc.min_transmittance)
    n_out, n_ref = int(out["n_samples"].sum()), int(ref["n_samples"])
    assert n_ref < 0.8 * int(full["n_samples"]), "the intervals should cut a good part of the samples"
    assert n_ref > 0 and abs(n_out - n_ref) <= max(2, 0.01 * n_ref), (n_out, n_ref)
    assert psnr(out["rgb"].reshape(-1, 3), ref["rgb"]) > 45
    missed = torch.isinf(band[:, 0]) & (band[:, 0] > 0) | (band[:, 0] > band[:, 1])
    assert int(out["n_samples"].reshape(-1)[missed].sum()) == 0
    assert torch.allclose(out["acc"].reshape(-1)[missed], torch.zeros(int(missed.sum())))
    assert psnr(out["rgb"].reshape(-1, 3), full["rgb"]) < 40, "the test intervals should change the image"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA real-time kernel runs on GPUs only")
def test_cuda_interval_march_matches_cpu_build(realtime_cpu):
    """The CUDA build's per-pixel intervals against the CPU build's (same math header): only the
    float16 weights and table separate them."""
    from citygen.render.realtime import native_module

    cuda = native_module("cuda")
    if cuda is None:
        from cuda_ext import realtime as rt_ext
        pytest.fail(f"a CUDA device is present but the real-time CUDA build failed: {rt_ext.unavailable_reason()}")
    field, rc = make_field()
    camera = Camera(width=24, height=18, fl_x=22.0, fl_y=22.0, cx=12.0, cy=9.0)
    cam = camera_vector(camera, look_at((9.0, 7.0, 14.0)))
    band = random_bands(camera.width * camera.height, seed=5)
    packed = pack_field(field, rc, sampling=RealtimeSampling.reference())
    out = {}
    for device, module in (("cpu", realtime_cpu), ("cuda", cuda)):
        block = packed.to(device)
        state = FrameState(camera.width * camera.height, packed.n_classes, torch.device(device))
        march(module, state, block, cam, camera.width, (0, 0, camera.width, camera.height), band.to(device))
        out[device] = {k: v.cpu() for k, v in finish(module, state, block, cam, camera).items()}
    assert psnr(out["cuda"]["rgb"], out["cpu"]["rgb"]) >= 35.0
    n_cpu, n_gpu = float(out["cpu"]["n_samples"].float().sum()), float(out["cuda"]["n_samples"].float().sum())
    assert n_cpu > 0 and abs(n_gpu - n_cpu) <= 0.05 * n_cpu
