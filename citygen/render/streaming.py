"""Block streaming for the real-time renderer: an LRU cache of packed blocks on the device under a
byte budget, background loading from disk, frustum culling and level of detail.

A frame never waits on disk: :meth:`BlockCache.begin_frame` admits the blocks whose loads have
finished, schedules loads for the visible blocks that are missing (nearest first, as far as the
budget allows) and returns what is resident now; the frame renders those and reports the rest
as loading.  Loads run in a worker thread: safetensors file -> (pinned) host memory -> device
(a side CUDA stream on GPUs), so the render thread only swaps finished blocks in.

Prefetch: the caller may name the blocks it will need soon (a scripted or recorded path's view
ahead); they load after the visible ones, never evict a visible block, and delay a block that
becomes visible by at most two loads (:meth:`BlockCache.begin_frame`).

Budget: resident bytes plus the bytes of loads in flight never exceed ``budget_bytes``.  To
make room, blocks are evicted in this order: first those outside the view frustum (those no
prefetch asked for, least recently used first; then prefetched ones, needed last first), then
visible blocks farther than the one being loaded (farthest first).  A visible block that
cannot get room stays unloaded (reported as ``deferred``).

Level of detail (:func:`lod_levels`): a hash level whose cells are finer than half a pixel's
footprint cannot be resolved by the pixel (beyond Nyquist), so its features only add
aliasing; it is dropped (its features count as 0).  With the pixel footprint
``s = d / f`` metres at distance ``d`` (``f`` the focal length in pixels) and level ``l``'s cell
``E / scale_l`` (``E`` the block's longest side), level ``l`` is kept when
``scale_l <= oversample * E * f / d`` (``oversample`` = 2: half-pixel cells).  Scales grow
geometrically (``scale_l = base * b**l - 1``), so the count is closed form:
``n = clamp(floor(log((oversample E f / d + 1) / base) / log b) + 1, 1, L)``.  ``d`` is the
distance from the camera to the nearest point of the block's box (the finest detail the block
shows), so the nearest block always renders all its levels when it is close.

Visibility order: blocks are composited front to back in order of the distance from the
camera to their core centres; for the equal rectangles of a block grid (the Voronoi cells of
their centres) this is a valid front-to-back order for every ray.  Each block renders only
its core (clip box), so overlapping margins are not counted twice; the smooth cross-fade
of :mod:`citygen.render.tile` in the margins is not reproduced here.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from dataclasses import field as dc_field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from survey_io import Camera
from survey_io.atomic import atomic_path

from ..cameras import view_bounds
from ..errors import CitygenError
from .realtime import FrameState, PackedField, camera_vector, finish, march, pixel_rect


def lod_levels(level_scales: tuple[float, ...] | list[float], extent: float, focal_px: float, distance: float,
               oversample: float = 2.0) -> int:
    """Hash levels a block at ``distance`` metres needs (module docstring): the levels whose
    scale is at most ``oversample * extent * focal_px / distance``, at least 1."""
    if distance <= 0:
        return len(level_scales)
    limit = oversample * extent * focal_px / distance
    n = sum(1 for s in level_scales if s <= limit)
    return max(1, n)


def save_packed(path: str | Path, packed: PackedField) -> None:
    """Write a packed block as safetensors (atomically)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(packed.tensors(), str(tmp), metadata={"format": "citygen-realtime-block/1"})


def load_packed(path: str | Path) -> PackedField:
    """Read a packed block written by :func:`save_packed` (CPU tensors)."""
    try:
        return PackedField.from_tensors(load_file(str(path)))
    except (OSError, KeyError, ValueError) as err:
        raise CitygenError(path, f"not a packed real-time block ({err})") from None


@dataclass
class BlockInfo:
    """What the cache knows about a block before loading it."""

    id: str
    path: Path | None          # safetensors file (None when ``load`` is given)
    aabb: np.ndarray           # (2, 3) field box, metres
    core: np.ndarray           # (2, 3) clip box rendered by this block
    nbytes: int                # device bytes once resident
    load: Callable[[], PackedField] | None = None  # custom loader (tests, synthetic tiles)


@dataclass
class FrameBlocks:
    """The outcome of :meth:`BlockCache.begin_frame`."""

    resident: list[str]                 # visible and on the device: render these
    loading: list[str]                  # visible, load in flight
    deferred: list[str]                 # visible, no room under the budget
    evicted: list[str] = dc_field(default_factory=list)
    prefetching: list[str] = dc_field(default_factory=list)  # not visible yet, load queued this frame


def frustum_visible(camera: Camera, c2w: np.ndarray, box: np.ndarray, far: float) -> bool:
    """Conservative test: does ``box`` (2, 3) intersect the view frustum (up to ``far`` metres)?

    A box is culled when all 8 corners lie outside one of the frustum's planes (near, far, left,
    right, top, bottom), in camera coordinates (OpenCV: x right, y down, z forward)."""
    m = np.asarray(c2w, dtype=np.float64)
    corners = np.array([[box[i][0], box[j][1], box[k][2]] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    p = (corners - m[:3, 3]) @ m[:3, :3]
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    # Image bounds as slopes: x/z in [-cx/fx, (W-cx)/fx], y/z likewise (widened by the lens).
    x_lo, x_hi, y_lo, y_hi = view_bounds(camera)
    outside = [z <= 0, z >= far, x < x_lo * z, x > x_hi * z, y < y_lo * z, y > y_hi * z]
    return not any(bool(np.all(o)) for o in outside)


def box_distance(point: np.ndarray, box: np.ndarray) -> float:
    """Euclidean distance from ``point`` to the nearest point of ``box`` (0 inside)."""
    return float(np.linalg.norm(np.maximum(np.maximum(box[0] - point, point - box[1]), 0.0)))


class BlockCache:
    """Device-resident packed blocks under a byte budget, loaded in the background (module docstring).

    Args:
        blocks: every block of the tile (id, file, boxes, size).
        budget_bytes: bound on resident + in-flight device bytes.
        device: where blocks live.
    """

    def __init__(self, blocks: list[BlockInfo], budget_bytes: int, device: torch.device | str = "cpu"):
        if budget_bytes <= 0:
            raise CitygenError(None, f"block cache: budget must be positive, got {budget_bytes}")
        self.blocks = {b.id: b for b in blocks}
        self.budget_bytes = int(budget_bytes)
        self.device = torch.device(device)
        self._resident: OrderedDict[str, PackedField] = OrderedDict()  # LRU order: oldest first
        self._inflight: dict[str, int] = {}
        self._done: queue.Queue = queue.Queue()
        self._jobs: queue.Queue = queue.Queue()
        self._errors: dict[str, str] = {}
        self._visible: set[str] = set()
        self._soon: dict[str, int] = {}      # prefetch order of this frame (blocks not visible)
        self._lock = threading.Lock()
        self.load_seconds: list[float] = []
        self.max_prefetch_inflight = 2
        self._start_loader()

    def _start_loader(self) -> None:
        """Start the background loader (a subclass with its own loads, e.g. a simulated clock, overrides)."""
        self._worker = threading.Thread(target=self._work, name="citygen-block-loader", daemon=True)
        self._worker.start()

    def _submit(self, block_id: str) -> None:
        """Queue the load of ``block_id`` (its bytes are already counted in flight)."""
        self._jobs.put(block_id)

    def _poll(self) -> None:
        """Admit every load that has finished."""
        while True:
            try:
                self._admit(self._done.get_nowait())
            except queue.Empty:
                return

    # -- accounting -----------------------------------------------------------------------------
    @property
    def resident_bytes(self) -> int:
        return sum(self.blocks[i].nbytes for i in self._resident)

    @property
    def inflight_bytes(self) -> int:
        return sum(self._inflight.values())

    def resident_ids(self) -> list[str]:
        """Resident blocks, least recently used first."""
        return list(self._resident)

    def inflight_ids(self) -> list[str]:
        """Blocks whose load is in flight."""
        return list(self._inflight)

    def get(self, block_id: str) -> PackedField | None:
        """The resident block (marks it used), or None."""
        packed = self._resident.get(block_id)
        if packed is not None:
            self._resident.move_to_end(block_id)
        return packed

    @property
    def errors(self) -> dict[str, str]:
        """Blocks whose load failed, with the reason (they are not retried)."""
        return dict(self._errors)

    # -- background loading ---------------------------------------------------------------------
    def _work(self) -> None:
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        while True:
            block_id = self._jobs.get()
            if block_id is None:
                return
            info = self.blocks[block_id]
            start = time.perf_counter()
            try:
                host = info.load() if info.load is not None else load_packed(info.path)
                host = host.with_view(clip=info.core)
                if stream is not None:
                    with torch.cuda.stream(stream):
                        pinned = {k: getattr(host, k).pin_memory() for k in ("weights", "table", "offsets",
                                                                              "scales", "occ_bits")}
                        device_block = replace(host, **pinned).to(self.device, non_blocking=True)
                    stream.synchronize()
                else:
                    device_block = host.to(self.device)
                self._done.put((block_id, device_block, None, time.perf_counter() - start))
            except Exception as err:  # noqa: BLE001 -- reported per block, the frame goes on
                self._done.put((block_id, None, f"{type(err).__name__}: {err}", time.perf_counter() - start))

    def close(self) -> None:
        """Stop the loader thread (pending loads are dropped)."""
        self._jobs.put(None)
        self._worker.join(timeout=10)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Block until no load is in flight (tests, benchmarks), admitting finished loads."""
        deadline = time.monotonic() + timeout
        while self._inflight and time.monotonic() < deadline:
            try:
                item = self._done.get(timeout=0.05)
            except queue.Empty:
                continue
            self._admit(item)

    def _admit(self, item) -> None:
        block_id, packed, error, seconds = item
        self._inflight.pop(block_id, None)
        self.load_seconds.append(seconds)
        if packed is None:
            self._errors[block_id] = error
        else:
            self._resident[block_id] = packed

    # -- the frame ------------------------------------------------------------------------------
    def _make_room(self, need: int, priority: list[str], rank: int) -> list[str] | None:
        """Evict until ``need`` more bytes fit; None when impossible without evicting visible
        blocks at least as near as ``priority[rank]``.  Blocks outside the view go first: those
        no prefetch asked for (least recently used first), then prefetched ones, the one needed
        last first."""
        evicted = []
        protected = set(priority[:rank + 1])
        rank_of = {b: i for i, b in enumerate(priority)}
        while self.resident_bytes + self.inflight_bytes + need > self.budget_bytes:
            outside = [b for b in self._resident if b not in self._visible]
            if outside:
                victim = min(outside, key=lambda b: (0, 0) if b not in self._soon else (1, -self._soon[b]))
            else:
                farther = [b for b in self._resident if b not in protected]
                if not farther:
                    return None
                victim = max(farther, key=lambda b: rank_of.get(b, len(priority)))
            del self._resident[victim]
            evicted.append(victim)
        return evicted

    def _prefetch_room(self, need: int, keep: set[str]) -> list[str] | None:
        """Room for a prefetch: evict only blocks outside the view and not in ``keep`` (in
        :meth:`_make_room`'s order), and nothing at all unless that frees enough."""
        free = self.budget_bytes - self.resident_bytes - self.inflight_bytes
        victims = []
        order = sorted(self._resident, key=lambda b: (0, 0) if b not in self._soon else (1, -self._soon[b]))
        for b in order:   # blocks no prefetch wants first (least recently used first), then the last needed
            if free >= need:
                break
            if b not in self._visible and b not in keep:
                victims.append(b)
                free += self.blocks[b].nbytes
        if free < need:
            return None
        for b in victims:
            del self._resident[b]
        return victims

    def begin_frame(self, visible: list[str], prefetch: list[str] | tuple[str, ...] = ()) -> FrameBlocks:
        """Start a frame that sees ``visible`` (block ids, nearest first): admit finished loads,
        schedule missing ones within the budget, and return what can be rendered now.

        ``prefetch``: blocks the camera will need soon, soonest first (e.g. those visible from
        the path ahead).  After the visible blocks, up to ``max_prefetch_inflight`` of them load
        in the background, into free room or room of blocks outside the view that no sooner
        prefetch needs.  A prefetch never evicts a visible block; visible loads are queued
        first each frame, so a block that becomes visible later waits behind at most
        ``max_prefetch_inflight`` prefetches."""
        self._poll()
        self._visible = set(visible)
        self._soon = {b: i for i, b in enumerate(prefetch) if b not in self._visible}
        evicted, loading, deferred = [], [], []
        for rank, block_id in enumerate(visible):
            if block_id in self._resident:
                self._resident.move_to_end(block_id)
                continue
            if block_id in self._inflight:
                loading.append(block_id)
                continue
            if block_id in self._errors or block_id not in self.blocks:
                continue
            need = self.blocks[block_id].nbytes
            if need > self.budget_bytes:
                deferred.append(block_id)
                continue
            out = self._make_room(need, visible, rank)
            if out is None:
                deferred.append(block_id)
                continue
            evicted += out
            self._inflight[block_id] = need
            self._submit(block_id)
            loading.append(block_id)
        prefetching = []
        queued = sum(1 for b in self._inflight if b not in self._visible)
        for block_id in (b for b in prefetch if b not in self._visible):
            if queued >= self.max_prefetch_inflight:
                break
            if (block_id in self._resident or block_id in self._inflight or block_id in self._errors
                    or block_id not in self.blocks):
                continue
            need = self.blocks[block_id].nbytes
            out = self._prefetch_room(need, {b for b, r in self._soon.items() if r <= self._soon[block_id]})
            if out is None:
                break          # later prefetches are needed later still: no room for them either
            evicted += out
            self._inflight[block_id] = need
            self._submit(block_id)
            prefetching.append(block_id)
            queued += 1
        resident = [b for b in visible if b in self._resident]
        return FrameBlocks(resident=resident, loading=loading, deferred=deferred, evicted=evicted,
                           prefetching=prefetching)


class StreamingRenderer:
    """Renders a tile of packed blocks through a :class:`BlockCache` with the native kernels.

    Args:
        cache: the block cache.
        module: the real-time build for the cache's device (``citygen.render.realtime.native_module``).
        far: draw distance, metres (blocks beyond are not requested).
        oversample: LOD factor of :func:`lod_levels`.
    """

    def __init__(self, cache: BlockCache, module, far: float = 5000.0, oversample: float = 2.0):
        self.cache = cache
        self.module = module
        self.far = float(far)
        self.oversample = float(oversample)

    def visible_blocks(self, camera: Camera, c2w: np.ndarray) -> list[str]:
        """Blocks in the frustum, nearest core centre first (the compositing order)."""
        eye = np.asarray(c2w, dtype=np.float64)[:3, 3]
        out = []
        for b in self.cache.blocks.values():
            box = np.stack([np.maximum(b.aabb[0], b.core[0]), np.minimum(b.aabb[1], b.core[1])])
            if frustum_visible(camera, c2w, box, self.far):
                out.append((float(np.linalg.norm((box[0] + box[1]) / 2 - eye)), b.id))
        return [b for _, b in sorted(out)]

    @torch.no_grad()
    def render(self, camera: Camera, c2w: np.ndarray, with_semantics: bool = True,
               prefetch: list[str] | tuple[str, ...] = ()) -> dict:
        """One frame from the resident blocks: images plus ``blocks`` (a :class:`FrameBlocks`),
        ``levels`` {block id: active levels} and ``timings`` (seconds).  ``prefetch``: blocks the
        camera will need soon, soonest first (:meth:`BlockCache.begin_frame`)."""
        t0 = time.perf_counter()
        c2w = np.asarray(c2w, dtype=np.float64)
        visible = self.visible_blocks(camera, c2w)
        frame = self.cache.begin_frame(visible, prefetch)
        t1 = time.perf_counter()
        eye = c2w[:3, 3]
        cam = camera_vector(camera, c2w)
        focal = max(camera.fl_x, camera.fl_y)
        state: FrameState | None = None
        levels = {}
        first = None
        for block_id in frame.resident:
            packed = self.cache.get(block_id)
            if packed is None:
                continue
            box = np.stack([np.maximum(packed.aabb[0], packed.clip[0]), np.minimum(packed.aabb[1], packed.clip[1])])
            extent = float((packed.aabb[1] - packed.aabb[0]).max())
            n = lod_levels(packed.level_scales, extent, focal, box_distance(eye, box), self.oversample)
            levels[block_id] = n
            if state is None:
                state = FrameState(camera.width * camera.height, packed.n_classes, self.cache.device, with_semantics)
                first = packed
            march(self.module, state, packed.with_view(n_active_levels=n), cam, camera.width,
                  pixel_rect(camera, c2w, box))
        _sync(self.cache.device)
        t2 = time.perf_counter()
        if state is None:
            H, W = camera.height, camera.width
            images = {"rgb": torch.zeros(H, W, 3), "depth": torch.zeros(H, W), "acc": torch.zeros(H, W),
                      "n_samples": torch.zeros(H, W, dtype=torch.int32)}
        else:
            images = finish(self.module, state, first, cam, camera)
        _sync(self.cache.device)
        t3 = time.perf_counter()
        images.update(blocks=frame, levels=levels,
                      timings={"schedule": t1 - t0, "march": t2 - t1, "finish": t3 - t2, "total": t3 - t0})
        return images


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = ["BlockCache", "BlockInfo", "FrameBlocks", "StreamingRenderer", "box_distance", "frustum_visible",
           "load_packed", "lod_levels", "save_packed"]
