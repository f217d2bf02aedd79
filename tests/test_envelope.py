"""The baked envelope and narrow-band rendering (citygen.render.envelope): the shells of an
analytic radial density against its level sets in closed form, the native march with per-pixel
intervals against the torch reference restricted to the same intervals, the narrow band against
the unrestricted reference, the stored size budget, and the envelope file."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_realtime import look_at, make_field, psnr

from citygen.errors import CitygenError
from citygen.render import render_image
from citygen.render.envelope import (
    Envelope,
    Shell,
    bake_envelope,
    bake_field_envelope,
    envelope_path,
    load_envelope,
    save_envelope,
)
from citygen.render.realtime import (
    RealtimeRenderer,
    RealtimeSampling,
    pack_field,
)
from survey_io import Camera

pytest.importorskip("open3d", reason="the envelope is baked and ray-cast with open3d (the mesh extra)")

# A radial density: A / (1 + exp((r - R0) / W)) around CENTRE, so the level s lies at the radius
# R0 + W log(A / s - 1) (closed form).
CENTRE = np.array([0.5, -0.25, 1.0])
A, R0, W = 60.0, 3.0, 0.4
BOX = np.array([[-7.0, -7.0, -6.0], [7.0, 7.0, 8.0]])


def radial(x: torch.Tensor) -> torch.Tensor:
    r = (x.double() - torch.as_tensor(CENTRE)).norm(dim=-1)
    return (A / (1.0 + torch.exp((r - R0) / W))).float()


def level_radius(sigma: float) -> float:
    return R0 + W * math.log(A / sigma - 1.0)


def directions(n: int, seed: int = 0) -> np.ndarray:
    d = np.random.default_rng(seed).normal(size=(n, 3))
    return d / np.linalg.norm(d, axis=1, keepdims=True)


@pytest.mark.parametrize("budget", [10_000_000, 20_000])
def test_envelope_brackets_the_level_sets_of_an_analytic_density(budget):
    """Rays from outside towards the centre: the outer shell is met no closer to the centre than
    the outer level's sphere (it contains every point above that level) and within a few voxels
    of it; the inner shell lies at its level's sphere within a voxel and a half (lattice and
    decimation error); so the surface (any level between) lies inside the band.  Decimated to a
    small budget the stored shells fit it and the bracket still holds."""
    step = 0.25
    env = bake_envelope(radial, BOX, step, budget)
    assert env.nbytes <= budget
    r_outer, r_inner = level_radius(env.sigma_outer), level_radius(env.sigma_inner)
    assert r_inner < r_outer - 4 * step, "the two levels should be well apart on this soft density"
    u = directions(400)
    dist = 20.0
    origins = CENTRE + dist * u
    band = env.bands(torch.from_numpy(origins).float(), torch.from_numpy(-u).float()).double().numpy()
    assert np.isfinite(band).all(), "every ray towards the centre meets both shells"
    hit_outer = dist - band[:, 0]
    # The band ends `margin` metres inside the (thick) inner ball: the inner entry is t_out - margin.
    hit_inner = dist - (band[:, 1] - env.margin)
    assert hit_outer.min() >= r_outer - 1e-3, (hit_outer.min(), r_outer)
    assert hit_outer.max() <= r_outer + 3 * step, (hit_outer.max(), r_outer)
    assert np.abs(hit_inner - r_inner).max() <= 1.5 * step, (hit_inner.min(), hit_inner.max(), r_inner)
    # Rays that pass beside the ball get no samples at all (background only).
    miss = env.bands(torch.tensor([[8.0, 8.0, 5.5]]), torch.tensor([[0.0, 0.0, -1.0]]))
    assert math.isinf(float(miss[0, 0]))
    # A camera inside the outer shell starts its band at once.
    inside = env.bands(torch.from_numpy(CENTRE[None] + [[0.0, 0.0, r_outer - 0.5]]).float(),
                       torch.tensor([[0.0, 0.0, 1.0]]))
    assert float(inside[0, 0]) == 0.0


@pytest.mark.parametrize("eye", [(0.0, -14.0, 12.0), (9.0, 7.0, 14.0)])
def test_narrow_band_render_against_the_reference(realtime_cpu, eye):
    """With the envelope baked from the field, the narrow band (default sampling) against the
    unrestricted torch reference: >= 35 dB (the real-time parity bar) with no more field
    evaluations than without the band; the envelope within 10 % of the packed block's bytes."""
    field, rc = make_field()
    packed = pack_field(field, rc)
    env = bake_field_envelope(field, rc.step_size, packed.nbytes)
    assert 0 < env.nbytes <= 0.1 * packed.nbytes
    camera = Camera(width=24, height=18, fl_x=22.0, fl_y=22.0, cx=12.0, cy=9.0)
    c2w = look_at(eye)
    ref = render_image(field, camera, c2w, render=rc)
    plain = RealtimeRenderer(field, rc, backend="native").render(camera, c2w)
    banded = RealtimeRenderer(field, rc, backend="native", envelope=env).render(camera, c2w)
    assert psnr(banded["rgb"], ref["rgb"]) >= 35.0
    assert int(banded["n_samples"].sum()) <= int(plain["n_samples"].sum())


def test_envelope_file_round_trip_and_bad_file(tmp_path):
    env = bake_envelope(radial, BOX, 0.5, 50_000)
    path = envelope_path(tmp_path / "block_a.safetensors")
    assert path.name == "block_a.envelope.safetensors"
    save_envelope(path, env)
    back = load_envelope(path)
    assert np.array_equal(back.outer.vertices, env.outer.vertices)
    assert np.array_equal(back.inner.triangles, env.inner.triangles)
    assert (back.sigma_inner, back.margin) == (env.sigma_inner, env.margin)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CitygenError, match="bad.safetensors.*not a block envelope"):
        load_envelope(tmp_path / "bad.safetensors")


def test_bench_narrow_band_reports(realtime_cpu, tmp_path):
    """`citygen bench render --narrow-band`'s figures on a small field: samples per pixel with and
    without the band, PSNR against the reference (>= 35 dB) and, on a survey's held-out views,
    against their ground-truth images, envelope bytes within 10 % of the packed block, bake time,
    and the H100 roofline estimate at both resolutions (labelled an estimate)."""
    from boxscene import make_box_survey

    from citygen.bench_render import bench_narrow_band

    field, rc = make_field()
    survey = make_box_survey(tmp_path / "boxes", n_train=2, n_test=1, width=24, height=18)
    picture = tmp_path / "band.png"
    out = bench_narrow_band(field, rc, torch.device("cpu"), (24, 18), 2, 10.0, RealtimeSampling(), survey=survey,
                            picture=picture)
    assert out["available"] and 0 < out["envelope_fraction"] <= 0.1 and out["bake_s"] > 0
    fly, views = out["view_sets"]["fly_path"], out["view_sets"]["survey_views"]
    assert len(fly["views"]) == 2 and len(views["views"]) == 1
    assert fly["psnr_vs_reference_db_narrow_band_worst"] >= 35.0
    row = views["views"][0]
    assert set(row["psnr_vs_ground_truth_db"]) == {"reference", "realtime", "narrow_band"}
    assert out["samples_per_pixel_narrow_band_mean"] <= out["samples_per_pixel_mean"]
    for res in ("1920x1080", "3840x2160"):
        est = out["roofline_h100"][res]["narrow_band"]
        assert "ESTIMATE" in est["label"] and est["resolution"] == res
    # Four times the pixels, a quarter of the frame rate (same samples per pixel).
    assert out["roofline_h100"]["1920x1080"]["narrow_band"]["fps_tensor_core_mlp"] == pytest.approx(
        4 * out["roofline_h100"]["3840x2160"]["narrow_band"]["fps_tensor_core_mlp"])
    # The picture: a row per view set (the fly path's first frame on top, 14 px of labels), its
    # left panel the torch reference render of that frame.
    from PIL import Image

    from citygen.bench_render import fly_path, pinhole
    from citygen.images import rgb_to_uint8
    from citygen.render import render_image

    img = np.asarray(Image.open(picture).convert("RGB"))
    assert img.shape == (2 * (18 + 14), 3 * 24, 3) and [p.name for p in tmp_path.iterdir() if "band" in p.name] == [
        "band.png"]
    ref = render_image(field, pinhole(24, 18), fly_path(field.aabb.detach().numpy(), 2, 10.0)[0], render=rc)
    assert np.abs(img[14:32, :24].astype(int) - rgb_to_uint8(ref["rgb"]).astype(int)).max() <= 1


def test_bench_render_survey_needs_narrow_band():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "citygen.cli", "bench", "render", "--survey", "x.json"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert "--survey" in result.stderr and "--narrow-band" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "citygen.cli", "bench", "render", "--picture", "x.png"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert "--picture" in result.stderr and "--narrow-band" in result.stderr and "Traceback" not in result.stderr


def _box_shell(lo, hi) -> Shell:
    """A closed axis-aligned box, triangles counter-clockwise seen from outside (open3d's box)."""
    import open3d as o3d

    mesh = o3d.geometry.TriangleMesh.create_box(*(np.asarray(hi, float) - np.asarray(lo, float)))
    v = np.asarray(mesh.vertices) + np.asarray(lo, float)
    f = np.asarray(mesh.triangles, dtype=np.int32)
    return Shell(v.astype(np.float32), f, np.zeros((len(v), 3), np.uint8))


def _with(shell: Shell, v: np.ndarray, f: np.ndarray) -> Shell:
    """``shell`` plus the open triangles (v, f)."""
    n = len(shell.vertices)
    return Shell(np.concatenate([shell.vertices, v.astype(np.float32)]), np.concatenate([shell.triangles, f + n]),
                 np.zeros((n + len(v), 3), np.uint8))


def test_inner_rule_never_cuts_before_the_opaque_depth():
    """The band's end from the inner shell: along +x from x = -5 through an outer box x in [0, 10]
    and an inner box x in [4, 6] (margin 1 m) the band is t in [5, 10] in closed form (outer entry;
    inner entry 9 + the margin).
    Open triangles a decimated shell can leave must not end it earlier: a lone triangle facing the
    ray (an entry with no exit) counts no depth, and a lone triangle facing away in front of the
    real inner box (an exit with no entry) does not make the ray start inside; in both cases the
    band then runs to the outer exit (10) or the real box's entry + margin, never earlier."""
    outer = _box_shell([0, -1, -1], [10, 1, 1])
    inner = _box_shell([4, -0.5, -0.5], [6, 0.5, 0.5])
    o, d = torch.tensor([[-5.0, 0.1, 0.05]]), torch.tensor([[1.0, 0.0, 0.0]])   # t = x + 5

    def band(inner_shell: Shell) -> list[float]:
        env = Envelope(outer, inner_shell, sigma_outer=0.1, sigma_inner=1.0, margin=1.0, voxel=0.1)
        return env.bands(o, d)[0].tolist()

    # one triangle in the plane x = 2; (0, 1, 2) faces +x (the ray leaves through it), (0, 2, 1) faces the ray
    tri = np.array([[2.0, -0.5, -0.5], [2.0, 0.5, -0.5], [2.0, 0.0, 0.5]])
    leaving, entering = np.array([[0, 1, 2]], np.int32), np.array([[0, 2, 1]], np.int32)
    empty = Shell(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32), np.zeros((0, 3), np.uint8))
    assert band(inner) == pytest.approx([5.0, 10.0])                     # inner entry at t = 9, + margin
    assert band(_with(inner, tri, entering)) == pytest.approx([5.0, 10.0])
    assert band(_with(inner, tri, leaving)) == pytest.approx([5.0, 10.0])
    assert band(_with(empty, tri, entering)) == pytest.approx([5.0, 15.0])  # no exit: the outer exit ends it


def test_bench_scores_a_distorted_survey_camera_as_its_pinhole_part(realtime_cpu, tmp_path):
    """A held-out camera with lens distortion (caliterra's OPENCV k1) is scored through its
    pinhole part: same size and intrinsics, no distortion, so the native kernels render it (the
    torch fallback would count no samples) and the reference renders the same rays."""
    import json

    from boxscene import make_box_survey

    from citygen.bench_render import bench_narrow_band, survey_views

    path = make_box_survey(tmp_path / "boxes", n_train=2, n_test=1, width=24, height=18)
    data = json.loads(path.read_text())
    data.update(camera_model="OPENCV", k1=-0.02, p1=0.001)
    path.write_text(json.dumps(data))
    (name, cam, _, _), = survey_views(path, 1, 1)
    assert not cam.has_distortion and (cam.width, cam.height, cam.fl_x, cam.fl_y, cam.cx, cam.cy) == (
        24, 18, data["fl_x"], data["fl_y"], data["cx"], data["cy"])
    field, rc = make_field()
    out = bench_narrow_band(field, rc, torch.device("cpu"), (24, 18), 1, 10.0, RealtimeSampling(), survey=path)
    row = out["view_sets"]["survey_views"]["views"][0]
    assert row["samples_per_pixel"] > 0 and row["psnr_vs_reference_db"] >= 35.0
