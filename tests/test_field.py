"""The field: SH encoding against closed forms, normalisation, per-ray colour conditioning,
the test-view appearance rule."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from citygen.config import FieldConfig
from citygen.errors import CitygenError
from citygen.fields import CityField, sh_encode

SMALL = FieldConfig(n_levels=4, log2_hashmap_size=12, max_resolution=64, backend="torch")


@pytest.mark.parametrize("degree", [1, 2, 3, 4, 5])
def test_sh_on_the_pole_is_the_legendre_normalisation(degree):
    # On +z every m != 0 term vanishes and Y_l0(pole) = sqrt((2l + 1) / (4 pi)) (P_l(1) = 1).
    out = sh_encode(torch.tensor([[0.0, 0.0, 1.0]]), degree)[0].double()
    assert out.shape == (degree ** 2,)
    for l in range(degree):
        band = out[l * l:(l + 1) * (l + 1)]
        expected = torch.zeros(2 * l + 1, dtype=torch.float64)
        expected[l] = math.sqrt((2 * l + 1) / (4 * math.pi))
        torch.testing.assert_close(band, expected, atol=1e-6, rtol=0)


def test_sh_degree2_closed_form():
    # Real SH l = 1 (tcnn sign convention): -c y, c z, -c x with c = sqrt(3 / (4 pi)).
    d = torch.nn.functional.normalize(torch.tensor([[0.3, -0.5, 0.8]]), dim=-1)
    c = math.sqrt(3 / (4 * math.pi))
    x, y, z = d[0].tolist()
    torch.testing.assert_close(sh_encode(d, 2)[0, 1:], torch.tensor([-c * y, c * z, -c * x]), atol=1e-6, rtol=0)


def test_sh_basis_is_orthonormal_on_the_sphere():
    # Fibonacci sphere: near-uniform points, so 4 pi * mean(Y_i Y_j) approximates the integral.
    n = 20000
    k = np.arange(n) + 0.5
    z = 1 - 2 * k / n
    phi = np.pi * (1 + 5 ** 0.5) * k
    r = np.sqrt(1 - z * z)
    dirs = torch.tensor(np.stack([r * np.cos(phi), r * np.sin(phi), z], -1), dtype=torch.float32)
    y = sh_encode(dirs, 5).double()
    gram = 4 * math.pi * (y.T @ y) / n
    torch.testing.assert_close(gram, torch.eye(25, dtype=torch.float64), atol=5e-3, rtol=0)


def test_sh_rejects_bad_degree():
    with pytest.raises(CitygenError):
        sh_encode(torch.zeros(1, 3), 6)


def make_field(n_images=3, aabb=((-10.0, -20.0, 0.0), (30.0, 20.0, 8.0))):
    torch.manual_seed(0)
    cams = torch.tensor([[0.0, 0.0, 50.0], [20.0, 0.0, 50.0], [0.0, 15.0, 45.0]])[:n_images]
    return CityField(SMALL, torch.tensor(aabb), n_images, 7, cams)


def test_cube_normalization_scales_every_axis_by_the_longest_side():
    f = make_field()  # 40 x 40 x 8 m box
    corners = torch.tensor([[-10.0, -20.0, 0.0], [30.0, 20.0, 8.0], [10.0, 0.0, 4.0]])
    torch.testing.assert_close(f.normalize(corners), torch.tensor([[0.0, 0, 0], [1, 1, 0.2], [0.5, 0.5, 0.1]]))


def test_per_axis_normalization_maps_the_aabb_to_the_unit_cube():
    torch.manual_seed(0)
    f = CityField(dataclasses.replace(SMALL, normalization="per_axis"), torch.tensor(((-10.0, -20.0, 0.0), (30.0, 20.0, 8.0))),
                  3, 7)
    corners = torch.tensor([[-10.0, -20.0, 0.0], [30.0, 20.0, 8.0], [10.0, 0.0, 4.0]])
    torch.testing.assert_close(f.normalize(corners), torch.tensor([[0.0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5]]))


def test_unknown_normalization_is_a_clear_error():
    with pytest.raises(CitygenError, match="normalization"):
        CityField(dataclasses.replace(SMALL, normalization="sphere"), torch.tensor(((0.0, 0, 0), (1.0, 1, 1))), 1, 2)


def test_outputs_shapes_and_ranges():
    f = make_field()
    x = torch.rand(100, 3) * torch.tensor([40.0, 40.0, 8.0]) + torch.tensor([-10.0, -20.0, 0.0])
    d = torch.nn.functional.normalize(torch.randn(100, 3), dim=-1)
    out = f(x, d, f.appearance_codes(torch.zeros(100, dtype=torch.long)))
    assert out["sigma"].shape == (100,) and bool((out["sigma"] > 0).all())
    assert out["rgb"].shape == (100, 3) and bool(((out["rgb"] >= 0) & (out["rgb"] <= 1)).all())
    assert out["semantics"].shape == (100, 7)


def test_per_ray_conditioning_equals_per_sample():
    f = make_field()
    rays_d = torch.nn.functional.normalize(torch.randn(5, 3), dim=-1)
    codes = torch.randn(5, SMALL.appearance_dim)
    ray_index = torch.tensor([0, 0, 1, 3, 3, 3, 4, 2])
    x = torch.rand(8, 3) * 5
    packed = f(x, rays_d, codes, ray_index=ray_index)
    expanded = f(x, rays_d[ray_index], codes[ray_index])
    torch.testing.assert_close(packed["rgb"], expanded["rgb"])


def test_test_view_appearance_is_the_nearest_training_camera():
    f = make_field()
    code = f.appearance_for_position(torch.tensor([19.0, 1.0, 48.0]))
    torch.testing.assert_close(code, f.appearance.weight[1])


def test_bad_aabb_is_refused():
    with pytest.raises(CitygenError):
        make_field(aabb=((0.0, 0.0, 0.0), (1.0, -1.0, 1.0)))
