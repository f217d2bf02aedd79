"""Tiles: compositing blocks (closed-form expectations with constant slab fields), the seam
metric (hand-computed geometry), and a whole tiny synthetic tile trained through the local
executor, rendered, and scored by the CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from citygen.config import RenderConfig
from citygen.partition import Block, Grid, TilePlan
from citygen.render.seams import (
    SeamMetric,
    boundary_distance,
    psnr_from_sse,
    surface_points,
)
from citygen.render.tile import BlockSource, TileRenderer
from survey_io import Camera, Georef

RED, BLUE, GREEN = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 1.0, 0.0)
CLASSES = ("ground", "road", "building")
MARGIN = 2.0


class SlabField(nn.Module):
    """A constant-colour opaque slab ``z <= top`` filling the box, optionally with a tower
    (an opaque box of another colour); what the volume renderer needs of a field."""

    def __init__(self, aabb, color, label, top=1.0, tower=None, background=(0.5, 0.5, 0.5), density=200.0,
                 haze=None):
        super().__init__()
        self.haze = haze  # (z0, z1, density, colour): a semi-transparent layer over the whole box
        self.register_buffer("aabb", torch.tensor(aabb, dtype=torch.float32))
        self.n_classes = len(CLASSES)
        self.color, self.label, self.top, self.tower, self.density = torch.tensor(color), label, top, tower, density
        self.bg = torch.tensor(background)
        self.background_semantics = torch.zeros(self.n_classes)
        self.occupancy = None
        self.calls = 0

    def forward(self, x, dirs, appearance, ray_index=None, with_semantics=True):
        self.calls += 1
        solid = x[:, 2] <= self.top
        rgb = self.color.expand(len(x), 3).clone()
        labels = torch.full((len(x),), self.label)
        if self.tower is not None:
            (x0, y0, _z0), (x1, y1, z1), color = self.tower
            t = (x[:, 0] >= x0) & (x[:, 0] <= x1) & (x[:, 1] >= y0) & (x[:, 1] <= y1) & (x[:, 2] <= z1)
            solid |= t
            rgb[t] = torch.tensor(color)
            labels[t] = 2
        sigma = torch.where(solid, self.density, 0.0)
        if self.haze is not None:
            z0, z1, density, color = self.haze
            h = (x[:, 2] >= z0) & (x[:, 2] <= z1) & ~solid
            sigma = torch.where(h, density, sigma)
            rgb[h] = torch.tensor(color)
        out = {"sigma": sigma, "rgb": rgb}
        if with_semantics:
            out["semantics"] = 5.0 * nn.functional.one_hot(labels, self.n_classes).float()
        return out

    def background(self, dirs):
        return self.bg.expand(len(dirs), 3)


def two_block_plan() -> TilePlan:
    """Two 10 m blocks side by side along x (cores [0,10] and [10,20]), 2 m margin."""
    grid = Grid(origin=(0.0, 0.0), block_size=(10.0, 10.0), rows=1, cols=2)
    blocks = []
    for c in range(2):
        core = grid.core(0, c)
        ext = (core[0] - MARGIN, core[1] - MARGIN, core[2] + MARGIN, core[3] + MARGIN)
        blocks.append(Block(id=f"b_r0_c{c}", row=0, col=c, core=core, extended=ext, z_range=(-1.0, 5.0)))
    return TilePlan(georef=Georef("EPSG:32633", (500000.0, 4500000.0, 0.0)), grid=grid, margin_m=MARGIN, blocks=blocks)


def make_renderer(fields: dict[str, SlabField], **kwargs) -> TileRenderer:
    plan = two_block_plan()
    sources = [BlockSource(b.id, b.core, b.extended, fields[b.id].aabb.numpy().astype(np.float64),
                           (lambda f=fields[b.id]: f)) for b in plan.blocks]
    return TileRenderer(plan, sources, classes=CLASSES,
                        render_config=RenderConfig(step_size=0.05, segment_samples=64, min_transmittance=1e-4),
                        **kwargs)


def slab_fields(**tower) -> dict[str, SlabField]:
    plan = two_block_plan()
    fields = {}
    for b, color, label in zip(plan.blocks, (RED, BLUE), (0, 1)):
        aabb = [[b.extended[0], b.extended[1], -1.0], [b.extended[2], b.extended[3], 5.0]]
        fields[b.id] = SlabField(aabb, color, label, tower=tower.get(b.id),
                                 background=(0.2, 0.3, 0.4) if label == 0 else (0.6, 0.7, 0.8))
    return fields


def smoothstep(u):
    u = np.clip(u, 0, 1)
    return u * u * (3 - 2 * u)


def expected_share_of_left_block(x: np.ndarray) -> np.ndarray:
    """Closed form of the blend rule on the line y = 5 (far from the y edges): the left block's
    weight ramps down over [10, 12], the right one's up over [8, 10]."""
    w_left = smoothstep((12.0 - x) / MARGIN)
    w_right = smoothstep((x - 8.0) / MARGIN)
    return w_left / (w_left + w_right)


def down_rays(xs: np.ndarray, y: float = 5.0, z: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    origins = torch.tensor([[x, y, z] for x in xs], dtype=torch.float32)
    dirs = torch.tensor([[0.0, 0.0, -1.0]] * len(xs))
    return origins, dirs


def test_compositing_matches_the_blend_rule_across_the_overlap():
    renderer = make_renderer(slab_fields())
    xs = np.linspace(-1.0, 21.0, 441)  # 5 cm apart, across both blocks and the overlap [8, 12]
    out = renderer.render_rays(*down_rays(xs))
    rgb, acc, w = out["rgb"].numpy(), out["acc"].numpy(), out["weights"].numpy()
    assert out["rgb"].dtype == torch.float32 and out["semantics"].shape == (len(xs), len(CLASSES))
    assert np.all(acc > 0.999)
    # inside a core, beyond the neighbour's margin: exactly that block's colour
    left, right = xs < 8.0, xs > 12.0
    np.testing.assert_allclose(rgb[left], np.broadcast_to(RED, rgb[left].shape), atol=1e-5)
    np.testing.assert_allclose(rgb[right], np.broadcast_to(BLUE, rgb[right].shape), atol=1e-5)
    # across the overlap: the closed-form blend (equal densities: colour = share-weighted mean)
    share = expected_share_of_left_block(xs)
    np.testing.assert_allclose(rgb[:, 0], share, atol=2e-3)
    np.testing.assert_allclose(rgb[:, 2], 1.0 - share, atol=2e-3)
    # monotone and continuous: red only decreases, by small steps (5 cm apart, 4 m blend)
    assert np.all(np.diff(rgb[:, 0]) <= 1e-6)
    assert np.max(np.abs(np.diff(rgb, axis=0))) < 0.03
    # per-ray block weights: the same shares, summing to 1
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(w[:, 0], share, atol=2e-3)
    # depth and semantics are blended with the same weights: the slab top is 3 m below the origins
    np.testing.assert_allclose(out["distance"].numpy(), 3.0, atol=0.03)
    labels = out["semantics"].argmax(-1).numpy()
    assert np.all(labels[left] == 0) and np.all(labels[right] == 1)
    assert np.all(labels[(xs > 8.0) & (xs < 9.9)] == 0) and np.all(labels[(xs > 10.1) & (xs < 12.0)] == 1)


@pytest.mark.parametrize("blend", ["geometric", "linear"])
def test_a_haze_only_one_block_holds_fades_across_the_overlap_by_the_blend_rule(blend):
    """The left block alone holds a green haze (density 0.8 / m, z 2..3) over its whole box; the
    right block is empty there.  Through the overlap a vertical ray's green is 1 - exp(-sigma L),
    L = 1 m, with the blend's density: the weighted geometric mean of 0.8 and the density floor
    (``density_blend`` geometric: the haze fades out as the empty block's weight grows), or the
    weighted sum 0.8 omega_left (linear)."""
    from citygen.render.tile import DENSITY_FLOOR

    fields = slab_fields()
    fields["b_r0_c0"].haze = (2.0, 3.0, 0.8, GREEN)
    renderer = make_renderer(fields)
    renderer.density_blend = blend
    xs = np.linspace(5.0, 15.0, 201)
    out = renderer.render_rays(*down_rays(xs))
    w = expected_share_of_left_block(xs)
    sigma = 0.8**w * DENSITY_FLOOR ** (1.0 - w) if blend == "geometric" else 0.8 * w
    np.testing.assert_allclose(out["rgb"][:, 1].numpy(), 1.0 - np.exp(-sigma * 1.0), atol=2e-3)
    assert np.all(out["acc"].numpy() > 0.999)  # the slabs below are opaque in both blocks either way
    if blend == "geometric":  # half way across the overlap the haze is all but gone (0.39 -> 0.001)
        assert float(out["rgb"][100, 1]) < 2e-3 and float(out["rgb"][0, 1]) > 0.55


def test_blend_weights_are_a_partition_of_unity():
    renderer = make_renderer(slab_fields())
    g = torch.rand(2000, 3, generator=torch.Generator().manual_seed(0))
    pts = torch.stack([g[:, 0] * 24 - 2, g[:, 1] * 14 - 2, g[:, 2] * 6 - 1], -1)  # inside the union of the boxes
    w = renderer.blend_weights(pts)
    in_grid = (pts[:, 0] >= 0) & (pts[:, 0] <= 20) & (pts[:, 1] >= 0) & (pts[:, 1] <= 10)
    np.testing.assert_allclose(w[in_grid].sum(-1).numpy(), 1.0, atol=1e-6)
    assert bool((w >= 0).all()) and bool((w.sum(-1) <= 1 + 1e-6).all())
    # beyond the grid a lone block fades out over its outer margin: w = S(u_x) S(u_y)
    outer = torch.tensor([[-1.0, 5.0, 0.0], [5.0, -1.5, 0.0], [-0.5, 10.5, 0.0]])
    expected = smoothstep(np.array([0.5, 0.25, 0.75])) * smoothstep(np.array([1.0, 1.0, 0.75]))
    np.testing.assert_allclose(renderer.blend_weights(outer)[:, 0].numpy(), expected, atol=1e-6)
    in_left_core_only = (pts[:, 0] < 8) & (pts[:, 0] > 0) & (pts[:, 1] > 0) & (pts[:, 1] < 10)
    assert torch.equal(w[in_left_core_only, 0], torch.ones(int(in_left_core_only.sum())))
    outside = renderer.blend_weights(torch.tensor([[30.0, 5.0, 0.0], [5.0, 5.0, 7.0]]))
    assert torch.equal(outside, torch.zeros(2, 2))


def test_rays_that_hit_nothing_get_the_background():
    fields = slab_fields()
    renderer = make_renderer(fields)
    origins = torch.tensor([[30.0, 5.0, 4.0], [-6.0, 5.0, 4.0], [5.0, 5.0, 4.0]])
    dirs = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, -1.0], [0.0, 0.0, 1.0]])  # beyond x, beyond x, looking up
    out = renderer.render_rays(origins, dirs)
    assert torch.equal(out["acc"], torch.zeros(3)) and torch.equal(out["weights"], torch.zeros(3, 2))
    # learned backgrounds: of the block whose core is nearest to where the ray leaves the tile
    np.testing.assert_allclose(out["rgb"].numpy(), [[0.6, 0.7, 0.8], [0.2, 0.3, 0.4], [0.2, 0.3, 0.4]], atol=1e-6)
    renderer.background_color = (1.0, 1.0, 0.0)
    np.testing.assert_allclose(renderer.render_rays(origins, dirs)["rgb"].numpy(), [[1.0, 1.0, 0.0]] * 3, atol=1e-6)
    assert renderer.blocks_for_rays(origins[:1], dirs[:1]) == []
    assert renderer.blocks_for_rays(*down_rays(np.array([9.0]))) == ["b_r0_c0", "b_r0_c1"]
    assert renderer.blocks_for_rays(*down_rays(np.array([15.0]))) == ["b_r0_c1"]


def test_occlusion_is_kept_across_the_boundary():
    """A tower in the left core, in front of the right block's ground, hides that ground
    (blending finished per-block pixels would mix the two colours instead)."""
    tower = ((5.0, 3.0, -1.0), (7.0, 7.0, 4.0), GREEN)
    renderer = make_renderer(slab_fields(b_r0_c0=tower))
    d = torch.tensor([[1.0, 0.0, -0.15]])
    d = d / d.norm()
    origin = torch.tensor([[3.0, 5.0, 3.3]])  # reaches the tower's face x = 5 at z = 3.0
    out = renderer.render_rays(origin, d)
    np.testing.assert_allclose(out["rgb"].numpy()[0], GREEN, atol=1e-4)
    assert out["weights"][0, 0] > 0.999
    assert float(out["distance"][0]) == pytest.approx(2.0 / float(d[0, 0]), abs=0.06)


def test_render_view_shapes_depth_and_cache():
    fields = slab_fields()
    renderer = make_renderer(fields, max_cached_blocks=1)
    cam = Camera(width=8, height=6, fl_x=8.0, fl_y=8.0, cx=4.0, cy=3.0)
    c2w = np.eye(4)
    c2w[:3, :3] = np.diag([1.0, -1.0, -1.0])  # looking straight down (OpenCV: z forward = -Z world)
    c2w[:3, 3] = (10.0, 5.0, 4.0)
    view = renderer.render_view(cam, c2w)
    assert view["rgb"].shape == (6, 8, 3) and view["depth"].shape == (6, 8) and view["semantics"].shape == (6, 8, 3)
    np.testing.assert_allclose(view["depth"].numpy(), 3.0, atol=0.06)  # z-depth of a plane, within a step
    assert len(renderer._cache) == 1  # LRU bound kept after a call that needed both blocks
    # a field wrapper is applied to fields as they load; setting it drops what was cached
    seen = []

    def recolor(block_id, field):
        seen.append(block_id)
        return SlabField(field.aabb.tolist(), GREEN, field.label, background=tuple(field.bg.tolist()))

    renderer.field_wrapper = recolor
    assert len(renderer._cache) == 0
    np.testing.assert_allclose(renderer.render_view(cam, c2w)["rgb"].numpy(), np.broadcast_to(GREEN, (6, 8, 3)),
                               atol=1e-4)  # up to the transmittance left at termination
    assert sorted(set(seen)) == ["b_r0_c0", "b_r0_c1"]
    renderer.clear_cache()
    assert len(renderer._cache) == 0


# -- seam metric ----------------------------------------------------------------------------------
def test_boundary_distance_counts_internal_edges_only():
    plan = two_block_plan()
    xy = np.array([[10.0, 5.0], [7.5, 5.0], [13.0, 0.5], [1.0, 9.9], [25.0, 5.0]])
    d = boundary_distance(plan, xy)
    np.testing.assert_allclose(d[:4], [0.0, 2.5, 3.0, 9.0])  # the outer edges y = 0 / y = 10 are no seams
    assert math.isnan(d[4])


def test_seam_metric_pools_squared_errors():
    plan = two_block_plan()
    cam = Camera(width=20, height=2, fl_x=10.0, fl_y=10.0, cx=10.0, cy=1.0)
    c2w = np.eye(4)
    c2w[:3, :3] = np.diag([1.0, -1.0, -1.0])
    c2w[:3, 3] = (10.0, 5.0, 10.0)
    depth = np.full((2, 20), 10.0)  # ground at z = 0: pixel column i sees x = 10 + (i + 0.5 - 10)
    pts = surface_points(cam, c2w, depth)
    np.testing.assert_allclose(pts[0, :, 0], 10.0 + np.arange(20) + 0.5 - 10.0)
    np.testing.assert_allclose(pts[..., 2], 0.0, atol=1e-9)
    gt = np.zeros((2, 20, 3))
    pred = np.zeros((2, 20, 3))
    boundary = np.abs(pts[..., 0] - 10.0) <= MARGIN
    pred[boundary] = 0.1   # error 0.1 near the seam ...
    pred[~boundary] = 0.01  # ... 0.01 inside
    depth[1, 0] = 0.0       # unknown depth: in neither set
    metric = SeamMetric(plan)
    metric.add("v", pred, gt, cam, c2w, depth)
    rep = metric.report()
    assert rep["band_m"] == MARGIN
    assert rep["pixels_boundary"] == int(boundary.sum()) == 8
    assert rep["pixels_interior"] == 40 - 8 - 1
    assert rep["psnr_boundary"] == pytest.approx(20.0) and rep["psnr_interior"] == pytest.approx(40.0)
    assert rep["difference_db"] == pytest.approx(-20.0)
    near = (np.abs(pts[..., 0] - 10.0) > MARGIN) & (np.abs(pts[..., 0] - 10.0) <= 2 * MARGIN)
    assert rep["pixels_interior_near"] == int(near.sum()) == 8
    assert rep["difference_near_db"] == pytest.approx(-20.0)
    assert psnr_from_sse(0.0, 0) != psnr_from_sse(0.0, 0)  # nan for an empty set


# -- a whole tiny tile: plan, train through the executor, render, score ---------------------------
TINY_TRAIN = {"field.n_levels": 6, "field.log2_hashmap_size": 14, "field.max_resolution": 128,
              "field.hidden_dim": 32, "field.semantic_hidden_dim": 32, "field.appearance_dim": 4,
              "render.step_size": 0.8, "render.grid_resolution": 32, "render.occupancy_cells_per_update": 4096,
              "render.chunk_rays": 4096, "optim.warmup_steps": 10, "steps": 60, "rays_per_batch": 512,
              "checkpoint_every": 20, "log_every": 20, "threads": 1}


@pytest.fixture(scope="module")
def tiny_tile(tmp_path_factory):
    from citygen.partition import PartitionConfig, plan_tile
    from citygen.tile import train_tile
    from survey_io.synthetic import PRESETS, make_survey

    root = tmp_path_factory.mktemp("tile")
    cfg = replace(PRESETS["tiny"], area_m=120.0, altitude_m=60.0, width=64, height=48, oblique_headings=(),
                  max_building_height_m=20.0, antialias=False, render_rasters=False)
    survey = make_survey(root / "city", cfg, seed=3, progress=False, workers=1)
    plan = plan_tile(survey, PartitionConfig(blocks=(2, 2), margin_fraction=0.15))
    plan.save(root / "tile" / "plan.json")
    result = train_tile(root / "tile", root / "city" / "transforms.json", "tiny", "local", overrides=TINY_TRAIN,
                        max_parallel=2)
    return root, survey, plan, result


def test_train_tile_trains_every_block(tiny_tile):
    root, survey, plan, result = tiny_tile
    tile = root / "tile"
    assert result.ok and sorted(result.blocks) == sorted(b.id for b in plan.blocks)
    record = json.loads((tile / "tile_config.json").read_text())
    assert record["train"]["steps"] == 60 and record["data"] == str((root / "city" / "transforms.json").resolve())
    cam_z = min(im.c2w[2, 3] for im in survey.images)
    for b in plan.blocks:
        run = tile / f"block_{b.id}"
        # a block spends the 60 x 512 rays in smaller, more steps (its share of the survey's pixels)
        own, rays = record["blocks"][b.id]["steps"], record["blocks"][b.id]["rays_per_batch"]
        assert own > 60 and rays < 512 and abs(own * rays - 60 * 512) <= rays / 2
        assert max(p.name for p in (run / "checkpoints").glob("*.json")) == f"step_{own:07d}.json"
        state = json.loads((run / "state.json").read_text())
        assert state["state"] == "done" and state["last_checkpoint_step"] == own  # progress reported
        box = np.asarray(record["blocks"][b.id]["aabb"])
        np.testing.assert_allclose(box[:, :2], [b.extended[:2], b.extended[2:]])  # the extended rectangle ...
        assert box[1, 2] < cam_z                                                   # ... below the cameras ...
        assert b.z_range[0] <= box[0, 2] < 0.0 and 10.0 < box[1, 2] <= b.z_range[1]  # ... around the ground (z = 0)
        assert box[1, 2] - box[0, 2] < 0.5 * (b.z_range[1] - b.z_range[0])      # ... tightened by the depth maps
        assert record["blocks"][b.id]["box_source"] == "depth"                     # (the first source)
    # finished blocks are skipped when the tile is trained again
    from citygen.tile import train_tile

    again = train_tile(tile, root / "city" / "transforms.json", "tiny", "local", overrides=TINY_TRAIN)
    assert all(o.skipped for o in again.blocks.values())


def test_tile_renderer_renders_a_held_out_view(tiny_tile):
    from citygen.train.data import load_rgb

    root, survey, plan, _ = tiny_tile
    renderer = TileRenderer.open(root / "tile", max_cached_blocks=2)
    assert renderer.block_ids == [b.id for b in plan.blocks] and renderer.missing_blocks == []
    assert renderer.classes == tuple(survey.classes) and renderer.georef == survey.georef
    assert renderer.bounds.shape == (2, 3)
    im = survey.test_images[0]
    cam = survey.camera_of(im).scaled(0.5)  # 32 x 24: keeps the CPU test short
    view = renderer.render_view(cam, im.c2w)
    assert view["rgb"].shape == (24, 32, 3) and view["depth"].shape == (24, 32)
    assert view["semantics"].shape == (24, 32, len(survey.classes))
    gt = torch.from_numpy(load_rgb(survey.image_path(im), (32, 24))).float() / 255
    mse = float(((view["rgb"] - gt) ** 2).mean())
    mse_grey = float(((gt - 0.5) ** 2).mean())
    assert mse < mse_grey


def test_render_cli_writes_views_and_seam_metric(tiny_tile, tmp_path):
    from citygen.cli import entrypoint

    root, survey, _, _ = tiny_tile
    out = tmp_path / "views"
    view = survey.test_names[-1]
    assert entrypoint(["render", str(root / "tile"), "--out", str(out), "--views", view, "--downscale", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [v["name"] for v in metrics["views"]] == [view]
    for v in metrics["views"]:
        stem = Path(v["name"]).stem
        png = np.asarray(Image.open(out / f"{stem}_rgb.png"), dtype=np.float64) / 255
        gt = np.asarray(Image.open(root / "city" / v["name"]).convert("RGB").resize((32, 24), Image.BOX),
                        dtype=np.float64) / 255
        assert v["psnr"] == pytest.approx(10 * np.log10(1 / np.mean((png - gt) ** 2)), abs=1e-6)
        assert all((out / f"{stem}_{kind}.png").is_file() for kind in ("depth", "semantics", "blocks"))
    seams = metrics["seams"]
    assert seams["pixels_boundary"] > 0 and seams["pixels_interior"] > 0
    assert seams["difference_db"] == pytest.approx(seams["psnr_boundary"] - seams["psnr_interior"])
    # bad input is one line on stderr, exit 2
    assert entrypoint(["render", str(tmp_path / "nowhere"), "--out", str(out)]) == 2


def test_block_job_resume_without_checkpoint_starts_fresh(tiny_tile, tmp_path):
    from citygen.config import load_config, to_dict
    from citygen.train.block_job import train_block_job

    root, _, plan, _ = tiny_tile
    block = plan.blocks[0]
    kwargs = {"config": to_dict(load_config("tiny", {**TINY_TRAIN, "steps": 3, "checkpoint_every": 2})),
                  "data": str(root / "city" / "transforms.json"), "image_names": block.images[:6],
                  "aabb": [[block.extended[0], block.extended[1], -5.0], [block.extended[2], block.extended[3], 50.0]]}
    first = train_block_job(block.id, str(tmp_path / "run"), True, **kwargs)  # a retry that died before step 1
    assert first["step"] == 3 and first["resumed_from"] == 0 and first["n_images"] == 6
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.json")) == \
        ["step_0000002.json", "step_0000003.json"]
    again = train_block_job(block.id, str(tmp_path / "run"), True, **kwargs)   # finished: nothing more to train
    assert again["step"] == 3 and again["resumed_from"] == 3


def test_single_run_folder_renders_like_its_field(tiny_tile):
    """A lone training run opened as a tile is exactly its field (no blending, same marching)."""
    import shutil

    from citygen.render.volume import render_image
    from citygen.train import load_field

    root, survey, plan, _ = tiny_tile
    run = root / "single_run"
    if not run.exists():
        shutil.copytree(root / "tile" / f"block_{plan.blocks[0].id}", run)
    renderer = TileRenderer.open(run)
    assert renderer.block_ids == ["block"] and renderer.plan.margin_m == 0.0
    im = survey.test_images[0]
    cam = survey.camera_of(im).scaled(0.25)
    field, meta = load_field(run)
    ref = render_image(field, cam, im.c2w, render=meta["train_config"].render)
    view = renderer.render_view(cam, im.c2w)
    np.testing.assert_allclose(view["rgb"].numpy(), ref["rgb"].numpy(), atol=1e-4)
    np.testing.assert_allclose(view["acc"].numpy(), ref["acc"].numpy(), atol=1e-4)
    hit = ref["acc"].numpy() > 0.5
    np.testing.assert_allclose(view["depth"].numpy()[hit], ref["depth"].numpy()[hit], rtol=1e-3)


def test_train_tile_cli_scores_the_composited_tile(tiny_tile, capsys):
    """`citygen train-tile` ends with the tile's held-out views rendered from all blocks and scored:
    PSNR/SSIM as `citygen render` gives them, and the rendered depth against held-out points placed
    on the true surface (back-projected from the survey's depth maps), checked against the error
    of the same render at those pixels."""
    from citygen.cli import entrypoint
    from citygen.images import load_depth

    root, survey, _, _ = tiny_tile
    tile, data = root / "tile", root / "city" / "transforms.json"
    names, xyz, obs_img, obs_xy, expected, gsd = [], [], [], [], [], []
    renderer = TileRenderer.open(tile)
    rng = np.random.default_rng(0)
    for k, im in enumerate(survey.test_images):
        cam = survey.camera_of(im)
        gt = load_depth(Path(im.depth))
        rows, cols = np.nonzero(gt > 0)
        pick = rng.choice(len(rows), 40, replace=False)
        r, c = rows[pick], cols[pick]
        z = gt[r, c].astype(np.float64)
        # the pixel centre's ray, scaled to z-depth z, in the world frame
        ray = np.stack([(c + 0.5 - cam.cx) / cam.fl_x, (r + 0.5 - cam.cy) / cam.fl_y, np.ones_like(z)], -1) * z[:, None]
        xyz.append(ray @ im.c2w[:3, :3].T + im.c2w[:3, 3])
        names.append(Path(im.name).name)
        obs_img.append(np.full(len(z), k))
        obs_xy.append(np.stack([c + 0.5, r + 0.5], -1))
        rendered = renderer.render_view(cam, im.c2w)["depth"].numpy()  # tiny preset: downscale 1
        expected.append(rendered[r, c] - z)
        gsd.append(z / cam.fl_x)
    n = sum(len(e) for e in expected)
    points = root / "city" / "points3D_heldout.npz"
    np.savez(points, xyz=np.concatenate(xyz), image_names=np.array(names), obs_point=np.arange(n),
             obs_image=np.concatenate(obs_img), obs_xy=np.concatenate(obs_xy))
    try:
        capsys.readouterr()
        assert entrypoint(["train-tile", str(tile), "--data", str(data), "--preset", "tiny",
                           "--override", *[f"{k}={v}" for k, v in TINY_TRAIN.items()]]) == 0
        summary = json.loads(capsys.readouterr().out)
    finally:
        points.unlink()
    assert all(b["state"] == "done" for b in summary["blocks"].values())
    ev = summary["eval"]
    metrics = json.loads((tile / "eval" / "metrics.json").read_text())
    assert ev["views"] == len(survey.test_images) == len(metrics["views"])
    assert ev["mean"]["psnr"] == pytest.approx(np.mean([v["psnr"] for v in metrics["views"]]))
    err, gsd = np.abs(np.concatenate(expected)), np.concatenate(gsd)
    hp = ev["heldout_points"]
    assert hp["num_observations"] == n
    assert hp["median_abs_m"] == pytest.approx(np.median(err), rel=1e-4, abs=1e-4)
    assert hp["rmse_m"] == pytest.approx(np.sqrt(np.mean(err**2)), rel=1e-4, abs=1e-4)
    assert hp["share_within_2gsd"] == pytest.approx(np.mean(err <= 2 * gsd), abs=1.5 / n)
