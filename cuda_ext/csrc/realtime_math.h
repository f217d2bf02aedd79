// Per-ray math of the real-time renderer: camera ray, occupancy bitfield lookup, fixed-step march
// with empty-space skipping and early termination, hash encoding of all levels of one point,
// the fused tiny MLPs of a CityField, and front-to-back alpha compositing.
//
// Everything is `__host__ __device__` and free of torch and of the CUDA runtime: the CPU build
// (realtime_cpu.cpp, OpenMP, float storage) and the CUDA build (realtime_cuda.cu, __half storage
// with float accumulation) run this same code.  The packed layouts are written by
// citygen/render/realtime.py (`pack_field`), which documents them; in short:
//
//   weights   one flat buffer of nn.Linear layers, each W (out, in) row-major then b (out), at the
//             offsets of `Layout` (every offset a multiple of 8, so half2 loads stay aligned).
//             The colour MLP's direction/appearance layer is stored for the SH part only; the
//             appearance code is folded into its bias when a frame is packed (one code per block).
//   table     the hash grid's flat parameters (tiny-cuda-nn layout, hashgrid_math.h).
//   occupancy bitfield of the block's OccupancyGrid, cell (i, j, k) -> bit (i*R + j)*R + k (the
//             coarse level, cells as OccupancyGrid.cell_index), then optionally a fine level baked
//             at pack time: per coarse cell a brick of fx*fy*fz bits (realtime_sampling.py).
//   pixel state (carried across blocks, front to back): rgb[3], depth_sum, log_t, sem[C], n_samples.
#pragma once

#include <cmath>
#include <cstdint>

#include "hashgrid_math.h"

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define RT_HD __host__ __device__ __forceinline__
#else
#define RT_HD inline
#endif

namespace realtime {

// Compile-time bounds of the per-thread scratch (registers on the GPU).  The Python packer
// refuses fields beyond them (and the renderer falls back to the torch reference).
constexpr int kMaxWidth = 64;     // hidden widths, encoding dims, geo features
constexpr int kMaxClasses = 16;
constexpr int kMaxSH = 16;        // SH degree <= 4
// A sample whose compositing weight is below this skips the colour and semantic MLPs: its
// contribution to a [0, 1] colour is below 1e-6 (invisible at 8 or even 16 bits per channel).
constexpr float kMinWeight = 1e-6f;

// -- storage loads: float on the CPU, float or __half on the GPU ------------------------------
RT_HD float load(const float* p) { return *p; }
#if defined(__CUDACC__)
RT_HD float load(const __half* p) { return __half2float(*p); }
#endif

// sum_i w[i] * x[i], float accumulation.
template <typename T>
RT_HD float dot(const T* w, const float* x, int n) {
    float acc = 0.0f;
    for (int i = 0; i < n; ++i) acc += load(w + i) * x[i];
    return acc;
}
#if defined(__CUDACC__)
// half2 loads where the row is 4-byte aligned (even offset): two weights per load.
RT_HD float dot(const __half* w, const float* x, int n) {
    float acc = 0.0f;
    int i = 0;
    if ((reinterpret_cast<uintptr_t>(w) & 3u) == 0u) {
        const __half2* w2 = reinterpret_cast<const __half2*>(w);
        for (; i + 1 < n; i += 2) {
            const float2 f = __half22float2(w2[i >> 1]);
            acc += f.x * x[i] + f.y * x[i + 1];
        }
    }
    for (; i < n; ++i) acc += __half2float(w[i]) * x[i];
    return acc;
}
#endif

// Where each layer of a CityField's MLPs lives in the packed weight buffer (element offsets),
// and the widths.  Read from an int32 array in this order (see kLayoutInts).
struct Layout {
    int enc;        // encoding dims (n_levels * F)
    int hidden;     // density / colour hidden width
    int geo;        // geometry features
    int sem_hidden; // semantic hidden width
    int classes;
    int color_layers;  // hidden layers of the colour MLP after the first (color_hidden_layers - 1)
    int sh_dim;     // sh_degree^2
    int off_density1, off_density2, off_color_geo, off_color_cond, off_color_hidden, off_color_out;
    int off_sem1, off_sem2, off_bg_rgb, off_bg_sem, total;
};
constexpr int kLayoutInts = 18;

RT_HD Layout layout_from(const int32_t* a) {
    Layout l;
    l.enc = a[0]; l.hidden = a[1]; l.geo = a[2]; l.sem_hidden = a[3]; l.classes = a[4];
    l.color_layers = a[5]; l.sh_dim = a[6];
    l.off_density1 = a[7]; l.off_density2 = a[8]; l.off_color_geo = a[9]; l.off_color_cond = a[10];
    l.off_color_hidden = a[11]; l.off_color_out = a[12]; l.off_sem1 = a[13]; l.off_sem2 = a[14];
    l.off_bg_rgb = a[15]; l.off_bg_sem = a[16]; l.total = a[17];
    return l;
}

// One block as the march sees it.  Read from a float array (kGeomFloats) and an int array.
struct BlockGeom {
    float aabb_lo[3], aabb_hi[3];   // the field's box (where it is defined)
    float clip_lo[3], clip_hi[3];   // the part of space this block renders (its core in a tile)
    float occ_lo[3], occ_hi[3];     // the occupancy grid's box
    float inv_unit_length;          // CityField's density scale (1/metre per unit)
    float step;                     // marching step, metres
    float log_min_transmittance;    // early termination: stop once log T falls below this
    int occ_res;                    // occupancy cells per axis
    int n_levels;                   // hash levels
    int n_active_levels;            // levels evaluated (level of detail): finer ones count as 0
    int n_features;                 // features per level (2 supported by the kernels)
    int occ_fine[3];                // fine occupancy cells per coarse cell along x, y, z (1, 1, 1: no fine level)
    float norm_extent[3];           // hash-grid coordinates: u = (x - aabb_lo) / norm_extent (CityField.normalize)
};
constexpr int kGeomFloats = 24;
constexpr int kGeomInts = 7;

RT_HD BlockGeom geom_from(const float* f, const int32_t* i) {
    BlockGeom g;
    for (int d = 0; d < 3; ++d) {
        g.aabb_lo[d] = f[d]; g.aabb_hi[d] = f[3 + d];
        g.clip_lo[d] = f[6 + d]; g.clip_hi[d] = f[9 + d];
        g.occ_lo[d] = f[12 + d]; g.occ_hi[d] = f[15 + d];
    }
    g.inv_unit_length = f[18]; g.step = f[19]; g.log_min_transmittance = f[20];
    for (int d = 0; d < 3; ++d) g.norm_extent[d] = f[21 + d];
    g.occ_res = i[0]; g.n_levels = i[1]; g.n_active_levels = i[2]; g.n_features = i[3];
    for (int d = 0; d < 3; ++d) g.occ_fine[d] = i[4 + d];
    return g;
}

// Pinhole camera (OpenCV: x right, y down, z forward): fx, fy, cx, cy, then c2w rows 0..2 (3x4).
struct Camera {
    float fx, fy, cx, cy;
    float c2w[12];
};
constexpr int kCameraFloats = 16;

RT_HD Camera camera_from(const float* f) {
    Camera c;
    c.fx = f[0]; c.fy = f[1]; c.cx = f[2]; c.cy = f[3];
    for (int i = 0; i < 12; ++i) c.c2w[i] = f[4 + i];
    return c;
}

// Ray through the centre of pixel (col, row): origin, unit direction, cosine to the optical axis.
RT_HD void camera_ray(const Camera& c, int col, int row, float* o, float* d, float& z_scale) {
    const float x = ((float)col + 0.5f - c.cx) / c.fx;
    const float y = ((float)row + 0.5f - c.cy) / c.fy;
    const float inv_norm = 1.0f / sqrtf(x * x + y * y + 1.0f);
    const float dc[3] = {x * inv_norm, y * inv_norm, inv_norm};
    for (int r = 0; r < 3; ++r) {
        d[r] = c.c2w[4 * r] * dc[0] + c.c2w[4 * r + 1] * dc[1] + c.c2w[4 * r + 2] * dc[2];
        o[r] = c.c2w[4 * r + 3];
    }
    z_scale = inv_norm;
}

// Slab test (as citygen.render.sampling.intersect_aabb): [t_near, t_far] inside lo..hi, t >= 0.
RT_HD bool intersect_box(const float* o, const float* d, const float* lo, const float* hi, float& t0, float& t1) {
    t0 = 0.0f;
    t1 = INFINITY;
    for (int a = 0; a < 3; ++a) {
        const float da = fabsf(d[a]) < 1e-12f ? 1e-12f : d[a];
        const float inv = 1.0f / da;
        float ta = (lo[a] - o[a]) * inv, tb = (hi[a] - o[a]) * inv;
        if (ta > tb) { const float s = ta; ta = tb; tb = s; }
        t0 = fmaxf(t0, ta);
        t1 = fminf(t1, tb);
    }
    return t1 > t0;
}

// -- occupancy bitfield -------------------------------------------------------------------------
RT_HD bool bit_set(const uint32_t* bits, int64_t cell) { return (bits[cell >> 5] >> (cell & 31)) & 1u; }

// Words of the coarse bitfield: the fine section starts right after it.
RT_HD int64_t coarse_words(const BlockGeom& g) {
    return ((int64_t)g.occ_res * g.occ_res * g.occ_res + 31) >> 5;
}

// Two-level occupancy lookup (citygen/render/realtime_sampling.py documents the bit layout).
// Returns 0 when x lies in an occupied (fine) cell, -1 outside the grid's box, else 1 for an
// empty coarse cell and 2 for an empty fine cell of an occupied coarse one; `ijk` and `res`
// (cells per axis of that level) then name the empty cell, so the march can jump to its exit.
RT_HD int occupancy_lookup(const BlockGeom& g, const uint32_t* bits, const float* x, int* ijk, int* res) {
    const int R = g.occ_res;
    float u[3];
    for (int d = 0; d < 3; ++d) {
        u[d] = (x[d] - g.occ_lo[d]) / (g.occ_hi[d] - g.occ_lo[d]);
        if (!(u[d] >= 0.0f && u[d] <= 1.0f)) return -1;
        const int c = (int)(u[d] * (float)R);
        ijk[d] = c < R - 1 ? c : R - 1;
        res[d] = R;
    }
    const int64_t cell = ((int64_t)ijk[0] * R + ijk[1]) * R + ijk[2];
    if (!bit_set(bits, cell)) return 1;
    const int fx = g.occ_fine[0], fy = g.occ_fine[1], fz = g.occ_fine[2];
    if (fx * fy * fz <= 1) return 0;
    // Fine index on the global fine lattice, kept inside this coarse cell (float rounding at
    // its faces must not pick a neighbour's brick).
    int local = 0;
    for (int d = 0; d < 3; ++d) {
        const int f = g.occ_fine[d];
        int c = (int)(u[d] * (float)(R * f));
        const int first = ijk[d] * f;
        c = c < first ? first : (c > first + f - 1 ? first + f - 1 : c);
        local = local * f + (c - first);
        ijk[d] = c;
        res[d] = R * f;
    }
    const int64_t bit = cell * (int64_t)(fx * fy * fz) + local;
    return bit_set(bits + coarse_words(g), bit) ? 0 : 2;
}

// Distance along the ray at which it leaves cell ijk of a grid with res[a] cells along axis a.
RT_HD float cell_exit(const BlockGeom& g, const int* ijk, const int* res, const float* o, const float* d) {
    float t = INFINITY;
    for (int a = 0; a < 3; ++a) {
        if (fabsf(d[a]) < 1e-12f) continue;
        const float size = (g.occ_hi[a] - g.occ_lo[a]) / (float)res[a];
        const float bound = g.occ_lo[a] + (float)(ijk[a] + (d[a] > 0.0f ? 1 : 0)) * size;
        t = fminf(t, (bound - o[a]) / d[a]);
    }
    return t;
}

// -- hash encoding of all levels of one point ---------------------------------------------------
RT_HD float load_feature(const float* p) { return *p; }
#if defined(__CUDACC__)
RT_HD float load_feature(const __half* p) { return __half2float(*p); }
#endif

// Level-major features of u in [0, 1]^3 for levels < n_active (finer levels are written as 0:
// level of detail).  F = 2 features per level.
template <typename T>
RT_HD void encode_point(const T* table, const int32_t* offsets, const float* scales, int n_levels,
                        int n_active, const float* u, float* out) {
    for (int l = 0; l < n_levels; ++l) {
        if (l >= n_active) {
            out[2 * l] = 0.0f;
            out[2 * l + 1] = 0.0f;
            continue;
        }
        const hashgrid::Level lv = hashgrid::make_level(offsets, scales, (uint32_t)l);
        hashgrid::Corners c;
        hashgrid::cell_corners(lv, u, c);
        const T* level_table = table + (size_t)lv.offset * 2;
        float a0 = 0.0f, a1 = 0.0f;
        for (int k = 0; k < 8; ++k) {
            const T* e = level_table + (size_t)c.index[k] * 2;
            a0 += c.weight[k] * load_feature(e);
            a1 += c.weight[k] * load_feature(e + 1);
        }
        out[2 * l] = a0;
        out[2 * l + 1] = a1;
    }
}

// -- tiny MLPs ----------------------------------------------------------------------------------
// y = W x + b (b optional), ReLU optional.  W (out, in) row-major at w, b right after it.
template <typename T>
RT_HD void dense(const T* w, int n_out, int n_in, const float* x, float* y, bool relu, bool bias = true) {
    const T* b = w + (size_t)n_out * n_in;
    for (int o = 0; o < n_out; ++o) {
        float v = dot(w + (size_t)o * n_in, x, n_in) + (bias ? load(b + o) : 0.0f);
        y[o] = relu ? fmaxf(v, 0.0f) : v;
    }
}

RT_HD float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// Real spherical harmonics (tcnn order and constants, citygen.fields.sh), degree 1..4.
RT_HD void sh_encode(const float* d, int degree, float* out) {
    const float x = d[0], y = d[1], z = d[2];
    out[0] = 0.28209479177387814f;
    if (degree <= 1) return;
    out[1] = -0.48860251190291987f * y;
    out[2] = 0.48860251190291987f * z;
    out[3] = -0.48860251190291987f * x;
    if (degree <= 2) return;
    const float xx = x * x, yy = y * y, zz = z * z, xy = x * y, yz = y * z, xz = x * z;
    out[4] = 1.0925484305920792f * xy;
    out[5] = -1.0925484305920792f * yz;
    out[6] = 0.94617469575755997f * zz - 0.31539156525251999f;
    out[7] = -1.0925484305920792f * xz;
    out[8] = 0.54627421529603959f * (xx - yy);
    if (degree <= 3) return;
    out[9] = 0.59004358992664352f * y * (-3.0f * xx + yy);
    out[10] = 2.8906114426405538f * xy * z;
    out[11] = 0.45704579946446572f * y * (1.0f - 5.0f * zz);
    out[12] = 0.3731763325901154f * z * (5.0f * zz - 3.0f);
    out[13] = 0.45704579946446572f * x * (1.0f - 5.0f * zz);
    out[14] = 1.4453057213202769f * z * (xx - yy);
    out[15] = 0.59004358992664352f * x * (-xx + 3.0f * yy);
}

// The per-ray half of the colour MLP's first layer: W_sh SH(dir) + (b + W_app app), (hidden).
template <typename T>
RT_HD void view_conditioning(const T* w, const Layout& L, const float* dir, float* cond) {
    float sh[kMaxSH];
    const int degree = L.sh_dim == 16 ? 4 : L.sh_dim == 9 ? 3 : L.sh_dim == 4 ? 2 : 1;
    sh_encode(dir, degree, sh);
    dense(w + L.off_color_cond, L.hidden, L.sh_dim, sh, cond, false);
}

// Density (1/metre) and geometry features of an encoded point.
template <typename T>
RT_HD float density(const T* w, const Layout& L, float inv_unit_length, const float* enc, float* geo) {
    float h[kMaxWidth], out[kMaxWidth + 1];
    dense(w + L.off_density1, L.hidden, L.enc, enc, h, true);
    dense(w + L.off_density2, 1 + L.geo, L.hidden, h, out, false);
    for (int i = 0; i < L.geo; ++i) geo[i] = out[1 + i];
    return expf(out[0] - 1.0f) * inv_unit_length;  // trunc_exp's forward is exp
}

// RGB in [0, 1] from geometry features and the ray's view conditioning.
template <typename T>
RT_HD void color(const T* w, const Layout& L, const float* geo, const float* cond, float* rgb) {
    float a[kMaxWidth], b[kMaxWidth];
    dense(w + L.off_color_geo, L.hidden, L.geo, geo, a, false, false);
    for (int i = 0; i < L.hidden; ++i) a[i] = fmaxf(a[i] + cond[i], 0.0f);
    const size_t layer = (size_t)L.hidden * L.hidden + L.hidden;
    for (int k = 0; k < L.color_layers; ++k) {
        dense(w + L.off_color_hidden + k * layer, L.hidden, L.hidden, a, b, true);
        for (int i = 0; i < L.hidden; ++i) a[i] = b[i];
    }
    float out[3];
    dense(w + L.off_color_out, 3, L.hidden, a, out, false);
    for (int c = 0; c < 3; ++c) rgb[c] = sigmoid(out[c]);
}

template <typename T>
RT_HD void semantics(const T* w, const Layout& L, const float* geo, float* logits) {
    float h[kMaxWidth];
    dense(w + L.off_sem1, L.sem_hidden, L.geo, geo, h, true);
    dense(w + L.off_sem2, L.classes, L.sem_hidden, h, logits, false);
}

// -- the march ------------------------------------------------------------------------------------
// Per-pixel state, carried from block to block (front to back).
struct PixelState {
    float* rgb;        // (3)
    float* depth_sum;  // sum w t (metres along the ray)
    float* log_t;      // log transmittance
    float* sem;        // (C)
    int32_t* n_samples;
};

// March one ray through one block, compositing into the pixel state.  Samples sit at
// t_k = t0 + (k + 0.5) step over the block's (box ∩ clip) range, as in the reference renderer;
// samples in empty occupancy cells (coarse, or fine inside an occupied coarse cell) are never
// evaluated, and a run of them is jumped over in one step (to the first sample past the cell's
// exit); the ray stops once log T < log_min_t.
//
// Narrow band (citygen/render/envelope.py): only the samples of that lattice with
// band_lo <= t_k <= band_hi are marched -- the ray's interval inside the block's baked envelope
// (outer shell hit .. inner shell hit + margin).  The lattice stays anchored at the box entry, so
// a banded ray evaluates a subset of the unbanded ray's samples (the torch reference restricted
// to the same interval is the parity check).  band_lo > band_hi (e.g. +inf: the ray misses the
// envelope) marches nothing; the defaults (-inf, +inf) are the whole box.
template <typename T>
RT_HD void march_ray(const T* w, const T* table, const int32_t* offsets, const float* scales,
                     const uint32_t* occ_bits, const Layout& L, const BlockGeom& g, const float* o,
                     const float* d, PixelState& px, float band_lo = -INFINITY, float band_hi = INFINITY) {
    float lo[3], hi[3];
    for (int a = 0; a < 3; ++a) {
        lo[a] = fmaxf(g.aabb_lo[a], g.clip_lo[a]);
        hi[a] = fminf(g.aabb_hi[a], g.clip_hi[a]);
    }
    float t0, t1;
    if (!intersect_box(o, d, lo, hi, t0, t1)) return;
    float log_t = *px.log_t;
    if (log_t <= g.log_min_transmittance) return;
    // Clamp in float before converting: the band's ends may be infinite.
    const float steps_box = ceilf((t1 - t0) / g.step);
    const float k_lo = fmaxf(ceilf((band_lo - t0) / g.step - 0.5f), 0.0f);
    const float k_hi = fminf(floorf((band_hi - t0) / g.step - 0.5f) + 1.0f, steps_box);
    if (!(k_lo < k_hi)) return;
    const int n_steps = (int)k_hi;
    float cond[kMaxWidth];
    bool have_cond = false;
    float rgb[3] = {px.rgb[0], px.rgb[1], px.rgb[2]};
    float depth_sum = *px.depth_sum;
    float sem[kMaxClasses];
    const bool with_sem = px.sem != nullptr;
    if (with_sem)
        for (int i = 0; i < L.classes; ++i) sem[i] = px.sem[i];
    int n = 0;
    int k = (int)k_lo;
    while (k < n_steps) {
        const float t = t0 + ((float)k + 0.5f) * g.step;
        float x[3];
        for (int a = 0; a < 3; ++a) x[a] = o[a] + t * d[a];
        int ijk[3], res[3];
        const int empty = occupancy_lookup(g, occ_bits, x, ijk, res);
        if (empty < 0) { ++k; continue; }
        if (empty > 0) {
            // First sample past the empty (coarse or fine) cell's exit, backed off by one against
            // rounding (that sample is tested again and skipped cheaply if still in this cell).
            const float t_exit = cell_exit(g, ijk, res, o, d);
            const int next = (int)ceilf((t_exit - t0) / g.step - 0.5f) - 1;
            k = next > k + 1 ? next : k + 1;
            continue;
        }
        float u[3];
        for (int a = 0; a < 3; ++a) u[a] = fminf(fmaxf((x[a] - g.aabb_lo[a]) / g.norm_extent[a], 0.0f), 1.0f);
        float enc[kMaxWidth], geo[kMaxWidth];
        encode_point(table, offsets, scales, g.n_levels, g.n_active_levels, u, enc);
        const float sigma = density(w, L, g.inv_unit_length, enc, geo);
        ++n;
        const float tau = sigma * g.step;
        const float weight = expf(log_t) * (1.0f - expf(-tau));
        if (weight > kMinWeight) {
            if (!have_cond) {
                view_conditioning(w, L, d, cond);
                have_cond = true;
            }
            float c[3], logits[kMaxClasses];
            color(w, L, geo, cond, c);
            for (int i = 0; i < 3; ++i) rgb[i] += weight * c[i];
            depth_sum += weight * t;
            if (with_sem) {
                semantics(w, L, geo, logits);
                for (int i = 0; i < L.classes; ++i) sem[i] += weight * logits[i];
            }
        }
        log_t -= tau;
        ++k;
        if (log_t <= g.log_min_transmittance) break;
    }
    for (int i = 0; i < 3; ++i) px.rgb[i] = rgb[i];
    if (with_sem)
        for (int i = 0; i < L.classes; ++i) px.sem[i] = sem[i];
    *px.depth_sum = depth_sum;
    *px.log_t = log_t;
    *px.n_samples += n;
}

// Finish a pixel: the background fills what the blocks left (1 - acc), depth becomes the z-depth
// of the opaque part, semantics get (1 - acc) of the background logits.  `w` holds the
// background layers of one block (Layout.off_bg_rgb, off_bg_sem).
template <typename T>
RT_HD void finish_pixel(const T* w, const Layout& L, const float* d, float z_scale, PixelState& px, float* depth_out) {
    const float acc = 1.0f - expf(*px.log_t);
    float sh[4], logits[3];
    sh_encode(d, 2, sh);
    dense(w + L.off_bg_rgb, 3, 4, sh, logits, false);
    for (int i = 0; i < 3; ++i) px.rgb[i] += (1.0f - acc) * sigmoid(logits[i]);
    *depth_out = *px.depth_sum / fmaxf(acc, 1e-10f) * z_scale;
    if (px.sem != nullptr)
        for (int i = 0; i < L.classes; ++i) px.sem[i] += (1.0f - acc) * load(w + L.off_bg_sem + i);
}

}  // namespace realtime
