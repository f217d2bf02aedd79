"""The coarse pass: `citygen plan`, `train` and `train-tile` triangulate a posed survey that has
neither depth maps nor SfM points once (`citygen triangulate`, kept in its folder), and the field
boxes from those points hold the synthetic city's true surface (its DSM and DTM, moved out of the
survey folder so that the plan cannot take its ground from them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from citygen.cli import entrypoint
from citygen.partition import TilePlan
from citygen.tile import CAMERA_CLEARANCE_M, resolve_config, tile_tasks
from survey_io import read_transforms
from survey_io.geotiff import read_geotiff
from survey_io.synthetic.survey import SyntheticConfig, make_survey

pytest.importorskip("pycolmap")

#: test_triangulate's survey: two strips (20 nadir images of 240x180) over a 120 m city at 60 m,
#: no depth maps, buildings up to 20 m; seconds to render and to triangulate.
CONFIG = SyntheticConfig(area_m=120.0, altitude_m=60.0, width=240, height=180, front_overlap=0.8,
                         side_overlap=0.7, oblique_headings=(), max_building_height_m=20.0, antialias=False,
                         ortho_gsd_m=0.5, test_every=0, max_images=20, write_depth=False)
#: how far a box's top may sit over the true roofs (measured: 1.8 and 2.3 m; the camera rule
#: puts it 36 m over the ground, 14 m over these roofs).
BOX_SLACK_M = 10.0
PASS_LINE = "citygen: coarse pass"
TRAIN = ["--steps", "1", "--preset", "tiny", "--downscale", "4", "--threads", "1", "--no-eval", "--no-progress"]


@pytest.fixture(scope="module")
def city(tmp_path_factory) -> tuple[Path, Path]:
    """(survey folder without points, folder of its ground truth dsm.tif / dtm.tif)."""
    root = tmp_path_factory.mktemp("coarse")
    make_survey(root / "city", CONFIG, seed=3, progress=False, workers=1)
    (root / "truth").mkdir()
    for name in ("dsm.tif", "dtm.tif"):
        shutil.move(root / "city" / name, root / "truth" / name)
    return root / "city", root / "truth"


def _copy(city, tmp_path) -> Path:
    survey = tmp_path / "survey"
    shutil.copytree(city[0], survey)
    return survey


def _pass_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(PASS_LINE)]


def _true_range(truth: Path, survey: Path, rect) -> tuple[float, float]:
    """The lowest bare ground (DTM) and the highest surface (DSM) over ``rect`` (local x0, y0, x1,
    y1), in local heights."""
    georef = read_transforms(survey / "transforms.json").georef
    out = []
    for name, pick in (("dtm.tif", np.min), ("dsm.tif", np.max)):
        grid = read_geotiff(truth / name)
        h, w = grid.array.shape
        col, row = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
        x, y = grid.transform @ (col, row)
        local = georef.crs_to_local(np.column_stack([x.ravel(), y.ravel(), grid.array.ravel()]))
        inside = (local[:, 0] >= rect[0]) & (local[:, 0] <= rect[2]) & (local[:, 1] >= rect[1]) & (local[:, 1] <= rect[3])
        assert inside.sum() > 100
        out.append(float(pick(local[inside, 2])))
    return out[0], out[1]


def test_plan_triangulates_once_and_tile_boxes_hold_the_true_heights(city, tmp_path, capsys):
    survey = _copy(city, tmp_path)
    data = str(survey / "transforms.json")
    assert entrypoint(["plan", "--data", data, "--out", str(tmp_path / "tile"), "--blocks", "1x2",
                       "--train-preset", "tiny"]) == 0
    (line,) = _pass_lines(capsys.readouterr().err)
    assert "points in" in line and (survey / "sparse" / "0").is_dir()
    plan = TilePlan.load(tmp_path / "tile" / "plan.json")
    assert "sparse" in plan.ground["source"]  # the plan's ground from the points, not the cameras
    _, record = tile_tasks(tmp_path / "tile", data, resolve_config("tiny"))
    cam_z = min(im.c2w[2, 3] for im in read_transforms(data).images)
    for block in plan.blocks:
        rec = record["blocks"][block.id]
        assert rec["box_source"] == "sfm-points" and rec["attribution"] == "sfm-points"
        (x0, y0, z0), (x1, y1, z1) = rec["aabb"]
        ground, top = _true_range(city[1], survey, (x0, y0, x1, y1))
        # holds the truth, its top within BOX_SLACK_M of the roofs
        assert z0 <= ground and top <= z1 <= top + BOX_SLACK_M, (block.id, z0, z1, ground, top)
        assert z1 <= cam_z - CAMERA_CLEARANCE_M
    # cached: a second plan finds the points and says nothing of a pass
    assert entrypoint(["plan", "--data", data, "--out", str(tmp_path / "tile2"), "--blocks", "1x2",
                       "--train-preset", "tiny"]) == 0
    assert not _pass_lines(capsys.readouterr().err)


def test_train_triangulates_a_survey_without_points(city, tmp_path, capsys):
    survey = _copy(city, tmp_path)
    data = str(survey / "transforms.json")
    assert entrypoint(["train", "--data", data, "--out", str(tmp_path / "run"), *TRAIN]) == 0
    captured = capsys.readouterr()
    assert len(_pass_lines(captured.err)) == 1
    summary = json.loads(captured.out)
    assert summary["box_source"] == "sfm-points" and summary["coarse_pass"]["points"] > 100
    assert (survey / "sparse" / "0").is_dir() and (survey / "points3D_heldout.npz").is_file()


def test_no_coarse_pass_keeps_the_camera_heights(city, tmp_path, capsys):
    survey = _copy(city, tmp_path)
    data = str(survey / "transforms.json")
    assert entrypoint(["train", "--data", data, "--out", str(tmp_path / "run"), *TRAIN, "--no-coarse-pass"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["box_source"] == "plan" and summary["coarse_pass"] is None
    assert not _pass_lines(captured.err) and not (survey / "sparse").exists()
    assert entrypoint(["plan", "--data", data, "--out", str(tmp_path / "tile"), "--blocks", "1x2",
                       "--no-coarse-pass"]) == 0
    assert not _pass_lines(capsys.readouterr().err) and not (survey / "sparse").exists()


def test_a_failed_pass_is_said_and_refuses_nothing(city, tmp_path, capsys, monkeypatch):
    import survey_io.triangulate
    from survey_io import SurveyError

    def fail(path, *args, **kwargs):
        raise SurveyError(path, "no point triangulated")

    monkeypatch.setattr(survey_io.triangulate, "triangulate_survey", fail)
    survey = _copy(city, tmp_path)
    assert entrypoint(["train", "--data", str(survey / "transforms.json"), "--out", str(tmp_path / "run"), *TRAIN]) == 0
    captured = capsys.readouterr()
    (line,) = _pass_lines(captured.err)
    assert "failed" in line and "no point triangulated" in line
    summary = json.loads(captured.out)
    assert summary["box_source"] == "plan" and "no point triangulated" in summary["coarse_pass"]["failed"]


def test_train_tile_triangulates_before_boxes_and_attribution(city, tmp_path, capsys, monkeypatch):
    """`train-tile` up to its block tasks (the executor is stubbed: worker start-up is the slow part
    and is tested elsewhere); a tile planned on another survey stays one line, with no pass."""
    import citygen.tile
    from citygen.distributed import TileResult

    monkeypatch.setattr(citygen.tile, "run_tile", lambda tasks, executor, tile_dir: TileResult(Path(tile_dir)))
    survey = _copy(city, tmp_path)
    data = str(survey / "transforms.json")
    tile = tmp_path / "tile"
    assert entrypoint(["plan", "--data", data, "--out", str(tile), "--blocks", "1x2", "--no-coarse-pass"]) == 0
    plan = json.loads((tile / "plan.json").read_text())
    plan["blocks"][0]["images"].append("images/elsewhere.jpg")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "plan.json").write_text(json.dumps(plan))
    capsys.readouterr()
    assert entrypoint(["train-tile", str(tmp_path / "other"), "--data", data, *TRAIN[:-1]]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "another survey" in lines[0] and not (survey / "sparse").exists()

    assert entrypoint(["train-tile", str(tile), "--data", data, *TRAIN[:-1]]) == 0
    captured = capsys.readouterr()
    assert len(_pass_lines(captured.err)) == 1 and json.loads(captured.out)["coarse_pass"]["points"] > 100
    blocks = json.loads((tile / "tile_config.json").read_text())["blocks"]
    assert {(b["box_source"], b["attribution"]) for b in blocks.values()} == {("sfm-points", "sfm-points")}
