"""Bad option values and output locations: every one ends in ONE line on stderr naming the
option (or path) and the problem, exit status 2, no traceback, and nothing written.

The plan / export / training-memory refusals must come before any heavy work: each case
asserts that its output folder was not even created (no timing in tests)."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tyro
from PIL import Image

from citygen import cli
from citygen.cli import entrypoint
from survey_io import Camera, Georef, Survey, SurveyImage, write_transforms

ORIGIN = (500_000.0, 4_000_000.0, 0.0)
NADIR = np.diag([1.0, -1.0, -1.0])
REPO = Path(__file__).resolve().parents[1]


def _pose(x: float, y: float, z: float) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = NADIR, (x, y, z)
    return m


@pytest.fixture(scope="module")
def survey(tmp_path_factory) -> Path:
    """6 nadir images at 80 m over flat ground (the probe's '6-image survey')."""
    root = tmp_path_factory.mktemp("survey")
    cam = Camera(width=200, height=150, fl_x=150.0, fl_y=150.0, cx=100, cy=75)
    images = [SurveyImage(f"img_{i}.jpg", 0, _pose(x, y, 80.0)) for i, (x, y) in
              enumerate((x, y) for x in (0, 40, 80) for y in (0, 40))]
    for im in images:  # planning checks every image file against the camera's size
        Image.new("RGB", (cam.width, cam.height)).save(root / im.name)
    return write_transforms(Survey(root, [cam], images, Georef("EPSG:32633", ORIGIN)), root / "transforms.json")


@pytest.fixture(scope="module")
def tile(tmp_path_factory, survey) -> Path:
    """A planned 2x2 tile (plan.json only: export refusals come before any block is loaded)."""
    out = tmp_path_factory.mktemp("tile") / "tile"
    assert entrypoint(["plan", "--data", str(survey), "--out", str(out), "--blocks", "2x2", "--ground-height", "0",
                       "--train-preset", "tiny"]) == 0
    return out


@pytest.fixture(autouse=True)
def _drain(capsys):
    capsys.readouterr()    # the fixtures' own output is not the case's


def refused(argv: list[str], capsys, *expected: str) -> str:
    """Run the CLI in-process; assert exit 2, one stderr line naming ``expected``, no traceback."""
    assert entrypoint([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("citygen: error: ") and "Traceback" not in err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- plan: size refused before building ----------------------------------------------------------
def test_plan_million_blocks_on_six_images(survey, tmp_path, capsys):
    line = refused(["plan", "--data", survey, "--out", tmp_path / "p", "--blocks", "1000x1000", "--ground-height", "0"],
                   capsys, "--blocks 1000x1000", "1,000,000 blocks", "6 images", "A*B <= 10,000")
    assert "use --blocks" in line
    assert not (tmp_path / "p").exists()


def test_plan_tiny_block_size_names_a_block_size_that_fits(survey, tmp_path, capsys):
    line = refused(["plan", "--data", survey, "--out", tmp_path / "p", "--block-size", "0.5", "--ground-height", "0"],
                   capsys, "--block-size 0.5", "at most 10,000")
    suggested = float(re.search(r"use --block-size ([0-9.]+) or more", line).group(1))
    # the images' footprints (80 m up, 150 px focal over 200x150 px) span x in [-53.3, 133.3]
    # and y in [-40, 80]; a snapped grid adds at most one row and one column
    w, h = 133.3 + 53.3, 80.0 + 40.0
    assert (math.ceil(w / suggested) + 1) * (math.ceil(h / suggested) + 1) <= 10_000 * 1.1
    assert math.ceil(w / suggested) * math.ceil(h / suggested) > 10_000 / 4    # not absurdly coarse
    assert not (tmp_path / "p").exists()


def test_plan_dry_run_huge_area(capsys):
    line = refused(["plan", "--dry-run", "--area-km2", "1e9"], capsys, "--area-km2 1e+09", "images", "memory budget")
    assert re.search(r"use --area-km2 [0-9.]+ or less", line)


def test_plan_dry_run_area_over_a_given_budget_suggests_one_that_fits(capsys):
    line = refused(["plan", "--dry-run", "--area-km2", "100", "--memory-budget-gb", "0.05"], capsys,
                   "--area-km2 100", "--memory-budget-gb 0.05")
    area = float(re.search(r"use --area-km2 ([0-9.]+) or less", line).group(1))
    from citygen.partition.layout import FlightLayout, synthetic_survey_size

    # 10 kB per image (the planner's measured figure) must fit 50 MB: at most 5,000 images
    assert 0 < area < 100 and synthetic_survey_size(FlightLayout(area_km2=area)) * 10e3 <= 0.05e9


def test_plan_dry_run_block_count_over_the_limit(capsys):
    # a 10 km square in 10 m blocks: 1000 x 1000; 100 x 100 blocks of 100 m is the limit
    refused(["plan", "--dry-run", "--area-km2", "100", "--block-size", "10"], capsys,
            "--block-size 10", "1,000,000 blocks", "use --block-size 100 or more")


@pytest.mark.parametrize("flag,value,problem", [
    ("--area-km2", "nan", "finite number > 0"),
    ("--area-km2", "-1", "> 0"),
    ("--altitude", "0", "> 0"),
    ("--altitude", "inf", "finite"),
    ("--block-size", "-100", "> 0"),
    ("--margin", "-5", ">= 0"),
    ("--max-images-per-block", "0", ">= 1"),
    ("--downscale", "0", ">= 1"),
    ("--rays-per-second", "0", "> 0"),
    ("--seed", "-1", ">= 0"),
    ("--memory-budget-gb", "0", "> 0"),
])
def test_plan_dry_run_option_ranges(flag, value, problem, capsys):
    refused(["plan", "--dry-run", flag, value], capsys, flag, problem, "got ")


@pytest.mark.parametrize("blocks,problem", [("2by2", "ROWSxCOLS"), ("0x3", "at least 1x1"), ("3x", "ROWSxCOLS")])
def test_plan_blocks_syntax(blocks, problem, capsys):
    refused(["plan", "--dry-run", "--blocks", blocks], capsys, "--blocks", problem, blocks)


def test_plan_ground_height_not_finite(survey, tmp_path, capsys):
    refused(["plan", "--data", survey, "--out", tmp_path / "p", "--ground-height", "nan"], capsys, "--ground-height")
    assert not (tmp_path / "p").exists()


# -- output folders --------------------------------------------------------------------------------
def test_plan_out_is_a_file(survey, tmp_path, capsys):
    out = tmp_path / "plan"
    out.write_text("keep me")
    refused(["plan", "--data", survey, "--out", out, "--blocks", "2x2"], capsys, str(out), "--out is a file")
    assert out.read_text() == "keep me"


def test_plan_out_below_a_file(survey, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    refused(["plan", "--data", survey, "--out", tmp_path / "f" / "tile", "--blocks", "2x2"], capsys,
            str(tmp_path / "f" / "tile"), "cannot be created", "is a file")
    assert snapshot(tmp_path) == {"f": b"x"}


def test_synth_out_is_a_file(tmp_path, capsys):
    out = tmp_path / "city"
    out.write_text("x")
    refused(["synth", out], capsys, str(out), "OUT is a file")
    assert snapshot(tmp_path) == {"city": b"x"}


def test_ingest_out_is_a_file(tmp_path, capsys):
    (tmp_path / "flight").mkdir()
    out = tmp_path / "out"
    out.write_text("x")
    refused(["ingest", tmp_path / "flight", "--out", out], capsys, str(out), "--out is a file")
    assert snapshot(tmp_path) == {"out": b"x"}


def test_export_out_is_a_file(tile, tmp_path, capsys):
    out = tmp_path / "export"
    out.write_text("x")
    refused(["export", tile, "--out", out, "--gsd", "1"], capsys, str(out), "--out is a file")
    assert out.read_text() == "x"


def test_train_out_is_a_file(survey, tmp_path, capsys):
    out = tmp_path / "run"
    out.write_text("x")
    refused(["train", "--data", survey, "--out", out, "--steps", "1"], capsys, str(out), "--out is a file")
    assert out.read_text() == "x"


def test_render_out_is_a_file(tile, tmp_path, capsys):
    out = tmp_path / "renders"
    out.write_text("x")
    refused(["render", tile, "--out", out], capsys, str(out), "--out is a file")
    assert out.read_text() == "x"


def test_bench_out_is_a_folder(tmp_path, capsys):
    refused(["bench", "encode", "--out", tmp_path], capsys, str(tmp_path), "--out is a folder, not a file")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_export_read_only_out_is_refused_before_rendering(tile, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        refused(["export", tile, "--out", ro / "export", "--gsd", "1"], capsys, str(ro / "export"), "not writable")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


# -- export: memory from gsd and extent, before rendering --------------------------------------------
def _tile_extent(tile: Path) -> tuple[float, float]:
    plan = json.loads((tile / "plan.json").read_text())
    cores = np.array([b["core"]["local"] for b in plan["blocks"]])
    return cores[:, 2].max() - cores[:, 0].min(), cores[:, 3].max() - cores[:, 1].min()


def test_export_tiny_gsd_names_the_smallest_gsd_that_fits(tile, tmp_path, capsys):
    line = refused(["export", tile, "--out", tmp_path / "e", "--gsd", "0.001", "--what", "mesh",
                    "--memory-budget-gb", "0.01"], capsys, "--gsd 0.001", "--memory-budget-gb 0.01")
    suggested = float(re.search(r"use --gsd ([0-9.]+) or more", line).group(1))
    # closed form for a heightfield mesh alone, which needs the whole raster: per cell 48 bytes
    # of rendering (one window, and fewer cells than a window here) + 13 of whole maps + 256 of
    # mesh, over (W/g) x (H/g) cells <= 1e7 bytes
    w, h = _tile_extent(tile)
    exact = math.sqrt(w * h * (48 + 13 + 256) / 1e7)
    assert exact <= suggested <= exact * 1.1 + 0.01
    assert not (tmp_path / "e").exists()


def test_export_rasters_need_a_fixed_memory_and_disk_by_size(tile, tmp_path, capsys):
    # rasters are written window by window: no --gsd fits a budget under one window plus
    # GDAL's block cache (256 MB), and the line says to raise the budget
    refused(["export", tile, "--out", tmp_path / "e", "--gsd", "0.5", "--what", "ortho,dsm",
             "--memory-budget-gb", "0.1"], capsys, "--gsd 0.5", "raise --memory-budget-gb")
    # ... while their files still grow with the raster: 1e-5 m cells would not fit on any disk
    line = refused(["export", tile, "--out", tmp_path / "e", "--gsd", "0.00001", "--what", "ortho"], capsys,
                   "--gsd 1e-05", "free there", "use --gsd")
    assert str(tmp_path / "e") in line
    assert not (tmp_path / "e").exists()


def test_export_absurd_gsd_refused_on_any_machine(tile, tmp_path, capsys):
    refused(["export", tile, "--out", tmp_path / "e", "--gsd", "1e-7"], capsys, "--gsd 1e-07", "of RAM available")
    assert not (tmp_path / "e").exists()


def test_export_tsdf_voxel_size_named(tile, tmp_path, capsys):
    refused(["export", tile, "--out", tmp_path / "e", "--what", "mesh", "--mesh-method", "tsdf", "--gsd", "1",
             "--voxel-size", "0.0001", "--memory-budget-gb", "1"], capsys, "--voxel-size 0.0001", "use --voxel-size")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("flag,value,problem", [
    ("--gsd", "0", "> 0"), ("--gsd", "nan", "finite"), ("--gsd", "-0.5", "> 0"), ("--supersample", "0", "in [1, 64]"),
    ("--min-acc", "2", "in [0, 1]"), ("--view-size", "4", "in [8, 16384]"), ("--voxel-size", "-1", "> 0"),
])
def test_export_option_ranges(tile, tmp_path, flag, value, problem, capsys):
    refused(["export", tile, "--out", tmp_path / "e", flag, value], capsys, flag, problem)
    assert not (tmp_path / "e").exists()


# -- training config: flags, dotted overrides, preset files, memory -----------------------------------
@pytest.mark.parametrize("flag,value,problem", [
    ("--steps", "-5", ">= 1"), ("--rays-per-batch", "0", ">= 1"), ("--downscale", "0", ">= 1"),
    ("--threads", "-1", ">= 0"), ("--seed", "-3", ">= 0"), ("--max-seconds", "nan", "finite"),
    ("--device", "tpu", "one of auto, cpu, cuda"),
])
def test_train_flag_ranges(survey, tmp_path, flag, value, problem, capsys):
    refused(["train", "--data", survey, "--out", tmp_path / "run", flag, value], capsys, flag, problem)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,problem", [
    ("field.log2_hashmap_size=40", "in [1, 30]"), ("render.step_size=0", "> 0"), ("optim.lr_grid=inf", "finite"),
    ("field.n_features_per_level=3", "one of 1, 2, 4, 8"), ("error_sampling=1.5", "in [0, 1]"),
    ("field.max_resolution=4", ">= field.base_resolution"),
])
def test_train_dotted_override_ranges(survey, tmp_path, override, problem, capsys):
    key = override.split("=")[0]
    refused(["train", "--data", survey, "--out", tmp_path / "run", "--override", override], capsys, key, problem)
    assert not (tmp_path / "run").exists()


def test_train_preset_file_with_bad_value(survey, tmp_path, capsys):
    preset = tmp_path / "mine.yaml"
    preset.write_text("steps: 100\nrender:\n  grid_resolution: 0\n")
    refused(["train", "--data", survey, "--out", tmp_path / "run", "--preset", preset], capsys, str(preset),
            "render.grid_resolution", ">= 1")
    assert not (tmp_path / "run").exists()


def test_train_hash_table_too_big_names_the_key_and_a_size_that_fits(survey, tmp_path, capsys):
    line = refused(["train", "--data", survey, "--out", tmp_path / "run", "--memory-budget-gb", "4", "--override",
                    "field.n_levels=32", "field.n_features_per_level=8", "field.log2_hashmap_size=30",
                    "field.max_resolution=100000"], capsys, "field.log2_hashmap_size", "--memory-budget-gb 4")
    fit = int(re.search(r"field.log2_hashmap_size <= (\d+) fits", line).group(1))
    # 32 levels of at most 2^L entries x 8 floats x 16 training bytes: L = 19 always fits
    # 4 GB; the finest level alone (2^L entries: 100000^3 cells do not fit the table) rules out L = 25
    assert 19 <= fit < 25
    assert not (tmp_path / "run").exists()


def test_train_tile_flag_ranges(tile, survey, capsys):
    before = snapshot(tile)
    refused(["train-tile", tile, "--data", survey, "--max-parallel", "0"], capsys, "--max-parallel", ">= 1")
    refused(["train-tile", tile, "--data", survey, "--steps", "0"], capsys, "--steps", ">= 1")
    refused(["train-tile", tile, "--data", survey, "--override", "checkpoint_every=0"], capsys, "checkpoint_every",
            ">= 1")
    refused(["train-tile", tile, "--data", survey, "--override", "steps"], capsys, "--override", "KEY=VALUE")
    assert snapshot(tile) == before


def test_train_tile_refuses_the_other_overlap_rule_on_a_resumed_tile(tile, survey, tmp_path, capsys):
    """A tile that started with the split rule keeps it: `--overlap both` is refused in one line
    naming the record and the flag to resume with, nothing rewritten."""
    import json
    import shutil

    resumed = tmp_path / "resumed"
    shutil.copytree(tile, resumed)
    (resumed / "tile_config.json").write_text(json.dumps({"layout": 1, "overlap": "split", "blocks": {}}))
    before = snapshot(resumed)
    refused(["train-tile", resumed, "--data", survey, "--overlap", "both"], capsys, "tile_config.json",
            "overlap pixels 'split'", "--overlap split")
    assert snapshot(resumed) == before


# -- the other commands' numbers ------------------------------------------------------------------
@pytest.mark.parametrize("argv,flag,problem", [
    (["synth", "{tmp}/c", "--seed", "-1"], "--seed", ">= 0"),
    (["ingest", "{tmp}", "--out", "{tmp}/o", "--num-threads", "0"], "--num-threads", ">= 1"),
    (["ingest", "{tmp}", "--out", "{tmp}/o", "--vertical-weight", "nan"], "--vertical-weight", "finite"),
    (["bench", "encode", "--n-points", "0"], "--n-points", ">= 1"),
    (["bench", "render", "--res", "100000x10"], "--res 100000x10", "in [1, 16384]"),
    (["bench", "render", "--stream-budget-gb", "-2"], "--stream-budget-gb", "> 0"),
    (["bench", "render", "--narrow-band", "--survey-views", "0"], "--survey-views", ">= 1"),
    (["render", "{tile}", "--out", "{tmp}/r", "--downscale", "0"], "--downscale", ">= 1"),
    (["render", "{tile}", "--out", "{tmp}/r", "--seam-band", "-1"], "--seam-band", "> 0"),
    (["view", "{tile}", "--width", "0"], "--width", "in [1, 16384]"),
    (["edit", "{tile}", "add", "--op", "scale_height", "--factor", "0"], "--factor", "outside"),
    (["edit", "{tile}", "add", "--op", "raise", "--dz", "inf"], "--dz", "non-finite"),
    (["style", "{tile}", "--named", "sunset", "--steps", "0"], "--steps", ">= 1"),
])
def test_other_commands_option_ranges(tile, tmp_path, argv, flag, problem, capsys):
    before = snapshot(tile)
    argv = [a.format(tmp=tmp_path, tile=tile) for a in argv]
    refused(argv, capsys, flag, problem)
    assert snapshot(tile) == before and list(tmp_path.iterdir()) == []


# -- OS errors that escape a command ---------------------------------------------------------------
@pytest.mark.parametrize("error,problem", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/out/ortho.tif"), "disk full"),
    (PermissionError(errno.EACCES, "Permission denied", "/data/out"), "permission denied"),
    (FileExistsError(errno.EEXIST, "File exists", "/data/out"), "already exists"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/data/out/x"), "is a file, not a folder"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/data/out"), "is a folder, not a file"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/in.json"), "no such file"),
])
def test_os_error_with_a_path_is_one_line(monkeypatch, error, problem, capsys):
    monkeypatch.setitem(cli.COMMANDS, "status", _raising(error))
    refused(["status", "x"], capsys, error.filename, problem)


def _raising(error: BaseException):
    """A stand-in command (one positional, like ``status``) that fails with ``error``."""
    def command(tile_dir: tyro.conf.Positional[Path]) -> None:
        raise error

    return command


def test_os_error_without_a_path_and_other_bugs_keep_their_traceback(monkeypatch):
    for error in (OSError(errno.EIO, "I/O error"), ZeroDivisionError("bug")):
        monkeypatch.setitem(cli.COMMANDS, "status", _raising(error))
        with pytest.raises(type(error)):
            entrypoint(["status", "x"])


# -- through a real process: exit status 2 and one stderr line ---------------------------------------
@pytest.mark.parametrize("argv", [
    ["plan", "--data", "{survey}", "--out", "{tmp}/p", "--blocks", "1000x1000"],
    ["train", "--data", "{survey}", "--out", "{tmp}/run", "--rays-per-batch", "0"],
    ["export", "{tile}", "--out", "{tmp}/e", "--gsd", "0.001", "--memory-budget-gb", "1"],
], ids=["plan-blocks", "train-rays", "export-gsd"])
def test_subprocess_exit_status_and_one_line(survey, tile, tmp_path, argv):
    argv = [a.format(survey=survey, tile=tile, tmp=tmp_path) for a in argv]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "citygen.cli", *argv], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("citygen: error: --"), proc.stderr
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []
