"""The pure-torch hash-grid reference against closed-form expectations (tiny-cuda-nn semantics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from citygen.errors import CitygenError
from citygen.fields.hash_encoding import (
    HashEncoding,
    HashGridConfig,
    grid_levels,
    n_params,
)


def test_level_table_by_hand():
    # base 16, per-level scale 2: scales 15, 31, 63, 127 -> resolutions 16, 32, 64, 128.
    # Table 2^15 = 32768: 16^3 = 4096 and 32^3 = 32768 fit (dense), 64^3 and 128^3 are hashed.
    cfg = HashGridConfig(n_levels=4, n_features_per_level=2, log2_hashmap_size=15, base_resolution=16,
                         per_level_scale=2.0)
    levels = grid_levels(cfg)
    assert [lv.scale for lv in levels] == [15.0, 31.0, 63.0, 127.0]
    assert [lv.resolution for lv in levels] == [16, 32, 64, 128]
    assert [lv.size for lv in levels] == [4096, 32768, 32768, 32768]
    assert [lv.offset for lv in levels] == [0, 4096, 36864, 69632]
    assert [lv.dense for lv in levels] == [True, True, False, False]
    assert n_params(cfg) == (69632 + 32768) * 2


def test_level_size_rounds_up_to_multiple_of_8():
    # base 3, scale 1: resolution 3, 27 vertices -> 32 entries (tcnn aligns to 8).
    cfg = HashGridConfig(n_levels=2, n_features_per_level=4, log2_hashmap_size=19, base_resolution=3,
                         per_level_scale=1.0)
    levels = grid_levels(cfg)
    assert [(lv.resolution, lv.size, lv.offset) for lv in levels] == [(3, 32, 0), (3, 32, 32)]
    assert HashEncoding(cfg, backend="torch").params.numel() == 64 * 4


def test_default_config_resolutions_follow_geometric_growth():
    cfg = HashGridConfig()
    for level, lv in enumerate(grid_levels(cfg)):
        scale = 16 * cfg.per_level_scale**level - 1
        assert lv.scale == pytest.approx(scale, rel=1e-6)
        assert lv.resolution == math.ceil(scale) + 1
        assert lv.size == min(-(-lv.resolution**3 // 8) * 8, 2**19)


def test_config_tcnn_round_trip_and_max_resolution():
    cfg = HashGridConfig.from_max_resolution(2048, n_levels=16, base_resolution=16, log2_hashmap_size=21)
    assert cfg.per_level_scale == pytest.approx((2048 / 16) ** (1 / 15))
    d = cfg.to_tcnn()
    assert d["otype"] == "HashGrid" and d["log2_hashmap_size"] == 21 and d["n_levels"] == 16
    assert HashGridConfig.from_tcnn(d) == cfg
    with pytest.raises(CitygenError, match="n_features_per_level"):
        HashGridConfig(n_features_per_level=3)
    with pytest.raises(CitygenError, match="interpolation"):
        HashGridConfig.from_tcnn({"otype": "HashGrid", "interpolation": "Smoothstep"})


def test_dense_level_interpolates_linear_function_exactly():
    # One dense level with resolution R: vertex (i, j, k) holds f(i, j, k) = a.(i, j, k) + d, so the
    # trilinear interpolation at pos = x * (R - 1) + 0.5 is exactly f(pos).
    R = 16
    cfg = HashGridConfig(n_levels=1, n_features_per_level=2, log2_hashmap_size=16, base_resolution=R,
                         per_level_scale=1.0)
    enc = HashEncoding(cfg, backend="torch")
    i, j, k = torch.meshgrid(torch.arange(R), torch.arange(R), torch.arange(R), indexing="ij")
    f0 = 0.5 * i + 2.0 * j - 1.0 * k + 3.0
    f1 = -1.5 * i + 0.25 * k
    table = torch.zeros(enc.levels[0].size, 2)
    flat = (i + j * R + k * R * R).flatten()  # dense index: x fastest
    table[flat, 0] = f0.flatten().float()
    table[flat, 1] = f1.flatten().float()
    enc.params.data.copy_(table.flatten())

    g = torch.Generator().manual_seed(0)
    x = torch.rand(500, 3, generator=g) * 0.9  # keep cell + 1 <= R - 1 (no border wrap)
    x[0] = 0.0
    pos = x.double() * (R - 1) + 0.5
    expected = torch.stack([0.5 * pos[:, 0] + 2 * pos[:, 1] - pos[:, 2] + 3,
                            -1.5 * pos[:, 0] + 0.25 * pos[:, 2]], dim=1)
    torch.testing.assert_close(enc(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_hashed_vertex_index_by_hand():
    # One hashed level: resolution 64, table 1024.  Vertex (5, 7, 9) hashes to
    # (5 ^ (7 * 2654435761 mod 2^32) ^ (9 * 805459861 mod 2^32)) mod 1024
    # = (5 ^ 1401181143 ^ 2954171453) mod 1024 = (5 ^ 983 ^ 61) = 1007.
    cfg = HashGridConfig(n_levels=1, n_features_per_level=2, log2_hashmap_size=10, base_resolution=64,
                         per_level_scale=1.0)
    enc = HashEncoding(cfg, backend="torch")
    assert not enc.levels[0].dense and enc.levels[0].size == 1024
    # pos = x * 63 + 0.5 = (5.25, 7.25, 9.25): corner 0 is (5, 7, 9) with weight 0.75^3.
    x = torch.tensor([[4.75 / 63, 6.75 / 63, 8.75 / 63]], dtype=torch.float32)
    y = enc(x)
    y[0, 0].backward()
    grad = enc.params.grad.view(-1, 2)
    assert grad[1007, 0].item() == pytest.approx(0.75**3, abs=1e-5)
    assert grad[:, 1].abs().sum().item() == 0.0
    assert grad[:, 0].sum().item() == pytest.approx(1.0, abs=1e-5)  # weights sum to one

    # With only that entry set, the output is the corner's weight times its features.
    enc.params.data.zero_()
    enc.params.data.view(-1, 2)[1007] = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(enc(x)[0], torch.tensor([0.75**3, 2 * 0.75**3]), rtol=0, atol=1e-5)


def test_dense_index_wraps_at_upper_border_like_tcnn():
    # Resolution 16 (scale 15, table 4096): x = 1 gives pos = 15.5, so the +1 corners lie at
    # vertex 16, outside the grid.  tcnn keeps the stride index and takes it modulo the table:
    # (16, 16, 16) -> (16 + 16 * 16 + 16 * 256) % 4096 = 272; the other seven corners land on
    # 4095, 0, 15, 16, 255, 256 and 271.  Each corner has weight 1/8.
    cfg = HashGridConfig(n_levels=1, n_features_per_level=1, log2_hashmap_size=12, base_resolution=16,
                         per_level_scale=1.0)
    enc = HashEncoding(cfg, backend="torch")
    assert enc.levels[0].dense and enc.levels[0].size == 4096
    enc.params.data.zero_()
    enc.params.data[272] = 1.0
    y = enc(torch.ones(1, 3))
    assert y.item() == pytest.approx(1 / 8)
    y.backward()
    hit = torch.nonzero(enc.params.grad).flatten().tolist()
    assert hit == [0, 15, 16, 255, 256, 271, 272, 4095]
    torch.testing.assert_close(enc.params.grad[hit], torch.full((8,), 1 / 8))

def test_output_layout_is_level_major():
    # Two dense levels filled with constants: level l's features read (l + 1) * (1, 10).
    cfg = HashGridConfig(n_levels=2, n_features_per_level=2, log2_hashmap_size=16, base_resolution=4,
                         per_level_scale=2.0)
    enc = HashEncoding(cfg, backend="torch")
    params = torch.empty(n_params(cfg))
    for level, lv in enumerate(enc.levels):
        block = params[lv.offset * 2:(lv.offset + lv.size) * 2].view(-1, 2)
        block[:] = torch.tensor([1.0, 10.0]) * (level + 1)
    enc.params.data.copy_(params)
    y = enc(torch.rand(7, 3))
    torch.testing.assert_close(y, torch.tensor([1.0, 10.0, 2.0, 20.0]).expand(7, 4))


def test_input_gradient_is_scale_times_slope():
    # Dense level with f = 2 * i (x axis only): d out / d x = 2 * scale.
    R = 8
    cfg = HashGridConfig(n_levels=1, n_features_per_level=1, log2_hashmap_size=12, base_resolution=R,
                         per_level_scale=1.0)
    enc = HashEncoding(cfg, backend="torch")
    i = torch.arange(R**3) % R
    enc.params.data[: R**3] = 2.0 * i.float()
    x = (torch.rand(20, 3) * 0.8).requires_grad_()
    enc(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([2.0 * (R - 1), 0.0, 0.0]).expand(20, 3))


def test_initialization_and_bad_input():
    enc = HashEncoding(HashGridConfig(n_levels=2, log2_hashmap_size=12), backend="torch", init_scale=1e-4)
    assert enc.params.dtype == torch.float32
    assert enc.params.abs().max().item() <= 1e-4 and enc.params.std().item() > 1e-5
    assert enc.n_output_dims == 4 and enc.backend == "torch"
    with pytest.raises(CitygenError, match="shape"):
        enc(torch.rand(5, 2))
    with pytest.raises(CitygenError, match="unknown backend"):
        HashEncoding(HashGridConfig(), backend="opengl")


def test_tcnn_backend_missing_is_a_clear_error():
    try:
        import tinycudann  # noqa: F401
    except ImportError:
        with pytest.raises(CitygenError, match="tiny-cuda-nn"):
            HashEncoding(HashGridConfig(n_levels=2, log2_hashmap_size=12), backend="tcnn")
    else:
        pytest.skip("tinycudann is installed here; the GPU parity tests cover it")


def _encode_by_hand(x: list[float], params: list[float], cfg: HashGridConfig) -> list[float]:
    """tiny-cuda-nn's HashGrid for one point, written out corner by corner: the level scale
    exp2f(l * log2f(b)) * base - 1 and pos = fmaf(x, scale, 0.5) in float32 as tcnn computes them,
    dense levels indexed i + j R + k R^2 and hashed ones by i ^ j * 2654435761 ^ k * 805459861
    (uint32), both modulo the level's size, trilinear weights and sums in float64.  Independent
    of hash_grid_encode_torch (only the offsets come from grid_levels, whose table
    test_level_table_by_hand checks by hand)."""
    f32 = np.float32
    F = cfg.n_features_per_level
    out = []
    for level, lv in enumerate(grid_levels(cfg)):
        scale = f32(f32(2.0 ** float(f32(level) * f32(math.log2(cfg.per_level_scale)))) * f32(cfg.base_resolution) - f32(1))
        R = math.ceil(scale) + 1
        dense = R**3 <= lv.size
        pos = [float(f32(float(f32(xi)) * float(scale) + 0.5)) for xi in x]
        cell = [math.floor(p) for p in pos]
        frac = [p - c for p, c in zip(pos, cell)]
        acc = [0.0] * F
        for corner in range(8):
            v = [cell[d] + ((corner >> d) & 1) for d in range(3)]
            w = math.prod(frac[d] if (corner >> d) & 1 else 1.0 - frac[d] for d in range(3))
            if dense:
                index = (v[0] + v[1] * R + v[2] * R * R) % lv.size
            else:
                index = (v[0] ^ ((v[1] * 2654435761) & 0xFFFFFFFF) ^ ((v[2] * 805459861) & 0xFFFFFFFF)) % lv.size
            for f in range(F):
                acc[f] += w * params[(lv.offset + index) * F + f]
        out.extend(acc)
    return out


@pytest.mark.parametrize("features", [1, 2, 4])
def test_torch_backend_matches_a_hand_written_lookup(features):
    # Two dense and two hashed levels (resolutions 4, 10, 25, 63; table 2^10), random table.
    cfg = HashGridConfig(n_levels=4, n_features_per_level=features, log2_hashmap_size=10, base_resolution=4,
                         per_level_scale=2.5)
    enc = HashEncoding(cfg, backend="torch", init_scale=1.0)
    assert [lv.dense for lv in enc.levels] == [True, True, False, False]
    g = torch.Generator().manual_seed(features)
    x = torch.cat([torch.rand(40, 3, generator=g), torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 0.0, 1.0]])])
    params = enc.params.detach().double().tolist()
    expected = torch.tensor([_encode_by_hand(p, params, cfg) for p in x.double().tolist()], dtype=torch.float64)
    # float32 weights and sums against float64: a few ulps of features of size ~1
    torch.testing.assert_close(enc(x).double(), expected, rtol=0, atol=2e-6)


def test_bench_encode_cli_writes_json(tmp_path, capsys):
    import json

    from citygen.cli import entrypoint

    out = tmp_path / "bench.json"
    assert entrypoint(["bench", "encode", "--n-points", "512", "--repeats", "1", "--device", "cpu",
                       "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(out.read_text())
    assert printed == written
    assert written["n_points"] == 512 and written["config"]["log2_hashmap_size"] == 19
    by_name = {r["backend"]: r for r in written["results"]}
    assert by_name["torch"]["available"] and by_name["torch"]["speedup_vs_torch"] == 1.0
    assert by_name["torch"]["points_per_s"] > 0
    assert {"cuda_ext", "tcnn", "nerfstudio-torch"} <= set(by_name)
    assert entrypoint(["bench", "encode", "--device", "tpu"]) == 2
