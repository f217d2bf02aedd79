"""Tile blocks train only the pixels attributed to them (citygen.tile): a pixel whose surface
point lies in a block's extended rectangle trains that block; sky and content beyond the tile
train the block whose background the compositor shows for that ray.  The expectations are
worked out by hand from the geometry (pinhole rays onto a flat ground), not by the code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from citygen.partition import Block, Grid, TilePlan
from citygen.partition.ground import GroundModel
from citygen.tile import attribute_image, resolve_config, tile_tasks
from citygen.train.data import RayDataset, read_pixel_masks
from citygen.train.error_map import ErrorMap
from survey_io import Camera, Georef, Survey, SurveyImage, write_transforms

W, H, F = 40, 30, 20.0
CAM = Camera(W, H, F, F, W / 2, H / 2, "PINHOLE")
CAM_Z = 100.0
# two blocks side by side along x, margin 10 m
CORES = np.array([[-50.0, -50.0, 0.0, 50.0], [0.0, -50.0, 50.0, 50.0]])
EXTENDED = CORES + np.array([-10.0, -10.0, 10.0, 10.0])
BOUNDS = np.array([[-60.0, -60.0, -5.0], [60.0, 60.0, 50.0]])
GEOREF = Georef("EPSG:32633", (500000.0, 4500000.0, 0.0))


def nadir(x: float, y: float) -> np.ndarray:
    """OpenCV camera-to-world looking straight down, image x = east, image y = south."""
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2] = (1, 0, 0), (0, -1, 0), (0, 0, -1)
    c2w[:3, 3] = (x, y, CAM_Z)
    return c2w


def ground_xy() -> tuple[np.ndarray, np.ndarray]:
    """Where each pixel's ray meets z = 0 for a nadir camera at (0, 0, CAM_Z): similar triangles."""
    v, u = np.mgrid[0:H, 0:W] + 0.5
    return CAM_Z * (u - W / 2) / F, -CAM_Z * (v - H / 2) / F


def expected_nadir() -> np.ndarray:
    x, y = ground_xy()
    inside = np.stack([(x >= e[0]) & (x <= e[2]) & (y >= e[1]) & (y <= e[3]) for e in EXTENDED], -1)
    lost = ~inside.any(-1)
    # a ray from above the box that lands beyond it leaves the box on the side of its landing
    # point; the core nearest that exit is the western block for x < 0, the eastern for x > 0
    inside[..., 0] |= lost & (x < 0)
    inside[..., 1] |= lost & (x > 0)
    return inside


def test_nadir_over_flat_ground_matches_hand_geometry():
    got = attribute_image(CAM, nadir(0, 0), None, GroundModel.plane(0.0), EXTENDED, CORES, BOUNDS)
    want = expected_nadir()
    x, y = ground_xy()
    # the hand expectation covers every case: only A, only B, both (overlap), beyond the tile
    assert want[..., 0].any() and want[..., 1].any() and (want[..., 0] & want[..., 1]).any()
    assert ((np.abs(x) > 60) | (np.abs(y) > 60)).any()
    np.testing.assert_array_equal(got, want)


def test_depth_map_decides_and_sky_goes_to_the_background_block():
    """With a depth map the surface point comes from it: a 'roof' 60 m up shifts nothing for a
    nadir ray but moves an off-centre pixel's point towards the nadir; zero depth is sky."""
    x, y = ground_xy()
    depth = np.full((H, W), CAM_Z)          # ground at z = 0 everywhere ...
    depth[:, 24:28] = CAM_Z - 60.0          # ... except a tall strip (z = 60 m) in columns 24..27
    depth[0:3, :] = 0.0                     # ... and the top rows see nothing (sky)
    got = attribute_image(CAM, nadir(0, 0), depth, None, EXTENDED, CORES, BOUNDS)
    # the strip's points sit at 40 % of the ground distance from the nadir
    xs = np.where(depth == CAM_Z - 60.0, 0.4 * x, x)
    ys = np.where(depth == CAM_Z - 60.0, 0.4 * y, y)
    inside = np.stack([(xs >= e[0]) & (xs <= e[2]) & (ys >= e[1]) & (ys <= e[3]) for e in EXTENDED], -1)
    inside[depth == 0] = False
    lost = ~inside.any(-1)
    inside[..., 0] |= lost & (x < 0)
    inside[..., 1] |= lost & (x > 0)
    assert (got[:, 24:28] != expected_nadir()[:, 24:28]).any()  # the strip matters
    np.testing.assert_array_equal(got, inside)


def test_above_the_horizon_goes_to_the_block_under_the_camera():
    """A camera over the western block, above the tile's box (top 50 m), looking east, level.
    Its pixels see nothing inside the tile (the ground they reach lies > 130 m east, beyond
    it), so each trains the block the compositor takes its background from: rays that never
    enter the box (sky, and ground rays still above 50 m when they pass x = 60: slope below
    the horizon < 50 / 80, rows v < 27.5) the block under the camera; steeper rays enter
    through the top and leave through the eastern side (x = 60, |y| <= 58 for these columns)."""
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2] = (0, -1, 0), (0, 0, -1), (1, 0, 0)  # looking east, level
    c2w[:3, 3] = (-20.0, 0.0, CAM_Z)
    got = attribute_image(CAM, c2w, None, GroundModel.plane(0.0), EXTENDED, CORES, BOUNDS)
    missing_box, through_east = got[:27], got[28:, 5:35]
    assert missing_box[..., 0].all() and not missing_box[..., 1].any()
    assert through_east[..., 1].all() and not through_east[..., 0].any()


def _smoothstep(u: np.ndarray) -> np.ndarray:
    u = np.clip(u, 0.0, 1.0)
    return u * u * (3.0 - 2.0 * u)


def test_overlap_pixels_split_by_the_blend_weights():
    """A finer nadir camera (0.5 m a pixel) over the same two blocks: with a seed every pixel
    trains exactly one block; outside the overlap (x in [-10, 10]) as before, inside it the
    western block with probability w_W / (w_W + w_E), the blend rule worked by hand: w_W = 1
    up to x = 0, then the smoothstep ramp down to 0 at x = 10; w_E mirrored (the y ramps are
    the same for both blocks and cancel).  Symmetry makes the mean over the whole overlap 1/2."""
    cam = Camera(400, 300, 200.0, 200.0, 200.0, 150.0, "PINHOLE")
    v, u = np.mgrid[0:300, 0:400] + 0.5
    x = CAM_Z * (u - 200.0) / 200.0
    held = attribute_image(cam, nadir(0, 0), None, GroundModel.plane(0.0), EXTENDED, CORES, BOUNDS)
    got = attribute_image(cam, nadir(0, 0), None, GroundModel.plane(0.0), EXTENDED, CORES, BOUNDS, seed=7)
    overlap = held[..., 0] & held[..., 1]
    assert overlap.sum() == 40 * 240                       # 20 m x 120 m at 0.5 m
    assert (got.sum(-1) == 1).all()                        # a partition of the image
    assert not (got & ~held).any()                         # only to a block that holds the point
    np.testing.assert_array_equal(got[~overlap], held[~overlap])
    west = got[..., 0][overlap]
    # 9600 draws: the binomial sd of the mean is 0.005; 0.02 is 4 sd
    assert abs(west.mean() - 0.5) < 0.02
    w_w = np.where(x <= 0, 1.0, _smoothstep((10.0 - x) / 10.0))
    w_e = np.where(x >= 0, 1.0, _smoothstep((x + 10.0) / 10.0))
    p_west = w_w / (w_w + w_e)
    for lo in (-10.0, -5.0, 0.0, 5.0):                     # 5 m bands: 2400 draws, sd <= 0.0102
        band = overlap & (x >= lo) & (x < lo + 5.0)
        assert abs(got[..., 0][band].mean() - p_west[band].mean()) < 0.04, lo
    # the draw is the seed's: the same seed, the same split; another seed, another split
    np.testing.assert_array_equal(
        got, attribute_image(cam, nadir(0, 0), None, GroundModel.plane(0.0), EXTENDED, CORES, BOUNDS, seed=7))
    other = attribute_image(cam, nadir(0, 0), None, GroundModel.plane(0.0), EXTENDED, CORES, BOUNDS, seed=8)
    assert (other != got).any()


# -- sampling ------------------------------------------------------------------------------
def _tiny_survey(root, n: int = 2, w: int = 16, h: int = 12) -> Survey:
    (root / "img").mkdir(parents=True)
    cam = Camera(w, h, 10.0, 10.0, w / 2, h / 2, "PINHOLE")
    images = []
    for i in range(n):
        Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(root / "img" / f"{i}.png")
        images.append(SurveyImage(f"img/{i}.png", 0, nadir(5.0 * i, 0.0)))
    survey = Survey(root, [cam], images, GEOREF)
    write_transforms(survey, root / "transforms.json")
    return survey


def test_sampling_draws_only_attributed_pixels(tmp_path):
    survey = _tiny_survey(tmp_path)
    m0 = np.zeros((12, 16), bool)
    m0[2:5, 3:7] = True                      # a 3x4 patch of image 0 (spans two 8x8 cells)
    m1 = np.zeros((12, 16), bool)
    m1[11, 15] = True                        # one pixel of image 1
    data = RayDataset(survey, survey.images, masks=[m0, m1])
    allowed = set(np.flatnonzero(m0.reshape(-1)).tolist()) | {16 * 12 + 11 * 16 + 15}
    g = torch.Generator().manual_seed(0)
    drawn = data.uniform_pixels(4000, g)
    assert set(drawn.tolist()) == allowed    # only these, and (4000 draws of 13) every one of them
    # error-guided: cells without attributed pixels are never chosen, however large their error
    emap = ErrorMap([(16, 12), (16, 12)], cell=8, pixels=data.allowed)
    emap.error[:] = 100.0
    emap.error[emap.cells_of(torch.tensor([16 * 12 + 11 * 16 + 15]))] = 1e-3
    drawn = emap.sample(4000, 0.75, g)
    assert set(drawn.tolist()) <= allowed
    # the patch's two cells carry nearly all the error weight: the lone pixel comes from the uniform quarter
    lone = int((drawn == 16 * 12 + 11 * 16 + 15).sum())
    assert 0 < lone < 1000 * 2 / 13 * 1.5
    batch = data.batch(drawn[:50])
    assert torch.all(batch.image_index[drawn[:50] >= 192] == 1)


def test_masks_must_fit_the_training_images(tmp_path):
    from citygen.errors import CitygenError

    survey = _tiny_survey(tmp_path)
    with pytest.raises(CitygenError, match="pixel mask"):
        RayDataset(survey, survey.images, masks=[np.ones((12, 16), bool), np.ones((6, 8), bool)])
    with pytest.raises(CitygenError, match="no training pixel"):
        RayDataset(survey, survey.images, masks=[np.zeros((12, 16), bool)] * 2)


def _two_block_tile(tmp_path) -> tuple[SurveyImage, Path]:
    """One nadir image over the two blocks, no depth, the plan's ground plane at 0."""
    root = tmp_path / "survey"
    (root / "img").mkdir(parents=True)
    im = SurveyImage("img/0.jpg", 0, nadir(0.0, 0.0))
    survey = Survey(root, [CAM], [im], GEOREF)
    write_transforms(survey, root / "transforms.json")
    grid = Grid(origin=(-50.0, -50.0), block_size=(50.0, 100.0), rows=1, cols=2)
    blocks = [Block(id=f"b_r0_c{k}", row=0, col=k, core=tuple(CORES[k]), extended=tuple(EXTENDED[k]),
                    z_range=(-5.0, 50.0), images=[im.name]) for k in range(2)]
    (tmp_path / "tile").mkdir()
    TilePlan(georef=GEOREF, grid=grid, margin_m=10.0, blocks=blocks,
             ground={"kind": "plane", "height": 0.0, "source": "--ground-height"}).save(tmp_path / "tile" / "plan.json")
    return im, root / "transforms.json"


def test_tile_tasks_write_masks_and_shares(tmp_path):
    """End to end through the plan: one nadir image over two blocks, no depth, the plan's
    ground plane: each block's mask file holds the hand-computed mask and its share."""
    im, transforms = _two_block_tile(tmp_path)
    tasks, record = tile_tasks(tmp_path / "tile", transforms, resolve_config("tiny"))
    want = expected_nadir()
    for k, task in enumerate(tasks):
        (mask,) = read_pixel_masks(task.kwargs["pixels"], [im.name])
        np.testing.assert_array_equal(mask, want[..., k])
        rec = record["blocks"][task.block_id]
        assert rec["attribution"] == "plan ground"
        assert rec["pixel_share"] == pytest.approx(want[..., k].mean(), abs=1e-4)
        # the survey's only training image: the block's share of the survey is the same fraction,
        # and it spends the preset's rays (tiny: 1024 a step x 9300 steps) in batches of that
        # fraction, per pixel what one block over the whole survey draws
        share = want[..., k].mean()
        assert 0.5 < share < 0.7 and rec["survey_share"] == pytest.approx(share, abs=1e-4)
        cfg = task.kwargs["config"]
        assert cfg["rays_per_batch"] == rec["rays_per_batch"] == round(1024 * share)
        assert cfg["steps"] == rec["steps"] > 9300
        assert abs(cfg["rays_per_batch"] * cfg["steps"] - 1024 * 9300) <= cfg["rays_per_batch"] / 2  # same rays
        assert record["train"]["steps"] == 9300 and record["train"]["rays_per_batch"] == 1024  # the tile's as given
    assert record["overlap"] == "both"


def test_tile_tasks_split_overlap_pixels_between_the_blocks(tmp_path):
    """As above with ``split_overlaps``: the two masks partition the image (each overlap pixel
    in one block, the rest as by hand) and the survey shares sum to 1."""
    im, transforms = _two_block_tile(tmp_path)
    tasks, record = tile_tasks(tmp_path / "tile", transforms, resolve_config("tiny"), split_overlaps=True)
    want = expected_nadir()
    overlap = want[..., 0] & want[..., 1]
    masks = [read_pixel_masks(task.kwargs["pixels"], [im.name])[0] for task in tasks]
    # each pixel trains exactly one block: the overlap split between the two, the rest as by hand
    np.testing.assert_array_equal(masks[0] ^ masks[1], np.ones((H, W), bool))
    assert masks[0][overlap].any() and masks[1][overlap].any()
    shares = []
    for k, task in enumerate(tasks):
        mask = masks[k]
        np.testing.assert_array_equal(mask[~overlap], want[..., k][~overlap])
        rec = record["blocks"][task.block_id]
        assert rec["attribution"] == "plan ground"
        assert rec["pixel_share"] == pytest.approx(mask.mean(), abs=1e-4)
        # the survey's only training image: the block's share of the survey is the same fraction,
        # and it spends the preset's rays (tiny: 1024 a step x 9300 steps) in batches of that
        # fraction, per pixel what one block over the whole survey draws
        share = mask.mean()
        assert 0.4 < share < 0.6 and rec["survey_share"] == pytest.approx(share, abs=1e-4)
        shares.append(rec["survey_share"])
        cfg = task.kwargs["config"]
        assert cfg["rays_per_batch"] == rec["rays_per_batch"] == round(1024 * share)
        assert cfg["steps"] == rec["steps"] > 9300
        assert abs(cfg["rays_per_batch"] * cfg["steps"] - 1024 * 9300) <= cfg["rays_per_batch"] / 2  # same rays
        assert record["train"]["steps"] == 9300 and record["train"]["rays_per_batch"] == 1024  # the tile's as given
    assert sum(shares) == pytest.approx(1.0, abs=2e-4)  # the survey's pixels, background included, once each
    assert record["overlap"] == "split"


@pytest.mark.parametrize("share, rays, steps", [(1.0, 1024, 400), (0.5, 512, 800), (0.25, 256, 1600),
                                                (0.3339, 342, 1198), (0.1, 256, 1600), (0.0, 1024, 400),
                                                (1.3, 1024, 400)])
def test_block_batch_spends_the_same_rays_in_smaller_steps(share, rays, steps):
    """Worked by hand for 1024 rays x 400 steps: the batch is 1024 x share rounded (0.3339 -> 341.9),
    the steps spend the same rays (409600 / 342 = 1197.7); a whole-survey block trains as configured,
    a small share stops at a quarter of the batch, nothing attributed changes nothing."""
    from citygen.tile import MIN_BATCH_FRACTION, block_batch

    assert MIN_BATCH_FRACTION == 0.25
    assert block_batch(1024, 400, share) == (rays, steps)


@pytest.mark.parametrize("share, rays, steps", [(0.25, 128, 3200), (0.3339, 171, 2395), (0.1, 128, 3200),
                                                (1.0, 1024, 400), (0.0, 1024, 400)])
def test_block_batch_scale_halves_a_blocks_batch_again(share, rays, steps):
    """``tile_batch_scale`` 0.5, worked by hand for 1024 rays x 400 steps: 1024 x 0.25 x 0.5
    = 128 rays in 409600 / 128 = 3200 steps; 1024 x 0.3339 x 0.5 = 171.0 rays, 409600 / 171 = 2395.3
    steps; the quarter floor comes before the scale; a whole-survey block trains as configured."""
    from citygen.tile import block_batch

    assert block_batch(1024, 400, share, 0.5) == (rays, steps)


@pytest.mark.parametrize("share, base", [(0.25, 4), (0.5, 4), (1.0, 16)])
def test_a_tile_block_takes_the_presets_tile_base_resolution(share, base):
    """drone's ``tile_base_resolution`` 4 replaces the grid's base 16 in blocks short of the whole
    survey (a 1x1 tile trains as configured); the batch scale goes with it, and one block's own
    config (``citygen train``) keeps both."""
    from citygen.tile import block_config, resolve_config

    cfg = resolve_config("drone")
    assert (cfg.field.base_resolution, cfg.tile_base_resolution, cfg.tile_batch_scale) == (16, 4, 0.25)
    block = block_config(cfg, share)
    assert block.field.base_resolution == base
    assert block.rays_per_batch == (1024 if share == 1.0 else round(1024 * share * 0.25))
    assert cfg.field.base_resolution == 16  # a copy
    plain = block_config(resolve_config("tiny"), share)
    assert plain.field.base_resolution == resolve_config("tiny").field.base_resolution


@pytest.mark.parametrize("share", [1.0, 0.5, 0.3339, 0.25, 0.1])
def test_a_tile_block_refreshes_its_occupancy_on_the_presets_period_in_its_own_steps(share):
    """Counted over the run by the trainer's own schedule (citygen.train.schedule): a block that
    spends the configured rays in 1/share smaller steps refreshes its occupancy grid every 16 of
    them and over every cell for its first 256 -- 1/share times the tiny preset's 9300 / 16 = 581
    refreshes (refreshed only as often per ray as the preset's batch, the failure-like tile's
    held-out views were 0.6 dB lower, DESIGN.md)."""
    from citygen.tile import block_config, resolve_config
    from citygen.train.schedule import occupancy_refresh_cells

    cfg = resolve_config("tiny")
    assert (cfg.rays_per_batch, cfg.steps, cfg.render.occupancy_update_every, cfg.render.occupancy_warmup_steps) \
        == (1024, 9300, 16, 256)
    block = block_config(cfg, share)
    cells = [occupancy_refresh_cells(done, block.render) for done in range(1, block.steps + 1)]
    refreshes = sum(c is not False for c in cells)
    assert block.steps * block.rays_per_batch == pytest.approx(9300 * 1024, rel=0.01)
    assert refreshes == block.steps // 16
    assert refreshes == pytest.approx(9300 / 16 / max(share, 0.25), rel=0.01)
    assert sum(c is None for c in cells) == 256 // 16
    assert block.render.occupancy_cells_per_update == cfg.render.occupancy_cells_per_update


@pytest.mark.parametrize("error_sampling", [0.0, 0.5])
def test_block_trainer_batches_only_attributed_pixels(tmp_path, error_sampling):
    from citygen.tile import resolve_config
    from citygen.train.trainer import BlockTrainer

    survey = _tiny_survey(tmp_path)
    m0 = np.zeros((12, 16), bool)
    m0[:, :5] = True
    m1 = np.zeros((12, 16), bool)
    m1[7:, 9:] = True
    allowed = set(np.flatnonzero(np.concatenate([m0.reshape(-1), m1.reshape(-1)])).tolist())
    cfg = resolve_config("tiny", {"steps": 3, "rays_per_batch": 256, "threads": 1, "error_sampling": error_sampling,
                                  "field.log2_hashmap_size": 12})
    trainer = BlockTrainer(cfg, survey, tmp_path / "run", aabb=[[-20, -20, -5], [25, 20, 30]], pixel_masks=[m0, m1])
    drawn = []
    batch = trainer.data.batch
    trainer.data.batch = lambda idx: drawn.append(idx.clone()) or batch(idx)
    for _ in range(3):
        trainer.train_step()
    got = set(torch.cat(drawn).tolist())
    assert got <= allowed and len(got) > len(allowed) // 2


def test_a_tile_resumes_with_the_overlap_setting_it_started_with(tmp_path):
    """A resumed block keeps its pixels: asking a tile trained with one overlap rule for the other
    is refused in one line before anything is read or rewritten (a record without the key, written
    before the split existed, counts as "both")."""
    import json

    from citygen.errors import CitygenError
    from citygen.tile import train_tile

    tile = tmp_path / "tile"
    tile.mkdir()
    (tile / "tile_config.json").write_text(json.dumps({"layout": 1, "blocks": {}}))
    before = {p: p.read_bytes() for p in tile.rglob("*") if p.is_file()}
    with pytest.raises(CitygenError, match=r"overlap pixels 'both'.*asks for 'split'"):
        train_tile(tile, tmp_path / "no-survey" / "transforms.json", "tiny", split_overlaps=True)
    (tile / "tile_config.json").write_text(json.dumps({"layout": 1, "overlap": "split", "blocks": {}}))
    before = {p: p.read_bytes() for p in tile.rglob("*") if p.is_file()}
    with pytest.raises(CitygenError, match=r"overlap pixels 'split'.*asks for 'both'"):
        train_tile(tile, tmp_path / "no-survey" / "transforms.json", "tiny", split_overlaps=False)
    assert {p: p.read_bytes() for p in tile.rglob("*") if p.is_file()} == before


def test_the_overlap_rule_defaults_to_both_and_a_resumed_tile_keeps_its_own():
    """A new tile trains overlap pixels in both blocks unless asked to split; a resumed tile keeps
    the rule its record names (a record without one was trained before the split existed: both),
    and asking it for the other rule is refused."""
    from citygen.errors import CitygenError
    from citygen.tile import overlap_rule

    assert [overlap_rule(None, None), overlap_rule({}, None), overlap_rule(None, False), overlap_rule(None, True)] \
        == ["both", "both", "both", "split"]
    old = {"layout": 1, "blocks": {}}
    assert overlap_rule(old, None) == overlap_rule(old, False) == "both"
    assert overlap_rule({**old, "overlap": "split"}, None) == overlap_rule({**old, "overlap": "split"}, True) == "split"
    assert overlap_rule({**old, "overlap": "both"}, None) == "both"
    with pytest.raises(CitygenError, match=r"trained with overlap pixels 'both', this run asks for 'split'"):
        overlap_rule(old, True)
