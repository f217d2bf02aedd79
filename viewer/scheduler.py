"""Progressive rendering: what to render this frame, decided without GL or a renderer.

A neural tile on a CPU renders a full window in seconds, so the viewer renders coarsely
while the camera moves and refines when it rests:

1. the view changed: render the whole image at the *interactive* scale, the smallest
   downscale factor (from :attr:`RenderScheduler.scales`) whose estimated time fits
   ``frame_budget`` at the measured throughput;
2. the view has rested ``rest_delay`` seconds: halve the scale pass by pass down to 1;
   each pass is cut into row bands that fit ``frame_budget``, so input stays responsive
   and a pass can be abandoned as soon as the camera moves again.

The app runs the jobs and reports their timings back (:meth:`RenderScheduler.report`),
which keeps the throughput estimate (rays per second) current.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RenderJob:
    """Render rows ``[row0, row1)`` of the image at ``1/scale`` resolution (size ``width`` x
    ``height``); ``new_pass`` marks the first band of a pass."""

    scale: int
    width: int
    height: int
    row0: int
    row1: int
    new_pass: bool

    @property
    def n_rays(self) -> int:
        return self.width * (self.row1 - self.row0)


def scaled_size(width: int, height: int, scale: int) -> tuple[int, int]:
    return max(1, math.ceil(width / scale)), max(1, math.ceil(height / scale))


@dataclass
class RenderScheduler:
    """Decides the render jobs of each frame.

    Attributes:
        frame_budget: seconds of rendering per displayed frame.
        rest_delay: seconds the view must be still before refinement starts.
        scales: allowed downscale factors, ascending, starting at 1.
        max_interactive_scale: cap of the interactive scale.
        throughput: current estimate of rays per second (None until the first report).
    """

    frame_budget: float = 1.0 / 15.0
    rest_delay: float = 0.2
    scales: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    max_interactive_scale: int = 32
    throughput: float | None = None
    _view: tuple | None = None
    _changed_at: float = 0.0
    _scale: int | None = None        # scale of the pass in progress / last finished
    _next_row: int = 0
    _pass_done: bool = False
    _size: tuple[int, int] = (0, 0)
    history: list[RenderJob] = field(default_factory=list, repr=False)

    def interactive_scale(self, width: int, height: int) -> int:
        """Smallest allowed scale whose whole-image render fits the frame budget."""
        allowed = [s for s in self.scales if s <= self.max_interactive_scale]
        if self.throughput is None:
            return allowed[-1]
        for s in allowed:
            w, h = scaled_size(width, height, s)
            if w * h / self.throughput <= self.frame_budget:
                return s
        return allowed[-1]

    @property
    def done(self) -> bool:
        """True when the current view is shown at full resolution."""
        return self._scale == 1 and self._pass_done

    @property
    def scale(self) -> int | None:
        return self._scale

    @property
    def progress(self) -> float:
        """Share (0..1) of the rays from the interactive pass down to full resolution rendered so
        far for the current view (the full-resolution pass is 3/4 of them): 1.0 when done."""
        if self._scale is None:
            return 0.0
        if self.done:
            return 1.0
        w, h = self._size
        passes = [s for s in self.scales if s <= max(self._scale, self.interactive_scale(w, h))]
        rays = {s: scaled_size(w, h, s)[0] * scaled_size(w, h, s)[1] for s in passes}
        pw, ph = scaled_size(w, h, self._scale)
        done = sum(n for s, n in rays.items() if s > self._scale) + pw * (ph if self._pass_done else self._next_row)
        return min(1.0, done / sum(rays.values()))

    def invalidate(self) -> None:
        """Force a fresh pass on the next frame (the scene or the edits changed)."""
        self._view = None

    def refine_now(self) -> None:
        """Skip the resting delay: the next call refines at once."""
        self._changed_at = -math.inf

    def next_job(self, now: float, view: tuple, width: int, height: int) -> RenderJob | None:
        """The job to run this frame, or None (nothing to do, or resting before refinement).

        ``view`` is any hashable summary of the camera; a new value starts a new pass.
        """
        view = (view, width, height)
        if view != self._view:
            self._view, self._changed_at, self._size = view, now, (width, height)
            return self._start_pass(self.interactive_scale(width, height))
        if not self._pass_done:
            return self._band()
        if self._scale == 1 or now - self._changed_at < self.rest_delay:
            return None
        finer = [s for s in self.scales if s < self._scale]
        return self._start_pass(finer[-1])

    def report(self, job: RenderJob, seconds: float) -> None:
        """A job took ``seconds``: update the throughput estimate (exponential average)."""
        if seconds <= 0:
            return
        rate = job.n_rays / seconds
        self.throughput = rate if self.throughput is None else 0.5 * self.throughput + 0.5 * rate

    # -- internals -------------------------------------------------------------------------
    def _start_pass(self, scale: int) -> RenderJob:
        self._scale, self._next_row, self._pass_done = scale, 0, False
        job = self._band(new_pass=True)
        return job

    def _band(self, new_pass: bool = False) -> RenderJob:
        w, h = scaled_size(*self._size, self._scale)
        if new_pass and self._scale == self.interactive_scale(*self._size):
            rows = h  # the interactive pass is sized to fit the budget as a whole
        elif self.throughput is None:
            rows = h
        else:
            rows = max(1, int(self.frame_budget * self.throughput / w))
        row0 = self._next_row
        row1 = min(h, row0 + rows)
        self._next_row = row1
        self._pass_done = row1 >= h
        job = RenderJob(self._scale, w, h, row0, row1, new_pass)
        self.history.append(job)
        del self.history[:-64]
        return job
