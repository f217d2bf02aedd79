"""The desktop window: glfw events -> :class:`~viewer.app.ViewerApp`, drawn with moderngl.

glfw (PyPI ``glfw``, which bundles the library) opens an OpenGL 3.3 core window on X11 or
Wayland; on a machine without a display it runs under Xvfb.  All behaviour lives in the
app; this module only translates events and swaps buffers.
"""

from __future__ import annotations

import numpy as np

from citygen.errors import CitygenError

from .app import ViewerApp


def _glfw():
    try:
        import glfw
    except ImportError:
        raise CitygenError(None, "the viewer window needs glfw: pip install glfw "
                                 "(or render headless with --screenshot)") from None
    return glfw


def _key_name(glfw, key: int) -> str | None:
    if key in (glfw.KEY_LEFT_SHIFT, glfw.KEY_RIGHT_SHIFT):
        return "shift"
    if key == glfw.KEY_ESCAPE:
        return "escape"
    if glfw.KEY_A <= key <= glfw.KEY_Z:
        return chr(ord("a") + key - glfw.KEY_A)
    if glfw.KEY_0 <= key <= glfw.KEY_9:
        return chr(ord("0") + key - glfw.KEY_0)
    return None


class ViewerWindow:
    """A glfw window showing a :class:`ViewerApp`.

    Args:
        app: the viewer.
        title: window title.
        visible: False opens a hidden window (tests).
    """

    def __init__(self, app: ViewerApp, title: str = "citygen viewer", visible: bool = True):
        import moderngl

        glfw = self.glfw = _glfw()
        if not glfw.init():
            raise CitygenError(None, "cannot initialise glfw (no display? run under Xvfb or use --screenshot)")
        glfw.window_hint(glfw.CONTEXT_VERSION_MAJOR, 3)
        glfw.window_hint(glfw.CONTEXT_VERSION_MINOR, 3)
        glfw.window_hint(glfw.OPENGL_PROFILE, glfw.OPENGL_CORE_PROFILE)
        glfw.window_hint(glfw.OPENGL_FORWARD_COMPAT, True)
        glfw.window_hint(glfw.VISIBLE, visible)
        self.window = glfw.create_window(app.size[0], app.size[1], title, None, None)
        if not self.window:
            glfw.terminate()
            raise CitygenError(None, "glfw could not open an OpenGL 3.3 window")
        glfw.make_context_current(self.window)
        glfw.swap_interval(1)
        self.app = app
        self.ctx = moderngl.create_context()
        app.attach_gl(self.ctx)
        fb_w, fb_h = glfw.get_framebuffer_size(self.window)
        app.resize(fb_w, fb_h)
        self._install_callbacks()

    def _install_callbacks(self) -> None:
        glfw, app = self.glfw, self.app
        buttons = {glfw.MOUSE_BUTTON_LEFT: "left", glfw.MOUSE_BUTTON_RIGHT: "right"}

        def on_key(_w, key, _scancode, action, _mods):
            name = _key_name(glfw, key)
            if name is None:
                return
            if action == glfw.PRESS:
                app.key_down(name)
            elif action == glfw.RELEASE:
                app.key_up(name)

        def on_button(w, button, action, _mods):
            if button not in buttons:
                return
            x, y = self._cursor_pixels()
            (app.mouse_down if action == glfw.PRESS else app.mouse_up)(x, y, buttons[button])

        def on_cursor(_w, _x, _y):
            app.mouse_move(*self._cursor_pixels())

        def on_scroll(_w, _dx, dy):
            app.scroll(dy)

        def on_resize(_w, width, height):
            app.resize(width, height)

        glfw.set_key_callback(self.window, on_key)
        glfw.set_mouse_button_callback(self.window, on_button)
        glfw.set_cursor_pos_callback(self.window, on_cursor)
        glfw.set_scroll_callback(self.window, on_scroll)
        glfw.set_framebuffer_size_callback(self.window, on_resize)

    def _cursor_pixels(self) -> tuple[float, float]:
        """Cursor in framebuffer pixels (window coordinates scaled on HiDPI screens)."""
        x, y = self.glfw.get_cursor_pos(self.window)
        win_w, win_h = self.glfw.get_window_size(self.window)
        sx = self.app.size[0] / max(win_w, 1)
        sy = self.app.size[1] / max(win_h, 1)
        return x * sx, y * sy

    def step(self) -> None:
        """One frame: events, update, draw, swap."""
        self.glfw.poll_events()
        self.app.update()
        self.app.draw(self.ctx.screen)
        self.glfw.swap_buffers(self.window)

    def read_rgb(self):
        """The window's current back-buffer content (H, W, 3) uint8, row 0 at the top."""
        w, h = self.app.size
        self.ctx.screen.use()
        raw = np.frombuffer(self.ctx.screen.read(viewport=(0, 0, w, h), components=3, alignment=1), np.uint8)
        return np.ascontiguousarray(raw.reshape(h, w, 3)[::-1])

    @property
    def should_close(self) -> bool:
        return bool(self.glfw.window_should_close(self.window)) or self.app.quit_requested

    def run(self, max_frames: int | None = None) -> None:
        """The event loop (until the window closes, Escape, or ``max_frames``)."""
        n = 0
        while not self.should_close and (max_frames is None or n < max_frames):
            self.step()
            n += 1

    def close(self) -> None:
        self.app.drawer = None
        self.glfw.destroy_window(self.window)
        self.glfw.terminate()
