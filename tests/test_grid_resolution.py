"""The hash grid's finest level follows the images' ground sample distance
(``FieldConfig.min_cell_gsd``): closed forms, and a trained run whose checkpoint rebuilds its grid."""

from __future__ import annotations

import json
import math

import numpy as np
from boxscene import make_box_survey

from citygen.config import FieldConfig, load_config
from citygen.fields.field import gsd_resolutions
from citygen.train import load_field, train_block
from citygen.train.data import ground_sample_distance
from survey_io import Camera, read_transforms


def test_gsd_resolutions_closed_form():
    cfg = FieldConfig(max_resolution=2048, base_resolution=16, min_cell_gsd=1.0)
    assert gsd_resolutions(cfg, 728.0, 0.6) == (9, 1213)      # floor(728 / 0.6); 16 * 1213 / 2048 = 9.5
    assert gsd_resolutions(cfg, 2000.0, 0.5) == (16, 2048)    # 4000 fits: never raised
    assert gsd_resolutions(cfg, 10.0, 5.0) == (2, 2)          # the base floors at 2, the finest at the base
    cfg.min_cell_gsd = 2.0
    assert gsd_resolutions(cfg, 728.0, 0.6) == (5, 606)       # floor(728 / 1.2); 16 * 606 / 2048 = 4.7
    cfg.min_cell_gsd = 0.0
    assert gsd_resolutions(cfg, 728.0, 0.6) == (16, 2048)     # off


def test_ground_sample_distance_is_height_over_focal():
    cams = [Camera(width=100, height=80, fl_x=200.0, fl_y=200.0, cx=50.0, cy=40.0)] * 3
    c2w = np.repeat(np.eye(4)[None], 3, axis=0)
    c2w[:, 2, 3] = [100.0, 120.0, 150.0]
    assert math.isclose(ground_sample_distance(cams, c2w, 0.0), 120.0 / 200.0)     # the median image
    assert math.isclose(ground_sample_distance(cams, c2w, -10.0), 130.0 / 200.0)


def test_a_runs_grid_follows_its_images_and_its_checkpoint_rebuilds_it(tmp_path):
    survey_path = make_box_survey(tmp_path / "survey")
    survey = read_transforms(survey_path)
    cfg = load_config("tiny", {"field.n_levels": 4, "field.log2_hashmap_size": 10, "field.max_resolution": 512,
                               "field.hidden_dim": 16, "field.semantic_hidden_dim": 16, "field.min_cell_gsd": 1.0, "steps": 2,
                               "rays_per_batch": 64, "threads": 1, "checkpoint_every": 10000})
    out = tmp_path / "run"
    train_block(cfg, survey_path, out, progress=False)
    field, meta = load_field(out)
    box = np.asarray(meta["aabb"])
    # independent of the trainer: the survey's own camera heights over the box floor, its focal length
    train = [im for im in survey.images if im.name not in set(survey.test_names)]
    heights = sorted(im.c2w[2, 3] - box[0, 2] for im in train)
    gsd = float(np.median(heights)) / survey.cameras[0].fl_x
    expected = math.floor(float((box[1] - box[0]).max()) / gsd)
    assert 16 <= expected < 512                                       # the cap is what this scene tests
    assert meta["config"]["field"]["max_resolution"] == expected
    assert meta["config"]["field"]["base_resolution"] == max(2, round(16 * expected / 512))
    assert json.loads((out / "config.json").read_text())["field"]["max_resolution"] == expected
    grid = field.encoding.config
    assert math.isclose(grid.base_resolution * grid.per_level_scale ** (grid.n_levels - 1), expected, rel_tol=1e-6)
    assert math.isclose(meta["gsd_m"], gsd, rel_tol=1e-3)
    # off by default: the preset's resolutions stand
    default = load_config("tiny", {"field.n_levels": 4, "field.log2_hashmap_size": 10, "field.max_resolution": 512,
                                   "field.hidden_dim": 16, "field.semantic_hidden_dim": 16, "steps": 2,
                                   "rays_per_batch": 64, "threads": 1, "checkpoint_every": 10000})
    train_block(default, survey_path, tmp_path / "default", progress=False)
    assert json.loads((tmp_path / "default" / "config.json").read_text())["field"]["max_resolution"] == 512
