"""Drawing with moderngl, the same for the window (its default framebuffer) and headless
use (an offscreen framebuffer on an EGL context): the rendered frame in a display mode,
a baked mesh / point cloud, 3D line overlays (block boundaries, measurements) and the HUD.

Frames are uploaded as textures from host memory.  On a GPU the renderer's output already
lives in device memory; mapping a GL pixel buffer into CUDA (CUDA-GL interop) to skip the
round trip is future work for the GPU renderer.
"""

from __future__ import annotations

import time

import numpy as np

from citygen.cameras import world_to_opengl_view
from citygen.errors import CitygenError
from survey_io import Camera

from .colormap import BACKGROUND, CLASS_LUT, EMPTY_ACC, LUT_SIZE, TURBO_LUT, to_uint8
from .display import DisplayMode, Frame
from .hud import Overlay
from .lod import MAX_TRIANGLES, PIXEL_ERROR, DrawList, LodMesh, select, select_all
from .ply import PlyModel

MODE_IDS = {DisplayMode.RGB: 0, DisplayMode.DEPTH: 1, DisplayMode.SEMANTICS: 2}

_COLOR_FUNCTIONS = f"""
uniform sampler2D turbo_lut;
uniform sampler2D class_lut;
uniform float near_d;
uniform float far_d;
const vec3 BACKGROUND = vec3({BACKGROUND[0]:.6f}, {BACKGROUND[1]:.6f}, {BACKGROUND[2]:.6f});
vec3 depth_color(float d) {{
    float t = clamp((1.0 / max(d, 1e-9) - 1.0 / far_d) / (1.0 / near_d - 1.0 / far_d), 0.0, 1.0);
    return texture(turbo_lut, vec2((t * {LUT_SIZE - 1}.0 + 0.5) / {LUT_SIZE}.0, 0.5)).rgb;
}}
vec3 class_color(int id) {{
    return texelFetch(class_lut, ivec2(clamp(id, 0, {LUT_SIZE - 1}), 0), 0).rgb;
}}
"""

FRAME_VS = """
#version 330
in vec2 in_pos;
void main() { gl_Position = vec4(in_pos, 0.0, 1.0); }
"""

FRAME_FS = """
#version 330
uniform sampler2D rgb_tex;
uniform sampler2D depth_tex;   // r: z-depth, g: accumulation
uniform sampler2D class_tex;   // r: class id / 255
uniform int mode;
uniform vec2 viewport;
out vec4 color;
""" + _COLOR_FUNCTIONS + f"""
void main() {{
    // window pixel -> frame texel (frame row 0 is the top of the window)
    vec2 uv = vec2(gl_FragCoord.x / viewport.x, 1.0 - gl_FragCoord.y / viewport.y);
    ivec2 size = textureSize(rgb_tex, 0);
    ivec2 ij = clamp(ivec2(floor(uv * vec2(size))), ivec2(0), size - 1);
    vec2 da = texelFetch(depth_tex, ij, 0).rg;
    bool empty = da.g < {EMPTY_ACC} || !(da.r > 0.0);
    vec3 c;
    if (mode == 0) c = texelFetch(rgb_tex, ij, 0).rgb;
    else if (mode == 1) c = empty ? BACKGROUND : depth_color(da.r);
    else c = empty ? BACKGROUND : class_color(int(texelFetch(class_tex, ij, 0).r * 255.0 + 0.5));
    color = vec4(c, 1.0);
}}
"""

MESH_VS = """
#version 330
uniform mat4 mvp;
uniform mat4 view;
uniform float point_size;
in vec3 in_pos;
in vec3 in_color;
in float in_class;
out vec3 v_color;
out float v_depth;
flat out int v_class;
void main() {
    gl_Position = mvp * vec4(in_pos, 1.0);
    v_depth = -(view * vec4(in_pos, 1.0)).z;
    v_color = in_color;
    v_class = int(in_class + 0.5);
    gl_PointSize = point_size;
}
"""

MESH_FS = """
#version 330
uniform int mode;
in vec3 v_color;
in float v_depth;
flat in int v_class;
out vec4 color;
""" + _COLOR_FUNCTIONS + """
void main() {
    vec3 c;
    if (mode == 0) c = v_color;
    else if (mode == 1) c = depth_color(v_depth);
    else c = class_color(v_class);
    color = vec4(c, 1.0);
}
"""

# the envelope layer in RGB mode (what flying shows): one interpolated colour, no depth or class
# varyings; llvmpipe's cost per fragment grows with what it interpolates
RGB_MESH_VS = """
#version 330
uniform mat4 mvp;
in vec3 in_pos;
in vec3 in_color;
out vec3 v_color;
void main() {
    gl_Position = mvp * vec4(in_pos, 1.0);
    v_color = in_color;
}
"""

RGB_MESH_FS = """
#version 330
in vec3 v_color;
out vec4 color;
void main() { color = vec4(v_color, 1.0); }
"""

LINES_VS = """
#version 330
uniform mat4 mvp;
in vec3 in_pos;
void main() { gl_Position = mvp * vec4(in_pos, 1.0); }
"""

LINES_FS = """
#version 330
uniform vec4 line_color;
out vec4 color;
void main() { color = line_color; }
"""

OVERLAY_VS = """
#version 330
uniform vec4 rect;      // x0, y0, x1, y1 in window pixels, y down
uniform vec2 viewport;
in vec2 in_pos;         // unit square
out vec2 v_uv;
void main() {
    vec2 p = mix(rect.xy, rect.zw, in_pos);
    gl_Position = vec4(2.0 * p.x / viewport.x - 1.0, 1.0 - 2.0 * p.y / viewport.y, 0.0, 1.0);
    v_uv = in_pos;
}
"""

OVERLAY_FS = """
#version 330
uniform sampler2D overlay_tex;
in vec2 v_uv;
out vec4 color;
void main() { color = texture(overlay_tex, v_uv); }
"""


def projection_matrix(camera: Camera, near: float, far: float) -> np.ndarray:
    """OpenGL clip matrix of a pinhole camera (OpenCV intrinsics, y down, pixel-centre
    convention): a point at pixel (u, v) lands on the window pixel (u, v) counted from the top."""
    w, h = camera.width, camera.height
    return np.array([
        [2 * camera.fl_x / w, 0, 1 - 2 * camera.cx / w, 0],
        [0, 2 * camera.fl_y / h, 2 * camera.cy / h - 1, 0],
        [0, 0, -(far + near) / (far - near), -2 * far * near / (far - near)],
        [0, 0, -1, 0],
    ], np.float64)


def view_matrix(c2w: np.ndarray) -> np.ndarray:
    """World -> OpenGL camera (x right, y up, z backward) from an OpenCV camera-to-world."""
    return world_to_opengl_view(c2w)


def linearize_depth(ndc_depth: np.ndarray, near: float, far: float) -> np.ndarray:
    """Depth-buffer values in [0, 1] -> z-depth (metres); 1.0 (cleared) -> 0."""
    d = np.asarray(ndc_depth, np.float64) * 2.0 - 1.0
    z = 2.0 * far * near / ((far + near) - d * (far - near))
    return np.where(np.asarray(ndc_depth) >= 1.0, 0.0, z)


def _mat(m: np.ndarray) -> bytes:
    return np.ascontiguousarray(np.asarray(m, np.float32).T).tobytes()  # GLSL is column-major


class Drawer:
    """GL resources and draw calls on one moderngl context."""

    def __init__(self, ctx):
        import moderngl

        self.ctx = ctx
        self._moderngl = moderngl
        self.frame_prog = ctx.program(vertex_shader=FRAME_VS, fragment_shader=FRAME_FS)
        self.mesh_prog = ctx.program(vertex_shader=MESH_VS, fragment_shader=MESH_FS)
        self.rgb_mesh_prog = ctx.program(vertex_shader=RGB_MESH_VS, fragment_shader=RGB_MESH_FS)
        self.lines_prog = ctx.program(vertex_shader=LINES_VS, fragment_shader=LINES_FS)
        self.overlay_prog = ctx.program(vertex_shader=OVERLAY_VS, fragment_shader=OVERLAY_FS)
        tri = np.array([-1, -1, 3, -1, -1, 3], np.float32)  # one triangle covering the viewport
        self.frame_vao = ctx.vertex_array(self.frame_prog, [(ctx.buffer(tri.tobytes()), "2f", "in_pos")])
        quad = np.array([0, 0, 1, 0, 0, 1, 1, 1], np.float32)
        self.overlay_vao = ctx.vertex_array(self.overlay_prog, [(ctx.buffer(quad.tobytes()), "2f", "in_pos")])
        self.turbo = ctx.texture((LUT_SIZE, 1), 3, TURBO_LUT.astype("f4").tobytes(), dtype="f4")
        self.turbo.filter = (moderngl.LINEAR, moderngl.LINEAR)
        self.turbo.repeat_x = self.turbo.repeat_y = False
        self.classes = ctx.texture((LUT_SIZE, 1), 3, CLASS_LUT.astype("f4").tobytes(), dtype="f4")
        self.classes.filter = (moderngl.NEAREST, moderngl.NEAREST)
        self._frame_tex: dict[str, object] = {}
        self._frame_size: tuple[int, int] | None = None
        self._mesh: tuple | None = None
        self._lod: LodMesh | None = None
        #: what the last draw_mesh of a level-of-detail mesh drew and the seconds its selection took
        self.last_draw: DrawList | None = None
        self.last_select_s = 0.0
        #: level-of-detail settings (viewer.lod); lod=False draws the finest level of every chunk
        #: unculled (the layer before levels of detail: the bench's baseline)
        self.lod, self.pixel_error, self.max_triangles = True, PIXEL_ERROR, MAX_TRIANGLES
        self._cull_back = False
        self._overlay_cache: list = []

    # -- frame ------------------------------------------------------------------------------
    def upload_frame(self, frame: Frame) -> None:
        """Upload a rendered frame (host memory) into the frame textures."""
        h, w = frame.shape
        ctx, mgl = self.ctx, self._moderngl
        if self._frame_size != (w, h):
            for t in self._frame_tex.values():
                t.release()
            self._frame_tex = {
                "rgb": ctx.texture((w, h), 3, dtype="f1"),
                "depth": ctx.texture((w, h), 2, dtype="f4"),
                "class": ctx.texture((w, h), 1, dtype="f1"),
            }
            for t in self._frame_tex.values():
                t.filter = (mgl.NEAREST, mgl.NEAREST)
            self._frame_size = (w, h)
        self._frame_tex["rgb"].write(np.ascontiguousarray(to_uint8(frame.rgb)).tobytes(), alignment=1)
        da = np.stack([frame.depth, frame.acc], axis=-1).astype("f4")
        self._frame_tex["depth"].write(np.ascontiguousarray(da).tobytes())
        ids = frame.class_ids if frame.class_ids is not None else np.zeros((h, w), np.uint8)
        self._frame_tex["class"].write(np.ascontiguousarray(ids.astype(np.uint8)).tobytes(), alignment=1)

    def _color_uniforms(self, prog, near_far: tuple[float, float]) -> None:
        self.turbo.use(location=3)
        self.classes.use(location=4)
        prog["turbo_lut"].value = 3
        prog["class_lut"].value = 4
        prog["near_d"].value = float(near_far[0])
        prog["far_d"].value = float(near_far[1])

    def draw_frame(self, viewport: tuple[int, int], mode: DisplayMode, near_far: tuple[float, float]) -> None:
        """Fill the viewport with the uploaded frame in ``mode``."""
        if not self._frame_tex:
            return
        p = self.frame_prog
        for unit, name in enumerate(("rgb", "depth", "class")):
            self._frame_tex[name].use(location=unit)
            p[f"{name}_tex"].value = unit
        self._color_uniforms(p, near_far)
        p["mode"].value = MODE_IDS[DisplayMode(mode)]
        p["viewport"].value = tuple(float(v) for v in viewport)
        self.ctx.disable(self._moderngl.DEPTH_TEST | self._moderngl.BLEND)
        self.frame_vao.render(self._moderngl.TRIANGLES)

    # -- baked preview ------------------------------------------------------------------------
    def set_mesh(self, model: PlyModel | LodMesh, cull_back: bool = False) -> None:
        """Upload a baked model, once (frames only issue draw calls).  ``cull_back``: its
        triangles are oriented (counter-clockwise seen from outside, the envelope's shells) and
        closed, so faces turned away are skipped: about half the fragments and all the hidden far
        sides.  A :class:`~viewer.lod.LodMesh` (the envelope layer) uploads all its levels; each
        frame then draws the chunks in view at their level (:func:`viewer.lod.select`)."""
        ctx = self.ctx
        self._cull_back = bool(cull_back)
        self._lod = model if isinstance(model, LodMesh) else None
        n = len(model.positions)
        colors = model.colors if model.colors is not None else np.full((n, 3), 200, np.uint8)
        classes = model.classes if model.classes is not None else np.full(n, 255, np.uint8)
        vbo = ctx.buffer(np.ascontiguousarray(model.positions, np.float32).tobytes())
        cbo = ctx.buffer(np.ascontiguousarray(colors, np.uint8).tobytes())
        kbo = ctx.buffer(np.ascontiguousarray(classes.astype(np.float32)).tobytes())
        if self._lod is not None:
            ibo = ctx.buffer(np.ascontiguousarray(self._lod.indices, np.int32).tobytes())
        else:
            ibo = ctx.buffer(np.ascontiguousarray(model.faces, np.int32).tobytes()) if model.is_mesh else None
        vao = ctx.vertex_array(self.mesh_prog, [(vbo, "3f", "in_pos"), (cbo, "3f1", "in_color"),
                                                (kbo, "1f", "in_class")], index_buffer=ibo, index_element_size=4)
        rgb_vao = ctx.vertex_array(self.rgb_mesh_prog, [(vbo, "3f", "in_pos"), (cbo, "3f1", "in_color")],
                                   index_buffer=ibo, index_element_size=4)
        self._mesh = (vao, model.is_mesh, rgb_vao)

    def draw_mesh(self, camera: Camera, c2w: np.ndarray, near: float, far: float, mode: DisplayMode,
                  near_far_colors: tuple[float, float], point_size: float = 2.0) -> None:
        """Draw the baked model with a depth test (the framebuffer needs a depth attachment)."""
        if self._mesh is None:
            return
        mgl = self._moderngl
        vao, is_mesh, rgb_vao = self._mesh
        view = view_matrix(c2w)
        clip = projection_matrix(camera, near, far) @ view
        if is_mesh and DisplayMode(mode) is DisplayMode.RGB:
            vao = rgb_vao
            self.rgb_mesh_prog["mvp"].write(_mat(clip))
        else:
            p = self.mesh_prog
            p["mvp"].write(_mat(clip))
            p["view"].write(_mat(view))
            p["point_size"].value = float(point_size)
            p["mode"].value = MODE_IDS[DisplayMode(mode)]
            self._color_uniforms(p, near_far_colors)
        self.ctx.enable(mgl.DEPTH_TEST | mgl.PROGRAM_POINT_SIZE)
        self.ctx.disable(mgl.BLEND | mgl.CULL_FACE)
        if self._cull_back and is_mesh:
            # the view and projection keep handedness: counter-clockwise seen from outside stays
            # counter-clockwise in the window (GL's default front face)
            self.ctx.front_face = "ccw"
            self.ctx.enable(mgl.CULL_FACE)
        if self._lod is not None:
            t0 = time.perf_counter()
            if self.lod:
                self.last_draw = select(self._lod, clip, np.asarray(c2w, np.float64)[:3, 3], float(camera.fl_y),
                                        self.pixel_error, self.max_triangles)
            else:
                self.last_draw = select_all(self._lod)
            self.last_select_s = time.perf_counter() - t0
            for first, count in self.last_draw.ranges:
                vao.render(mgl.TRIANGLES, vertices=count, first=first)
        else:
            vao.render(mgl.TRIANGLES if is_mesh else mgl.POINTS)
        self.ctx.disable(mgl.DEPTH_TEST | mgl.CULL_FACE)

    # -- lines and HUD ------------------------------------------------------------------------
    def draw_lines(self, segments: np.ndarray, camera: Camera, c2w: np.ndarray, near: float, far: float,
                   color: tuple[float, float, float, float]) -> None:
        """3D segments (N, 2, 3), drawn over everything (no depth test); GL clips them at the
        near plane, so segments passing behind the camera stay correct."""
        if segments is None or len(segments) == 0:
            return
        mgl = self._moderngl
        buf = self.ctx.buffer(np.ascontiguousarray(segments, np.float32).tobytes())
        vao = self.ctx.vertex_array(self.lines_prog, [(buf, "3f", "in_pos")])
        self.lines_prog["mvp"].write(_mat(projection_matrix(camera, near, far) @ view_matrix(c2w)))
        self.lines_prog["line_color"].value = tuple(float(c) for c in color)
        self.ctx.disable(mgl.DEPTH_TEST | mgl.BLEND)
        vao.render(mgl.LINES)
        vao.release()
        buf.release()

    def draw_overlays(self, overlays: list[Overlay] | None, viewport: tuple[int, int]) -> None:
        """Alpha-blend RGBA overlays at their window rectangles; None draws the ones uploaded by
        the previous call again (no upload: the HUD between its refreshes while flying)."""
        mgl = self._moderngl
        if overlays is not None:
            for t, _ in self._overlay_cache:
                t.release()
            self._overlay_cache = []
            for o in overlays:
                h, w = o.image.shape[:2]
                tex = self.ctx.texture((w, h), 4, np.ascontiguousarray(o.image).tobytes(), dtype="f1")
                tex.filter = (mgl.NEAREST, mgl.NEAREST)
                self._overlay_cache.append((tex, tuple(float(v) for v in o.rect)))
        self.ctx.enable(mgl.BLEND)
        self.ctx.blend_func = mgl.SRC_ALPHA, mgl.ONE_MINUS_SRC_ALPHA
        self.ctx.disable(mgl.DEPTH_TEST)
        p = self.overlay_prog
        p["viewport"].value = tuple(float(v) for v in viewport)
        for tex, rect in self._overlay_cache:
            tex.use(location=5)
            p["overlay_tex"].value = 5
            p["rect"].value = rect
            self.overlay_vao.render(mgl.TRIANGLE_STRIP)
        self.ctx.disable(mgl.BLEND)


class Offscreen:
    """An offscreen colour + depth framebuffer of a given size on a context."""

    def __init__(self, ctx, size: tuple[int, int]):
        self.ctx = ctx
        self.size = (int(size[0]), int(size[1]))
        self.color = ctx.renderbuffer(self.size, 4)
        self.depth = ctx.depth_texture(self.size)
        self.fbo = ctx.framebuffer(color_attachments=[self.color], depth_attachment=self.depth)

    def read_rgb(self) -> np.ndarray:
        """(H, W, 3) uint8, row 0 at the top."""
        w, h = self.size
        raw = np.frombuffer(self.fbo.read(components=3, alignment=1), np.uint8).reshape(h, w, 3)
        return np.ascontiguousarray(raw[::-1])

    def read_depth(self) -> np.ndarray:
        """(H, W) depth-buffer values in [0, 1], row 0 at the top."""
        w, h = self.size
        raw = np.frombuffer(self.depth.read(alignment=1), np.float32).reshape(h, w)
        return np.ascontiguousarray(raw[::-1])

    def release(self) -> None:
        for r in (self.fbo, self.color, self.depth):
            r.release()


def create_headless_context():
    """A standalone OpenGL 3.3+ context without a display (EGL; Mesa llvmpipe on CPUs)."""
    import moderngl

    try:
        return moderngl.create_standalone_context(backend="egl")
    except Exception as err:  # noqa: BLE001 - moderngl raises plain Exceptions for missing EGL
        raise CitygenError(None, f"cannot create a headless OpenGL context with EGL ({err}); install "
                                 "libegl1 libegl-mesa0 libgl1-mesa-dri libgles2") from None
