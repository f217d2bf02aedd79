"""Trainer: learning an analytic scene, exact resume, checkpoint errors, evaluation report,
metrics (PSNR/SSIM/mIoU) against independent computations, config presets, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from boxscene import make_box_survey
from PIL import Image

from citygen.cli import entrypoint
from citygen.config import TrainConfig, from_dict, load_config, to_dict
from citygen.errors import CitygenError
from citygen.train import evaluate, load_checkpoint, load_field, train_block
from citygen.train.data import RayDataset, scene_aabb
from citygen.train.metrics import confusion_matrix, psnr, semantic_scores, ssim
from survey_io import read_transforms

SMALL = {"field.n_levels": 6, "field.log2_hashmap_size": 14, "field.max_resolution": 128, "field.hidden_dim": 32,
         "field.semantic_hidden_dim": 32, "render.step_size": 0.4, "render.grid_resolution": 32,
         "optim.warmup_steps": 20, "optim.lr_mlp": 0.01, "render.occupancy_decay": 0.8, "threads": 1,
         "log_every": 50, "checkpoint_every": 10000}


@pytest.fixture(scope="module")
def box_survey(tmp_path_factory) -> Path:
    return make_box_survey(tmp_path_factory.mktemp("boxes"))


@pytest.fixture(scope="module")
def trained(box_survey, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = load_config("tiny", {**SMALL, "steps": 300, "rays_per_batch": 256})
    return train_block(cfg, box_survey, out, progress=False), out


def test_training_learns_the_box_scene(trained):
    result, out = trained
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [50, 100, 150, 200, 250, 300]
    assert {"loss", "psnr_train", "lr", "time", "rays_per_s"} <= set(lines[0])
    assert lines[-1]["loss"] < 0.5 * lines[0]["loss"]
    # held-out views: the analytic scene is learnable to well above the "mean colour" level
    # (about 12 dB here) within 300 steps
    assert result.eval["mean"]["psnr"] > 22.0
    assert result.eval["mean"]["pixel_accuracy"] > 0.85
    assert result.step == 300 and result.checkpoint.exists()
    assert json.loads((out / "config.json").read_text())["steps"] == 300


def test_eval_report_psnr_matches_the_written_png(trained, box_survey):
    _, out = trained
    report = json.loads((out / "eval" / "report.json").read_text())
    survey = read_transforms(box_survey)
    assert [v["name"] for v in report["views"]] == survey.test_names
    for view in report["views"]:
        stem = Path(view["name"]).stem
        rendered = np.asarray(Image.open(out / "eval" / f"{stem}_rgb.png"), dtype=np.float64) / 255
        gt = np.asarray(Image.open(box_survey.parent / view["name"]).convert("RGB"), dtype=np.float64) / 255
        expected = 10 * np.log10(1.0 / np.mean((rendered - gt) ** 2))
        assert view["psnr"] == pytest.approx(expected, abs=1e-6)
        assert (out / "eval" / f"{stem}_depth.png").exists() and (out / "eval" / f"{stem}_semantics.png").exists()
    assert report["mean"]["psnr"] == pytest.approx(np.mean([v["psnr"] for v in report["views"]]))


def test_load_field_renders_like_the_report(trained, box_survey):
    result, out = trained
    field, meta = load_field(out)
    assert meta["step"] == 300 and field.occupancy is not None
    again = evaluate(out, box_survey, out / "eval_again", write_images=False)
    assert again["mean"]["psnr"] == pytest.approx(result.eval["mean"]["psnr"], abs=1e-9)


def _tiny_cfg(steps: int) -> TrainConfig:
    return load_config("tiny", {"field.n_levels": 3, "field.log2_hashmap_size": 10, "field.max_resolution": 32,
                                "field.hidden_dim": 16, "field.semantic_hidden_dim": 16, "field.backend": "torch",
                                "render.step_size": 1.0, "render.grid_resolution": 8,
                                "render.occupancy_update_every": 4, "render.occupancy_cells_per_update": 64,
                                "steps": steps, "rays_per_batch": 32, "checkpoint_every": 6, "log_every": 2,
                                "eval_at_end": False, "threads": 1})


def test_resume_continues_exactly(box_survey, tmp_path):
    straight = train_block(_tiny_cfg(12), box_survey, tmp_path / "straight", progress=False)
    train_block(_tiny_cfg(6), box_survey, tmp_path / "split", progress=False)
    resumed = train_block(_tiny_cfg(12), box_survey, tmp_path / "split", resume=True, progress=False)
    assert straight.step == resumed.step == 12
    a, _ = load_checkpoint(straight.checkpoint)
    b, _ = load_checkpoint(resumed.checkpoint)
    assert a.keys() == b.keys()
    for name in a:
        if name.startswith("rng."):
            continue
        assert torch.equal(a[name], b[name]), name
    # the metrics log of the resumed run matches the straight one line for line (minus timing)
    strip = lambda p: [{k: v for k, v in json.loads(ln).items() if k not in ("time", "cpu_time", "rays_per_s")}
                       for ln in p.read_text().splitlines()]
    assert strip(tmp_path / "split" / "metrics.jsonl") == strip(tmp_path / "straight" / "metrics.jsonl")


def test_resume_without_checkpoint_is_an_error(box_survey, tmp_path):
    with pytest.raises(CitygenError, match="no checkpoint"):
        train_block(_tiny_cfg(2), box_survey, tmp_path / "empty", resume=True, progress=False)


def test_corrupt_checkpoints_name_the_file(box_survey, tmp_path):
    result = train_block(_tiny_cfg(2), box_survey, tmp_path / "run", progress=False)
    sidecar = result.checkpoint
    tensors = sidecar.with_suffix(".safetensors")
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2])                      # truncated
    with pytest.raises(CitygenError) as err:
        load_field(tmp_path / "run")
    assert str(tensors) in str(err.value)
    tensors.write_bytes(b"\x00" * len(data))                          # same size, garbage
    with pytest.raises(CitygenError) as err:
        load_checkpoint(sidecar)
    assert str(tensors) in str(err.value)
    sidecar.write_text("{not json")                                   # broken sidecar
    with pytest.raises(CitygenError) as err:
        load_checkpoint(sidecar)
    assert str(sidecar) in str(err.value)


def test_ray_batch_matches_full_image_rays(box_survey):
    survey = read_transforms(box_survey)
    data = RayDataset(survey, survey.train_images[:3])
    from citygen.render import camera_rays

    cam = survey.cameras[0]
    idx = torch.tensor([0, cam.width * cam.height + 5 * cam.width + 7, data.n_pixels - 1])
    batch = data.batch(idx)
    _, d, _ = camera_rays(cam, survey.train_images[1].c2w)
    torch.testing.assert_close(batch.dirs[1], d[5 * cam.width + 7])
    assert batch.image_index.tolist() == [0, 1, 2]
    gt = np.asarray(Image.open(survey.image_path(survey.train_images[1])).convert("RGB"))
    torch.testing.assert_close(batch.rgb[1], torch.tensor(gt[5, 7] / 255.0, dtype=torch.float32))


def test_derived_aabb_contains_the_scene(box_survey):
    survey = read_transforms(box_survey)
    aabb = scene_aabb(survey, survey.train_images)
    # the tallest box reaches z = 10, the ground is z = 0; boxes span x -12..11, y -12..12
    assert aabb[0, 2] <= 0.0 and 10.0 <= aabb[1, 2] < 15.0
    assert aabb[0, 0] <= -12.0 and aabb[1, 0] >= 11.0 and aabb[0, 1] <= -12.0 and aabb[1, 1] >= 12.0
    no_depth = [type(im)(im.name, im.camera, im.c2w, im.semantics, None) for im in survey.train_images]
    aabb2 = scene_aabb(survey, no_depth)
    assert aabb2[0, 2] < 0.0 and 10.0 < aabb2[1, 2] < 35.0 and aabb2[0, 0] < -12.0 and aabb2[1, 0] > 11.0


# -- metrics --------------------------------------------------------------------------------------
def _ssim_numpy(x: np.ndarray, y: np.ndarray) -> float:
    """Direct windowed SSIM (no separable filters): the reference for the torch version."""
    r = np.arange(11) - 5.0
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5 ** 2))
    g /= g.sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            ma, mb = (g * a).sum(), (g * b).sum()
            va, vb = (g * (a - ma) ** 2).sum(), (g * (b - mb) ** 2).sum()
            cov = (g * (a - ma) * (b - mb)).sum()
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_against_references():
    rng = np.random.default_rng(0)
    x = rng.random((16, 18))
    y = np.clip(x + 0.1 * rng.normal(size=x.shape), 0, 1)
    assert ssim(torch.tensor(x), torch.tensor(x)) == pytest.approx(1.0)
    assert ssim(torch.tensor(x), torch.tensor(y)) == pytest.approx(_ssim_numpy(x, y), abs=1e-9)
    # constant images: the structure term is C2 / C2 = 1, luminance (2ab + C1) / (a^2 + b^2 + C1)
    a, b = 0.3, 0.7
    expected = (2 * a * b + 1e-4) / (a * a + b * b + 1e-4)
    full = lambda v: torch.full((20, 20, 3), v, dtype=torch.float64)
    assert ssim(full(a), full(b)) == pytest.approx(expected, rel=1e-9)


def test_psnr_and_semantic_scores():
    assert psnr(torch.zeros(10), torch.full((10,), 0.1)) == pytest.approx(20.0)
    assert math.isinf(psnr(torch.ones(3), torch.ones(3)))
    gt = torch.tensor([0, 0, 1, 1, 2, 255])
    pred = torch.tensor([0, 1, 1, 1, 0, 2])
    scores = semantic_scores(confusion_matrix(pred, gt, 3))
    assert scores["pixel_accuracy"] == pytest.approx(3 / 5)
    # IoU: class 0: 1 / 3, class 1: 2 / 3, class 2: 0 / 1
    assert scores["miou"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)


# -- config and CLI ---------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny", "block", "city-100km2"])
def test_presets_load_and_round_trip(preset):
    cfg = load_config(preset)
    assert cfg.preset == preset
    assert from_dict(to_dict(cfg)) == cfg


def test_config_overrides_and_errors(tmp_path):
    cfg = load_config("tiny", {"steps": 7, "optim.lr_grid": "0.003", "eval_at_end": "false"})
    assert cfg.steps == 7 and cfg.optim.lr_grid == 0.003 and cfg.eval_at_end is False
    with pytest.raises(CitygenError, match="unknown config key"):
        load_config("tiny", {"optim.nope": 1})
    with pytest.raises(CitygenError, match="no such preset"):
        load_config("nonexistent-preset")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(CitygenError, match="bad.yaml"):
        load_config(bad)


def test_cli_train_and_bad_input(box_survey, tmp_path, capsys):
    out = tmp_path / "cli"
    assert entrypoint(["train", "--data", str(box_survey), "--out", str(out), "--steps", "2",
                       "--rays-per-batch", "64", "--no-eval", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 2 and Path(summary["checkpoint"]).exists()
    assert entrypoint(["train", "--data", str(tmp_path / "missing.json"), "--out", str(out)]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_nerfstudio_registration():
    pytest.importorskip("nerfstudio", reason="nerfstudio is an optional extra and is not installed here")
    from nerfstudio.plugins.registry import discover_methods

    methods, _ = discover_methods()
    assert "citygen-field" in methods


def test_nerfstudio_plugin_is_lazy():
    import importlib
    import importlib.util
    import sys

    before = "nerfstudio" in sys.modules
    module = importlib.import_module("citygen.nerfstudio_plugin")
    assert ("nerfstudio" in sys.modules) == before  # importing the plugin module imports no nerfstudio
    if importlib.util.find_spec("nerfstudio") is None:
        with pytest.raises(ImportError, match="pip install"):
            getattr(module, "citygen_method")  # noqa: B009
