"""Render-time sample reduction of the real-time renderer (citygen.render.realtime_sampling):
the fine occupancy level in closed form on the analytic box scene (tests/boxscene.py), the
native two-level lookup and march against the torch reference marching the same fine grid, and
parity of the reduced default sampling against the reference renderer on a field distilled from
the box scene (soft surfaces and fog, like a briefly trained field)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch
from boxscene import BOXES, GROUND_COLORS
from test_realtime import look_at, make_field, psnr

from citygen.config import FieldConfig, RenderConfig
from citygen.fields import CityField
from citygen.render import OccupancyGrid, camera_rays, render_image, render_rays
from citygen.render.realtime import RealtimeRenderer, RealtimeSampling, occupancy_bits, pack_field
from citygen.render.realtime_sampling import (
    bake_fine_occupancy,
    fine_bits,
    fine_factors,
    fine_grid_as_occupancy,
    sigma_threshold,
)
from citygen.render.streaming import load_packed, save_packed
from survey_io import Camera

# The box scene's solids (BOXES and the ground below z = 0) inside this grid box; every face of
# a solid lies on the fine lattices used below (1 m in x, y; 0.5 or 1 m in z).
BOX = torch.tensor([[-16.0, -16.0, -4.0], [16.0, 16.0, 12.0]])
R = 8  # coarse cells of 4 x 4 x 2 m


def solid(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Strictly inside a box or below the ground, and the solid's colour, at points (N, 3)."""
    inside = x[:, 2] < 0
    rgb = torch.tensor(GROUND_COLORS[0]).expand(len(x), 3).clone()
    for lo, hi, color, _ in BOXES:
        b = ((x > torch.tensor(lo)) & (x < torch.tensor(hi))).all(-1)
        inside |= b
        rgb[b] = torch.tensor(color)
    return inside, rgb


def solid_overlap(cell_lo: np.ndarray, cell_hi: np.ndarray) -> np.ndarray:
    """Closed form: does each box [cell_lo, cell_hi] (N, 3) overlap a solid with positive volume?"""
    out = cell_lo[:, 2] < 0.0
    for lo, hi, _, _ in BOXES:
        out |= np.all((cell_lo < np.asarray(hi)) & (cell_hi > np.asarray(lo)), axis=1)
    return out


def coarse_grid(seed: int = 0) -> OccupancyGrid:
    """The scene's grid with every coarse cell occupied except a random fifth (the fine level
    must stay empty there whatever the density)."""
    grid = OccupancyGrid(BOX, R)
    g = torch.Generator().manual_seed(seed)
    grid.occupied.copy_(torch.rand(grid.n_cells, generator=g) > 0.2)
    return grid


def expected_fine(grid: OccupancyGrid, factors: tuple[int, int, int]) -> np.ndarray:
    """(R^3, B) closed-form fine occupancy: coarse cell occupied and fine cell overlapping a solid."""
    lo, size = BOX[0].numpy().astype(np.float64), (BOX[1] - BOX[0]).numpy() / R
    fine = np.asarray(factors)
    rows = []
    for c in range(R ** 3):
        ijk = np.array([c // (R * R), (c // R) % R, c % R])
        local = np.array(list(itertools.product(*[range(f) for f in factors])))       # (B, 3), brick order
        cell_lo = lo + (ijk + local / fine) * size
        rows.append(solid_overlap(cell_lo, cell_lo + size / fine) & bool(grid.occupied[c]))
    return np.stack(rows)


@pytest.mark.parametrize("step,rule,factors", [(0.5, (4, 1.0), (4, 4, 4)), (0.75, (4, 1.0), (4, 4, 2)),
                                               (2.0, (), (8, 8, 4)), (0.75, (), (8, 8, 8))])
def test_fine_occupancy_bake_closed_form(step, rule, factors):
    """Baked from the scene's density, the fine level marks exactly the fine cells that overlap
    a solid, inside occupied coarse cells; factors keep a fine cell at least ``min_steps`` steps
    long (one step, at most 4 a side: the rule before session 8; the default a quarter step, at
    most 8 a side; the grid's 4 x 4 x 2 m cells)."""
    grid = coarse_grid()
    assert fine_factors(grid, step, *rule) == factors
    fine = bake_fine_occupancy(lambda x: solid(x)[0].float() * 50.0, grid, factors, sigma_threshold(0.01, step))
    expected = expected_fine(grid, factors)
    assert 0.05 < expected.mean() < 0.5, "the scene should be partly solid"
    assert np.array_equal(fine.numpy(), expected)


def test_fine_factors_keep_the_bit_budget():
    """Over the budget the largest factor is halved down to, never below, the one-step rule's:
    the 8^3 grid of 4 x 4 x 2 m cells at a 0.5 m step wants 8 x 8 x 8 at a quarter step, 4 x 4 x 4
    at one step."""
    grid = coarse_grid()
    cells = R ** 3
    assert fine_factors(grid, 0.5, budget_bits=cells * 512) == (8, 8, 8)
    assert fine_factors(grid, 0.5, budget_bits=cells * 256) == (4, 8, 8)
    assert fine_factors(grid, 0.5, budget_bits=cells * 128) == (4, 4, 8)
    assert fine_factors(grid, 0.5, budget_bits=1) == (4, 4, 4) == fine_factors(grid, 0.5, 4, 1.0)


@pytest.mark.parametrize("factors", [(4, 4, 2), (8, 8, 4)])
def test_two_level_lookup_closed_form(realtime_cpu, factors):
    """The kernel's lookup (coarse bitfield, then the cell's fine brick) at random points equals
    the closed form: the point's fine cell overlaps a solid and its coarse cell is occupied
    (bricks of 32 and of 256 cells)."""
    grid = coarse_grid(seed=1)
    fine = bake_fine_occupancy(lambda x: solid(x)[0].float() * 50.0, grid, factors, 1.0)
    bits = torch.cat([occupancy_bits(grid.occupied), fine_bits(fine)])
    geom_f = torch.cat([BOX.reshape(-1)] * 3 + [torch.tensor([1.0, 0.75, -9.0]), BOX[1] - BOX[0]]).float()
    geom_i = torch.tensor([R, 1, 1, 2, *factors], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    x = BOX[0] - 1 + torch.rand(20000, 3, generator=g) * (BOX[1] - BOX[0] + 2)   # some outside the box
    got = realtime_cpu.occupancy_query(x.contiguous(), bits, geom_f, geom_i).numpy()
    xn = x.double().numpy()
    size = (BOX[1] - BOX[0]).double().numpy() / (R * np.asarray(factors))
    idx = np.floor((xn - BOX[0].double().numpy()) / size)
    inside = np.all((xn >= BOX[0].numpy()) & (xn <= BOX[1].numpy()), axis=1)
    cell_lo = BOX[0].double().numpy() + idx * size
    coarse = np.clip(np.floor((xn - BOX[0].double().numpy()) / ((BOX[1] - BOX[0]).double().numpy() / R)), 0, R - 1)
    coarse_occ = grid.occupied.numpy()[((coarse[:, 0] * R + coarse[:, 1]) * R + coarse[:, 2]).astype(int)]
    expected = inside & coarse_occ & solid_overlap(cell_lo, cell_lo + size)
    assert 0.05 < expected.mean() < 0.5
    assert np.array_equal(got, expected)
    # Without the fine level the same bits answer for the coarse cells alone.
    coarse_only = realtime_cpu.occupancy_query(x.contiguous(), bits, geom_f,
                                             torch.tensor([R, 1, 1, 2, 1, 1, 1], dtype=torch.int32)).numpy()
    assert np.array_equal(coarse_only, inside & coarse_occ)


@pytest.mark.parametrize("factors", [(4, 4, 4), (8, 8, 8)])
def test_march_evaluates_exactly_the_fine_occupied_samples(realtime_cpu, factors):
    """With termination off, the native march (jumping empty coarse and fine cells) evaluates
    the same samples as the torch reference marching a dense grid of the fine cells, and
    renders the same image; fewer than with the coarse grid alone."""
    field, _ = make_field(seed=1)
    rc = RenderConfig(step_size=0.25, min_transmittance=0.0)
    aabb = field.aabb
    grid = OccupancyGrid(aabb, 8)          # 2 x 2 x 1 m cells over the test field's box
    grid.occupied.fill_(True)
    # A density with structure inside coarse cells: a ball and a slab.
    density = lambda x: (((x - torch.tensor([2.0, -1.0, 1.5])).norm(dim=-1) < 3.3) | (x[:, 2] < -0.8)).float() * 9.0
    fine = bake_fine_occupancy(density, grid, factors, 1.0)
    field.occupancy = grid
    packed = pack_field(field, rc, sampling=RealtimeSampling.reference())
    packed = replace(packed, occ_bits=torch.cat([packed.occ_bits, fine_bits(fine)]),
                     geom_i=torch.cat([packed.geom_i[:4], torch.tensor(factors, dtype=torch.int32)]))
    camera = Camera(width=16, height=12, fl_x=15.0, fl_y=15.0, cx=8.0, cy=6.0)
    c2w = look_at((3.0, -13.0, 11.0))
    renderer = RealtimeRenderer(field, rc, backend="native", sampling=RealtimeSampling.reference())
    renderer._packed = packed
    code = field.appearance.weight[0]
    out = renderer.render(camera, c2w, appearance=code)
    origins, dirs, z_scale = camera_rays(camera, c2w)
    dense = fine_grid_as_occupancy(grid, fine, factors)
    with torch.no_grad():
        ref = render_rays(field, origins, dirs, code, step_size=rc.step_size, occupancy=dense, z_scale=z_scale,
                          min_transmittance=0.0)
        coarse = render_rays(field, origins, dirs, code, step_size=rc.step_size, occupancy=grid,
                             min_transmittance=0.0)
    n_out, n_ref = int(out["n_samples"].sum()), int(ref["n_samples"])
    assert n_ref < 0.6 * int(coarse["n_samples"]), "the fine level should skip much of the coarse cells"
    # Equal up to samples on a fine cell face (rays built in float32 here, float64 then rounded there).
    assert n_ref > 0 and abs(n_out - n_ref) <= max(2, 0.005 * n_ref), (n_out, n_ref)
    assert psnr(out["rgb"].reshape(-1, 3), ref["rgb"]) > 45


def distilled_box_field(steps: int = 150, step: float = 0.5) -> tuple[CityField, RenderConfig]:
    """A small CityField fitted for a few seconds to the box scene's opacity and colours at
    random points: soft surfaces and some fog, as a briefly trained field has."""
    torch.manual_seed(0)
    cfg = FieldConfig(n_levels=8, log2_hashmap_size=12, base_resolution=4, max_resolution=64, hidden_dim=32,
                      geo_feat_dim=15, appearance_dim=8, semantic_hidden_dim=32)
    field = CityField(cfg, BOX, 1, 7, torch.tensor([[0.0, -20.0, 20.0]]))
    opt = torch.optim.Adam(field.parameters(), lr=2e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = BOX[0] + torch.rand(2048, 3, generator=g) * (BOX[1] - BOX[0])
        d = torch.nn.functional.normalize(torch.randn(2048, 3, generator=g), dim=-1)
        inside, rgb = solid(x)
        out = field(x, d, field.appearance.weight[0].expand(2048, -1), with_semantics=False)
        alpha = 1.0 - torch.exp(-out["sigma"] * step)
        loss = ((alpha - inside.float()) ** 2).mean() + ((out["rgb"] - rgb) ** 2)[inside].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    field.eval()
    rc = RenderConfig(step_size=step)
    field.occupancy = OccupancyGrid(BOX, 16)
    with torch.no_grad():
        field.occupancy.update(lambda x: field.density(x)[0], step, alpha_threshold=0.01)
    return field, rc


@pytest.mark.parametrize("eye", [(0.0, -26.0, 22.0), (20.0, 14.0, 18.0)])
def test_default_sampling_parity_on_distilled_field(realtime_cpu, one_thread, eye):
    """The default reduced sampling (fine occupancy, earlier termination) against the torch
    reference renderer: >= 35 dB (the real-time parity bar), with fewer field evaluations than
    the reference's own samples, which the same kernel reproduces exactly, and than the former
    one-step fine cells."""
    field, rc = distilled_box_field()
    assert 0.1 < field.occupancy.occupied_fraction() < 0.9
    camera = Camera(width=32, height=24, fl_x=30.0, fl_y=30.0, cx=16.0, cy=12.0)
    c2w = look_at(eye)
    ref = render_image(field, camera, c2w, render=rc)
    assert float(ref["acc"].mean()) > 0.5, "the view should mostly see the scene"
    full = RealtimeRenderer(field, rc, backend="native", sampling=RealtimeSampling.reference()).render(camera, c2w)
    fast = RealtimeRenderer(field, rc, backend="native").render(camera, c2w)
    assert psnr(full["rgb"], ref["rgb"]) > 60
    assert psnr(fast["rgb"], ref["rgb"]) >= 35.0
    n_full, n_fast = float(full["n_samples"].float().mean()), float(fast["n_samples"].float().mean())
    assert n_fast < 0.85 * n_full, (n_fast, n_full)
    # The quarter-step fine cells (default since session 8) skip more of the empty air in front
    # of the surfaces than the one-step cells of before (measured 0.90 of their samples here, both
    # ~55 dB against the reference).
    one_step = RealtimeRenderer(field, rc, backend="native",
                                sampling=RealtimeSampling(occupancy_factor=4, fine_cell_steps=1.0)).render(camera, c2w)
    assert psnr(one_step["rgb"], ref["rgb"]) >= 35.0
    assert n_fast < 0.95 * float(one_step["n_samples"].float().mean())
    hit = ref["acc"] > 0.99
    assert float((fast["depth"][hit] - ref["depth"][hit]).abs().median()) < rc.step_size


def test_packed_fine_level_round_trips_and_old_files_load(tmp_path):
    """The fine bricks travel in occ_bits through save/load (the streaming cache's files), and a
    block packed before the fine level existed (4 geometry ints) loads without one."""
    field, rc = make_field(seed=0)
    packed = pack_field(field, rc)
    factors = tuple(int(v) for v in packed.geom_i[4:7])
    assert factors == fine_factors(field.occupancy, rc.step_size) and np.prod(factors) > 1
    assert packed.occ_bits.numel() == -(-field.occupancy.n_cells // 32) + -(-field.occupancy.n_cells * np.prod(factors) // 32)
    save_packed(tmp_path / "new.safetensors", packed)
    back = load_packed(tmp_path / "new.safetensors")
    assert torch.equal(back.occ_bits, packed.occ_bits) and torch.equal(back.geom_i, packed.geom_i)
    old = pack_field(field, rc, sampling=RealtimeSampling.reference())
    old_tensors = old.tensors()
    old_tensors["geom_i"] = old_tensors["geom_i"][:4].clone()
    loaded = type(old).from_tensors(old_tensors)
    assert loaded.geom_i.tolist() == [*old.geom_i[:4].tolist(), 1, 1, 1]
