"""Keyboard and mouse input mapped onto the :class:`FlyCamera`, independent of any window
toolkit: the window translates its events into these key names and calls.

Bindings (fly mode):

- W/S forward/back along the view direction, A/D left/right, E/Q up/down (world Z);
- Shift held: ``boost`` times faster; the scroll wheel scales the speed by ``scroll_step``
  per notch (in orbit mode it zooms towards the target instead);
- left-button drag: look around (orbit mode: swing around the target).

A press and release of the left button without dragging is a *click*; clicks go to the
app (picking, measuring, orbit target) through :attr:`Controls.clicks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .camera import FlyCamera

#: key name -> (forward, right, up) unit motion
MOVE_KEYS: dict[str, tuple[float, float, float]] = {
    "w": (1, 0, 0), "s": (-1, 0, 0), "d": (0, 1, 0), "a": (0, -1, 0), "e": (0, 0, 1), "q": (0, 0, -1),
}


@dataclass
class Click:
    """A click in window pixel coordinates (x right, y down)."""

    x: float
    y: float
    button: str  # "left" | "right"


@dataclass
class Controls:
    """Turns input events into camera motion.

    Attributes:
        camera: the camera driven.
        look_sensitivity: degrees of turn per pixel of mouse drag.
        boost: speed factor while Shift is held.
        scroll_step: speed (fly) or distance (orbit) factor per scroll notch.
        drag_threshold: pixels the mouse must travel with a button down to count as a drag.
    """

    camera: FlyCamera
    look_sensitivity: float = 0.2
    boost: float = 4.0
    scroll_step: float = 1.25
    drag_threshold: float = 3.0
    held: set[str] = field(default_factory=set)
    clicks: list[Click] = field(default_factory=list)
    _button: str | None = None
    _press: tuple[float, float] = (0.0, 0.0)
    _last: tuple[float, float] | None = None
    _dragging: bool = False

    # -- keyboard ----------------------------------------------------------------------------
    def key_down(self, key: str) -> None:
        self.held.add(key.lower())

    def key_up(self, key: str) -> None:
        self.held.discard(key.lower())

    @property
    def moving(self) -> bool:
        """True while a movement key is held (the scene is then rendered coarsely)."""
        return any(k in self.held for k in MOVE_KEYS) or self._dragging

    def update(self, dt: float) -> bool:
        """Apply held movement keys for ``dt`` seconds; True when the camera moved."""
        f = r = u = 0.0
        for key, (kf, kr, ku) in MOVE_KEYS.items():
            if key in self.held:
                f, r, u = f + kf, r + kr, u + ku
        if not (f or r or u) or dt <= 0:
            return False
        step = self.camera.speed * dt * (self.boost if "shift" in self.held else 1.0)
        self.camera.move(forward=f * step, right=r * step, up=u * step)
        return True

    # -- mouse --------------------------------------------------------------------------------
    def mouse_down(self, x: float, y: float, button: str = "left") -> None:
        self._button, self._press, self._last, self._dragging = button, (x, y), (x, y), False

    def mouse_move(self, x: float, y: float) -> bool:
        """Pointer moved to (x, y); with the left button down this turns the camera.
        True when the camera moved."""
        if self._button != "left" or self._last is None:
            self._last = (x, y)
            return False
        if not self._dragging and max(abs(x - self._press[0]), abs(y - self._press[1])) < self.drag_threshold:
            return False
        self._dragging = True
        dx, dy = x - self._last[0], y - self._last[1]
        self._last = (x, y)
        # drag right -> turn right (heading grows); drag down -> look down (pitch falls)
        self.camera.turn(dx * self.look_sensitivity, -dy * self.look_sensitivity)
        return bool(dx or dy)

    def mouse_up(self, x: float, y: float, button: str = "left") -> None:
        if self._button == button and not self._dragging:
            self.clicks.append(Click(x, y, button))
        self._button, self._last, self._dragging = None, None, False

    def scroll(self, notches: float) -> None:
        """Scroll wheel: fly mode scales the speed; orbit mode zooms (up = closer)."""
        if self.camera.orbit_target is not None:
            self.camera.zoom(self.scroll_step ** (-notches))
        else:
            self.camera.speed *= self.scroll_step ** notches

    def take_clicks(self) -> list[Click]:
        clicks, self.clicks = self.clicks, []
        return clicks
