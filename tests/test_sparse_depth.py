"""Sparse depth supervision from SfM points (the `drone` preset): the targets against a hand
projection, the loss against its closed form, and the default-preset rule."""

import math

import numpy as np
import pytest
import torch

from citygen.config import choose_preset, load_config
from citygen.partition.ground import BOX_POINT_MAX_ERROR_PX
from citygen.train.data import load_sparse_depth
from citygen.train.losses import ground_opacity_loss, sparse_depth_loss
from survey_io import Camera, Georef, Survey, SurveyImage
from survey_io.ingest import heldout_point_mask

pycolmap = pytest.importorskip("pycolmap")

W, H, F, K1 = 80, 60, 70.0, 0.04


def _nadir(x, y, z, yaw):
    """OpenCV camera-to-world looking straight down, turned ``yaw`` about the vertical."""
    c, s = math.cos(yaw), math.sin(yaw)
    rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    m = np.eye(4)
    m[:3, :3] = rz @ np.diag([1.0, -1.0, -1.0])
    m[:3, 3] = (x, y, z)
    return m


def _hand_projection(c2w, p):
    """Pixel (SIMPLE_RADIAL, COLMAP's convention) and z-depth of world point ``p``, written out."""
    r, t = c2w[:3, :3], c2w[:3, 3]
    xc = r.T @ (p - t)
    x, y = xc[0] / xc[2], xc[1] / xc[2]
    d = 1 + K1 * (x * x + y * y)
    return np.array([F * x * d + W / 2, F * y * d + H / 2]), xc[2]


def _model(root, poses, points, errors, track_of):
    """A COLMAP model in root/sparse/0: one SIMPLE_RADIAL camera, images at ``poses``, points with
    their reprojection ``errors``, each observed (hand-projected keypoint) by the images in
    ``track_of[k]``."""
    rec = pycolmap.Reconstruction()
    cam = pycolmap.Camera.create_from_model_name(1, "SIMPLE_RADIAL", F, W, H)
    cam.params = [F, W / 2, H / 2, K1]
    rec.add_camera_with_trivial_rig(cam)
    keypoints = {i: [] for i in range(len(poses))}
    for k, images in enumerate(track_of):
        for i in images:
            keypoints[i].append(k)
    idx = {}
    for i, c2w in enumerate(poses):
        w2c = np.linalg.inv(c2w)
        xy = [_hand_projection(c2w, points[k])[0] for k in keypoints[i]]
        image = pycolmap.Image(name=f"{i:03d}.jpg", keypoints=np.array(xy, dtype=np.float64).reshape(-1, 2),
                               camera_id=1, image_id=i + 1)
        rec.add_image_with_trivial_frame(image, pycolmap.Rigid3d(pycolmap.Rotation3d(w2c[:3, :3]), w2c[:3, 3].copy()))
        for j, k in enumerate(keypoints[i]):
            idx[(i, k)] = j
    for k, images in enumerate(track_of):
        track = pycolmap.Track()
        for i in images:
            track.add_element(i + 1, idx[(i, k)])
        pid = rec.add_point3D(points[k], track, np.zeros(3, np.uint8))
        rec.points3D[pid].error = errors[k]
    folder = root / "sparse" / "0"
    folder.mkdir(parents=True)
    rec.write_text(str(folder))


def test_sparse_depth_targets_match_a_hand_projection(tmp_path):
    rng = np.random.default_rng(3)
    poses = [_nadir(-4, 0, 40, 0.0), _nadir(4, 1, 42, 0.7), _nadir(0, -3, 39, -1.2)]
    n = 60
    points = np.column_stack([rng.uniform(-8, 8, n), rng.uniform(-6, 6, n), rng.uniform(-1, 5, n)])
    errors = rng.uniform(0.2, 1.5, n)
    errors[5] = BOX_POINT_MAX_ERROR_PX + 1  # too weak: left out
    track_of = [[0, 1, 2] for _ in range(n)]
    track_of[7] = [0, 1]                     # a two-view point: left out
    _model(tmp_path, poses, points, errors, track_of)
    cam = Camera(W, H, F, F, W / 2, H / 2, "SIMPLE_RADIAL", k1=K1)
    images = [SurveyImage(f"{i:03d}.jpg", 0, p) for i, p in enumerate(poses)]
    survey = Survey(tmp_path, [cam], images, Georef("EPSG:32633", (500000.0, 4500000.0, 0.0)))
    train = images[:2]                       # the third image is not trained on: none of its keypoints
    for downscale in (1, 2):
        cams = [cam.scaled(1.0 / downscale) if downscale > 1 else cam for _ in train]
        offsets = torch.tensor([0, cams[0].width * cams[0].height, 2 * cams[0].width * cams[0].height])
        sd = load_sparse_depth(survey, train, cams, offsets, downscale)
        # pycolmap numbers the points 1..n in the order added; the hashed tenth is the evaluation's
        used = [k for k in range(n) if k not in (5, 7) and not heldout_point_mask(np.array([k + 1]))[0]]
        mean_err = errors[[k for k in range(n) if k not in (5, 7) and
                           not heldout_point_mask(np.array([k + 1]))[0]]].mean()
        expect = []
        for i in range(2):
            for k in used:
                xy, z = _hand_projection(poses[i], points[k])
                col, row = int(xy[0] // downscale), int(xy[1] // downscale)
                if 0 <= col < cams[0].width and 0 <= row < cams[0].height:
                    expect.append((int(offsets[i]) + row * cams[0].width + col, z,
                                   2 * math.exp(-(errors[k] / mean_err) ** 2)))
        assert len(expect) > 50 and len(sd) == len(expect)
        got = sorted(zip(sd.pixel.tolist(), sd.depth.tolist(), sd.weight.tolist()))
        for (p, z, w), (gp, gz, gw) in zip(sorted(expect), got):
            assert gp == p and gz == pytest.approx(z, rel=1e-6) and gw == pytest.approx(w, rel=1e-5)


def test_no_model_no_sparse_depth(tmp_path):
    cam = Camera(W, H, F, F, W / 2, H / 2, "PINHOLE")
    im = SurveyImage("000.jpg", 0, _nadir(0, 0, 40, 0))
    survey = Survey(tmp_path, [cam], [im], Georef("EPSG:32633", (500000.0, 4500000.0, 0.0)))
    assert load_sparse_depth(survey, [im], [cam], torch.tensor([0, W * H])) is None


def test_sparse_depth_loss_closed_form():
    d = torch.tensor([1.0, 2.0, 3.0])
    t = torch.tensor([1.0, 4.0, 0.0])
    w = torch.tensor([1.0, 2.0, 0.5])
    # (1*0 + 2*2 + 0.5*3) / (3.5 * 2)
    assert float(sparse_depth_loss(d, t, w, 2.0)) == pytest.approx(5.5 / 7.0, rel=1e-6)
    g = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    sparse_depth_loss(g, t, w, 2.0).backward()
    assert g.grad.tolist() == pytest.approx([0.0, -2 / 7, 0.5 / 7])  # sign(d - t) w / (sum w * unit); sign(0) = 0


def test_ground_opacity_loss_closed_form():
    assert float(ground_opacity_loss(torch.tensor([1.0, 0.5, 0.0, 0.9]))) == pytest.approx((0 + 0.5 + 1 + 0.1) / 4)


def test_default_preset_rule():
    assert choose_preset(None, True)[0] == "tiny"
    assert choose_preset(None, False)[0] == "drone"
    assert choose_preset("block", False) == ("block", "given with --preset")
    cfg = load_config("drone")
    assert cfg.preset == "drone" and cfg.optim.sparse_depth_weight > 0 and cfg.sparse_depth_fraction > 0
    assert 0 < cfg.max_seconds <= 600
