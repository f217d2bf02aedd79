"""One block's training loop: random ray batches, RGB + semantic losses, Adam, occupancy
refreshes, JSONL metrics, atomic checkpoints and exact resume.

Run layout (``out``)::

    config.json          the resolved config
    metrics.jsonl        one line per ``log_every`` steps: step, loss, psnr_train, lr, time (training wall
                         seconds), cpu_time (process CPU seconds), rays_per_s, samples_per_ray, occupied
    checkpoints/         step_XXXXXXX.safetensors + .json (see checkpoint.py)
    eval/                held-out renders and report.json (see evaluate.py)

Exact resume: every random draw of the loop (pixels, jitter, occupancy refresh) comes from
one ``torch.Generator`` whose state is checkpointed with the weights, the optimizer moments
and the occupancy grid, and the learning rate is a pure function of the step.  Resuming
from step k and training to k + m gives the same parameters as training k + m straight
(bitwise with the deterministic torch hash-grid backend on CPU).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from survey_io import IGNORE_LABEL, Survey
from survey_io.atomic import atomic_write_json

from ..config import TrainConfig, to_dict
from ..distributed.lease import hold_block
from ..distributed.state import truncate_metrics
from ..errors import CitygenError
from ..fields.field import gsd_resolutions, norm_extent
from ..nets.lpips import load_lpips
from ..render.volume import render_rays
from ..store.checkpoint import (
    CHECKPOINTS_DIR,
    list_checkpoints,
    load_checkpoint,
    load_module_state,
    optimizer_tensors,
    restore_optimizer,
    save_checkpoint,
)
from ..store.field import build_field
from .data import RayDataset, ground_sample_distance, load_survey, scene_box, select_images
from .error_map import ErrorMap
from .evaluate import evaluate
from .losses import ground_opacity_loss, opacity_entropy, sparse_depth_loss
from .optim import make_optimizer
from .schedule import lr_factor, refresh_occupancy


@dataclass
class TrainResult:
    """What :func:`train_block` produced."""

    out: Path
    checkpoint: Path          # sidecar JSON of the last checkpoint
    step: int
    seconds: float            # training wall time (all sessions of a resumed run)
    metrics_path: Path
    eval: dict[str, Any] | None = None
    box_source: str = "given"  # where the field box's heights came from (see scene_box), "given" if passed


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CitygenError(None, "device 'cuda' requested but torch sees no CUDA device")
    return torch.device(name)




class BlockTrainer:
    """Trains one block's field on a set of survey images.

    Args:
        cfg: the resolved training config.
        survey: the survey (or a ``transforms.json`` path).
        out: run folder.
        image_names: the block's images (None: all training images of the survey).
        aabb: the block's (2, 3) box in the local frame (None: derived, see :func:`scene_box`).
        pixel_masks: per image, the (H, W) bool mask at the training resolution of the pixels
            attributed to this block (tile blocks, :mod:`citygen.tile`); None: every pixel.
    """

    def __init__(self, cfg: TrainConfig, survey: Survey | Path | str, out: Path,
                 image_names: list[str] | None = None, aabb: Any = None,
                 pixel_masks: list[np.ndarray] | None = None):
        self.cfg = cfg
        self.out = Path(out)
        self.survey = load_survey(survey)
        self.device = resolve_device(cfg.device)
        if cfg.threads > 0 and self.device.type == "cpu":
            torch.set_num_threads(cfg.threads)
        images = select_images(self.survey, image_names, "train")
        self.data = RayDataset(self.survey, images, cfg.downscale, self.device, masks=pixel_masks)
        self.box_source = "given"
        if aabb is None:
            aabb, self.box_source = scene_box(self.survey, images, cfg.aabb_margin)
        self.aabb = np.asarray(aabb, dtype=np.float64).reshape(2, 3)
        # with FieldConfig.min_cell_gsd, the grid no finer than the images resolve; the
        # lowered resolutions are the run's config, so its checkpoints rebuild the same grid
        self.gsd_m = ground_sample_distance(self.data.cameras, self.data.c2w.cpu().numpy(), float(self.aabb[0, 2]))
        longest = float(norm_extent(torch.as_tensor(self.aabb), cfg.field.normalization).max())
        base, finest = gsd_resolutions(cfg.field, longest, self.gsd_m)
        if (base, finest) != (cfg.field.base_resolution, cfg.field.max_resolution):
            self.cfg = cfg = copy.deepcopy(cfg)
            cfg.field.base_resolution, cfg.field.max_resolution = base, finest
        self.classes = list(self.survey.classes)
        torch.manual_seed(cfg.seed)  # network initialisation
        self.field = build_field(cfg, self.aabb, len(images), len(self.classes), self.data.camera_positions,
                                 self.device)
        # the march encodes each step in several segment calls: sum their hash-table gradients
        # in one buffer (cuda_ext; other backends ignore the flag)
        self.field.encoding.accumulate_grad_in_place = True
        self.optimizer = make_optimizer(self.field, cfg, self.device)
        self.exposure = None
        if cfg.optim.lr_exposure > 0:
            # per-image colour = A rgb + b, starting at the identity; its own Adam group (no decay)
            eye = torch.eye(3, 4, device=self.device)
            self.exposure = torch.nn.Parameter(eye.repeat(len(images), 1, 1))
            self.optimizer.add_param_group({"params": [self.exposure], "lr": cfg.optim.lr_exposure,
                                            "initial_lr": cfg.optim.lr_exposure, "weight_decay": 0.0,
                                            "name": "exposure", "sparse": False})
        if not 0 <= cfg.error_sampling <= 1 or cfg.error_map_cell < 1:
            raise CitygenError(None, f"error_sampling must be in [0, 1] and error_map_cell >= 1, got "
                                     f"{cfg.error_sampling} and {cfg.error_map_cell}")
        self.error_map = None
        if cfg.error_sampling > 0:
            self.error_map = ErrorMap([(c.width, c.height) for c in self.data.cameras], cfg.error_map_cell,
                                      device=self.device, pixels=self.data.allowed)
            if self.error_map.pixels is not None:  # one list for both samplers (same members, cell order)
                self.data.allowed = self.error_map.pixels
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.step = 0
        #: the step the learning-rate schedule ends at (past it: the final rate); the sharpening
        #: fine-tune (citygen.train.sharpen) sets it to the source run's end
        self.schedule_steps = cfg.steps
        #: an extra factor on the rate, of the steps done since ``lr_extra_from`` (None: 1); the
        #: sharpening fine-tune decays its constant final rate with it
        self.lr_extra: Callable[[int], float] | None = None
        self.lr_extra_from = 0
        self.seconds = 0.0          # training wall time (not loading, checkpoints, evaluation)
        self.cpu_seconds = 0.0      # process CPU time of the same (all threads): robust to a shared machine
        self.checkpoint_dir = self.out / CHECKPOINTS_DIR
        self.metrics_path = self.out / "metrics.jsonl"

    # -- state ---------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        aabb = self.aabb
        return {
            "config": to_dict(self.cfg),
            "georef": self.survey.georef.to_dict(),
            "aabb": aabb.tolist(),
            "box_source": self.box_source,
            "gsd_m": round(self.gsd_m, 4),  # the training images' GSD the grid's finest level follows
            # normalised = (local - offset) / scale, per axis; undo with local = offset + scale * u
            "scale": (aabb[1] - aabb[0]).tolist(),
            "offset": aabb[0].tolist(),
            "classes": self.classes,
            "image_names": [im.name for im in self.data.images],
            "test_names": [n for n in self.survey.test_names],
            "survey_root": str(self.survey.root),
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "numpy_rng": _numpy_state(),
            "optimizer": {"type": "Adam", "groups": optimizer_tensors(self.optimizer)[1]},
            "hash_backend": self.field.encoding.backend,
        }

    def save(self) -> Path:
        tensors = {f"model.{k}": v for k, v in self.field.state_dict().items()}
        tensors.update(optimizer_tensors(self.optimizer)[0])
        tensors["rng.generator"] = self.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        if self.error_map is not None:
            tensors["error_map.error"] = self.error_map.error
        if self.exposure is not None:
            tensors["exposure.affine"] = self.exposure.detach()
        return save_checkpoint(self.checkpoint_dir, self.step, tensors, self.meta())

    def restore(self, path: Path) -> None:
        tensors, meta = load_checkpoint(path, self.device)
        source = Path(path)
        saved = meta.get("config", {}).get("field", {}).get("normalization", "per_axis")
        if saved != self.cfg.field.normalization:
            raise CitygenError(source, f"checkpoint field uses normalization {saved!r}, this config "
                                       f"{self.cfg.field.normalization!r}: resume with the run's own config")
        model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        load_module_state(self.field, model, source, config_note="this field config")
        restore_optimizer(self.optimizer, {k: v for k, v in tensors.items() if k.startswith("optim.")},
                          meta["optimizer"]["groups"], source)
        self.generator.set_state(tensors["rng.generator"].cpu())
        torch.set_rng_state(tensors["rng.torch"].cpu())
        if self.error_map is not None:
            if "error_map.error" not in tensors:
                raise CitygenError(source, "checkpoint has no error map: resume with the run's own config")
            try:
                self.error_map.load_state_dict({"error": tensors["error_map.error"]})
            except ValueError as err:
                raise CitygenError(source, str(err)) from None
        if self.exposure is not None:
            if "exposure.affine" not in tensors or tensors["exposure.affine"].shape != self.exposure.shape:
                raise CitygenError(source, "checkpoint has no per-image exposure of this shape: resume with the "
                                           "run's own config")
            with torch.no_grad():
                self.exposure.copy_(tensors["exposure.affine"])
        _set_numpy_state(meta.get("numpy_rng"))
        self.step = int(meta["step"])
        self.seconds = float(meta.get("seconds", 0.0))
        self.cpu_seconds = float(meta.get("cpu_seconds", 0.0))
        self.aabb = np.asarray(meta["aabb"], dtype=np.float64)
        self.box_source = str(meta.get("box_source", self.box_source))

    @property
    def height(self) -> float:
        """The block's vertical extent (metres): the length unit of the distortion loss."""
        return float(self.aabb[1, 2] - self.aabb[0, 2])

    # -- loop ----------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        factor = lr_factor(self.step, cfg.optim, self.schedule_steps)
        if self.lr_extra is not None:
            factor *= self.lr_extra(self.step - self.lr_extra_from)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * factor
        sparse = self.data.sparse_depth if cfg.optim.sparse_depth_weight > 0 else None
        n_sparse = min(int(round(cfg.sparse_depth_fraction * cfg.rays_per_batch)), cfg.rays_per_batch) \
            if sparse is not None else 0
        n_rest = cfg.rays_per_batch - n_sparse
        if self.error_map is None:
            pixels = self.data.uniform_pixels(n_rest, self.generator)
        else:
            pixels = self.error_map.sample(n_rest, cfg.error_sampling, self.generator)
        if n_sparse:  # the keypoint rays go last: their depth targets line up with the batch's tail
            keypoints = self.data.sparse_depth_draw(n_sparse, self.generator)
            pixels = torch.cat([pixels, sparse.pixel[keypoints]])
        batch = self.data.batch(pixels)
        jitter = torch.rand(cfg.rays_per_batch, generator=self.generator, device=self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = render_rays(self.field, batch.origins, batch.dirs, self.field.appearance_codes(batch.image_index),
                              step_size=cfg.render.step_size, occupancy=self.field.occupancy,
                              z_scale=batch.z_scale, jitter=jitter, segment=cfg.render.segment_samples,
                              min_transmittance=cfg.render.min_transmittance,
                              with_semantics=batch.semantics is not None,
                              distortion_scale=1.0 / self.height if cfg.optim.distortion_weight > 0 else None,
                              alpha_entropy=cfg.optim.alpha_entropy_weight > 0)
        rgb = out["rgb"]
        if self.exposure is not None:
            a = self.exposure[batch.image_index]
            rgb = torch.einsum("rij,rj->ri", a[:, :, :3], rgb.float()) + a[:, :, 3]
        ray_se = (rgb - batch.rgb).square().mean(dim=-1)
        mse = ray_se.mean()
        if self.error_map is not None:
            self.error_map.update(pixels, ray_se)
        loss_rgb = mse if cfg.optim.rgb_loss == "mse" else F.huber_loss(rgb, batch.rgb, delta=0.1)
        loss = loss_rgb
        stats = {"loss_rgb": float(loss_rgb.detach())}
        if batch.semantics is not None and cfg.optim.semantic_weight > 0 and bool((batch.semantics != IGNORE_LABEL).any()):
            ce = F.cross_entropy(out["semantics"], batch.semantics, ignore_index=IGNORE_LABEL)
            loss = loss + cfg.optim.semantic_weight * ce
            stats["loss_semantic"] = float(ce.detach())
        if batch.depth is not None and cfg.optim.depth_weight > 0:
            known = batch.depth > 0
            if bool(known.any()):
                d = F.l1_loss(out["depth"][known], batch.depth[known]) / float(self.aabb[1, 2] - self.aabb[0, 2])
                loss = loss + cfg.optim.depth_weight * d
                stats["loss_depth"] = float(d.detach())
        if n_sparse:
            d = sparse_depth_loss(out["depth"][n_rest:], sparse.depth[keypoints], sparse.weight[keypoints], self.height)
            loss = loss + cfg.optim.sparse_depth_weight * d
            stats["loss_sparse_depth"] = float(d.detach())
        if cfg.optim.ground_opacity_weight > 0:
            clear = ground_opacity_loss(out["acc"])
            loss = loss + cfg.optim.ground_opacity_weight * clear
            stats["loss_ground_opacity"] = float(clear.detach())
        if cfg.optim.entropy_weight > 0:
            loss = loss + cfg.optim.entropy_weight * opacity_entropy(out["acc"])
        if cfg.optim.distortion_weight > 0:
            distortion = out["distortion"].mean()
            loss = loss + cfg.optim.distortion_weight * distortion
            stats["loss_distortion"] = float(distortion.detach())
        if cfg.optim.alpha_entropy_weight > 0:
            alpha_entropy = out["alpha_entropy"].mean()
            loss = loss + cfg.optim.alpha_entropy_weight * alpha_entropy
            stats["loss_alpha_entropy"] = float(alpha_entropy.detach())
        if not bool(torch.isfinite(loss)):
            # one line instead of a NaN field (or the error map's sampler failing a step later);
            # seen with the sharpening fine-tune's entropy at weight 0.03 over 900 steps
            raise CitygenError(self.out, f"training diverged at step {self.step + 1} (the loss is not finite): "
                                         "lower the learning rate or the loss weights")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        refresh_occupancy(self.field, self.step, cfg.render, cfg.render.step_size, self.generator)
        stats.update(loss=float(loss.detach()), psnr_train=-10.0 * math.log10(max(float(mse.detach()), 1e-12)),
                     samples_per_ray=float(out["n_samples"]) / cfg.rays_per_batch, lr=factor * cfg.optim.lr_grid)
        return stats

    def train(self, progress: bool = True) -> Path:
        """Train up to ``cfg.steps``, checkpointing on the way and at the end; returns the last sidecar."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / "config.json", to_dict(cfg))
        truncate_metrics(self.metrics_path, self.step)
        self.field.train()
        last_ckpt = None
        bar = _progress(progress)
        with bar:
            task = bar.add_task("training", total=cfg.steps, completed=self.step)
            window_t, window_steps = time.perf_counter(), 0
            while self.step < cfg.steps:
                t0, c0 = time.perf_counter(), time.process_time()
                stats = self.train_step()
                self.seconds += time.perf_counter() - t0
                self.cpu_seconds += time.process_time() - c0
                window_steps += 1
                if self.step % cfg.log_every == 0 or self.step == cfg.steps or 0 < cfg.max_seconds <= self.seconds:
                    now = time.perf_counter()
                    rays_per_s = window_steps * cfg.rays_per_batch / max(now - window_t, 1e-9)
                    window_t, window_steps = now, 0
                    line = {"step": self.step, **{k: round(v, 6) for k, v in stats.items()},
                            "time": round(self.seconds, 3), "cpu_time": round(self.cpu_seconds, 3),
                            "rays_per_s": round(rays_per_s, 1),
                            "occupied": round(self.field.occupancy.occupied_fraction(), 4)}
                    with open(self.metrics_path, "a") as f:
                        f.write(json.dumps(line) + "\n")
                    bar.update(task, completed=self.step,
                               description=f"psnr {stats['psnr_train']:.2f} dB, {rays_per_s:,.0f} rays/s")
                out_of_time = 0 < cfg.max_seconds <= self.seconds
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps or out_of_time:
                    last_ckpt = self.save()
                if out_of_time:
                    break
        if last_ckpt is None:
            last_ckpt = self.save()
        return last_ckpt


def train_block(config: TrainConfig, data: Path | str | Survey, out: Path, resume: bool = False,
                image_names: list[str] | None = None, aabb: Any = None, progress: bool = True,
                lpips_weights: Path | str | None = None) -> TrainResult:
    """Train one block and (when ``config.eval_at_end``) evaluate it on the held-out views.

    Args:
        config: resolved config (see :func:`citygen.config.load_config`).
        data: a ``transforms.json`` path, its folder, or a :class:`Survey`.
        out: run folder (created).
        resume: continue from the newest checkpoint in ``out/checkpoints`` (exactly).

    Raises:
        BlockHeldError: another live process trains into ``out``.
        image_names: the block's training images (None: all of the survey's training images).
        aabb: the block's (2, 3) box (min xyz, max xyz) in the local frame; None derives it
            (depth maps when present, else the SfM points of ``sparse/0``, else camera footprints on
            z = 0; see ``scene_box``; the source is recorded as ``box_source``).
        progress: show a progress bar.
        lpips_weights: LPIPS weights file for the evaluation (see :mod:`citygen.nets.lpips`);
            read before training, so a bad file fails at once.
    """
    out = Path(out)
    lpips_net = load_lpips(lpips_weights) if config.eval_at_end else None
    trainer = BlockTrainer(config, data, out, image_names, aabb)
    if resume and not list_checkpoints(out / CHECKPOINTS_DIR):
        raise CitygenError(out, "--resume: no checkpoint in this run folder")
    # One trainer per run folder: a second one (or an executor's attempt on a tile block)
    # is refused with the holder's pid, host and start time.  Bad input is caught above,
    # before the folder gets its lock file.
    with hold_block(out, role="citygen train"):
        if resume:
            trainer.restore(out / CHECKPOINTS_DIR)
        ckpt = trainer.train(progress)
        report = None
        if config.eval_at_end and trainer.survey.test_names:
            report = evaluate(ckpt, trainer.survey, out / "eval", lpips_weights=lpips_net)
    return TrainResult(out=out, checkpoint=ckpt, step=trainer.step, seconds=trainer.seconds,
                       metrics_path=trainer.metrics_path, eval=report, box_source=trainer.box_source)


# -- helpers -------------------------------------------------------------------------------------
def _progress(enabled: bool):
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    disable=not enabled, transient=False)


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached)}


def _set_numpy_state(state: dict[str, Any] | None) -> None:
    if state:
        np.random.set_state((state["name"], np.asarray(state["keys"], dtype=np.uint32), state["pos"],
                             state["has_gauss"], state["cached_gaussian"]))
