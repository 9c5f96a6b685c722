// CPU kernels of 2-D average pooling, forward and input gradient (schemas: csrc/fastnas_ops.cpp), for
// channels_last (NHWC) float32 and float64 tensors; ceil_mode=False, no divisor override.
//
// Why: ATen's channels_last kernels accumulate every window through the output row in memory (a load
// and a store per input pixel and vector) and its backward divides once per (output, input) pair; at
// [64, 16, 32, 32], 3x3, stride 1 they take about 2 ns per element, and the supernets' average pools
// are all of that kind. Here each vector of channels is summed in registers:
//
//   out[b, ho, wo, c] = (sum_{h in rows(ho), w in cols(wo)} in[b, h, w, c]) / count(ho, wo)
//   grad_in[b, h, w, c] = sum_{ho: h in rows(ho)} sum_{wo: w in cols(wo)} grad[b, ho, wo, c] * (1 / count(ho, wo))
//
// with rows(ho) = [ho * sh - ph, ho * sh - ph + KH) clipped to [0, H) (cols likewise) and count the
// window's size: KH * KW with count_include_pad, else the number of pixels inside the input.
//
// The forward sums each window in row-major order and divides, as ATen does (same results). The
// backward is a gather: each input pixel sums the windows that hold it, in (ho, wo) order, by one
// thread: deterministic, independent of the thread count; it differs from ATen's (which divides each
// term) by rounding.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/block_pool.h"
#include "cpu/multiversion.h"
#include "cpu/nhwc.h"

namespace fastnas {
namespace {

constexpr int64_t kRowPixels = 256;  // pixels per parallel task (at least one row)

struct Geometry {
  int64_t B, C, H, W, Ho, Wo, KH, KW, sh, sw, ph, pw;
  bool count_include_pad;
  int64_t xb, xh, xw;  // element strides of the tensor read (input, or output gradient); channels contiguous
};

// The input positions [start, start + n) of window o along one dimension (clipped to the input).
struct Window {
  int64_t start, n;
};

inline Window window(int64_t o, int64_t stride, int64_t pad, int64_t K, int64_t size) {
  const int64_t lo = o * stride - pad;
  const int64_t start = std::max<int64_t>(lo, 0);
  return {start, std::min(lo + K, size) - start};
}

// The windows [start, start + n) along one dimension that hold input position i.
inline Window windows_over(int64_t i, int64_t stride, int64_t pad, int64_t K, int64_t outputs) {
  const int64_t below = i + pad - K;  // window o holds i iff below < o * stride <= i + pad
  const int64_t start = below < 0 ? 0 : below / stride + 1;
  const int64_t end = std::min(outputs, (i + pad) / stride + 1);
  return {start, std::max<int64_t>(end - start, 0)};
}

// Output pixels processed side by side with NV vectors of channels each: P * NV independent sums
// (every one alone is a chain of dependent additions).
template <int NV>
constexpr int kPixels = NV >= 3 ? 2 : 8 / NV;

// P output pixels (windows `step` elements apart from src on), NV vectors of channels: each window
// (nh rows, nw columns) summed in row-major order, then divided by count.
template <typename T, int NV, int P>
FASTNAS_INLINE void pool_pixels(const Geometry& g, const T* __restrict src, int64_t step, int64_t nh, int64_t nw,
                                T count, T* __restrict dst) {
  using L = Lanes<T>;
  typename L::V acc[P][NV] = {};
  for (int64_t i = 0; i < nh; ++i) {
    for (int64_t j = 0; j < nw; ++j) {
      const T* p = src + i * g.xh + j * g.xw;
      for (int q = 0; q < P; ++q) {
        for (int v = 0; v < NV; ++v) acc[q][v] += L::load(p + q * step + v * L::kCount);
      }
    }
  }
  for (int q = 0; q < P; ++q) {
    for (int v = 0; v < NV; ++v) L::store(dst + q * g.C + v * L::kCount, acc[q][v] / count);
  }
}

// Q output pixels from wo on, when their windows have the same width (then they lie sw columns
// apart): pooled, true; else false.
template <typename T, int NV, int Q>
FASTNAS_INLINE bool pool_group(const Geometry& g, const T* __restrict x_rows, Window rows, T* __restrict out_row,
                               int64_t wo, int64_t c0) {
  if (wo + Q > g.Wo) return false;
  const Window cols = window(wo, g.sw, g.pw, g.KW, g.W);
  if (Q > 1) {
    const Window last = window(wo + Q - 1, g.sw, g.pw, g.KW, g.W);
    if (last.n != cols.n || last.start != cols.start + (Q - 1) * g.sw) return false;
  }
  const T count = static_cast<T>(g.count_include_pad ? g.KH * g.KW : rows.n * cols.n);
  pool_pixels<T, NV, Q>(g, x_rows + cols.start * g.xw, g.sw * g.xw, rows.n, cols.n, count, out_row + wo * g.C + c0);
  return true;
}

// One output row (image rows `rows` of x_b), the NV vectors of channels from c0: kPixels<NV> pixels
// at a time where their windows have the same width, fewer near the edges.
template <typename T, int NV>
FASTNAS_INLINE void pool_row_block(const Geometry& g, const T* __restrict x_b, Window rows, T* __restrict out_row,
                                   int64_t c0) {
  constexpr int P = kPixels<NV>;
  const T* x_rows = x_b + rows.start * g.xh + c0;
  for (int64_t wo = 0; wo < g.Wo;) {
    if (pool_group<T, NV, P>(g, x_rows, rows, out_row, wo, c0)) {
      wo += P;
    } else if (P > 4 && pool_group<T, NV, 4>(g, x_rows, rows, out_row, wo, c0)) {
      wo += 4;
    } else if (P > 2 && pool_group<T, NV, 2>(g, x_rows, rows, out_row, wo, c0)) {
      wo += 2;
    } else {
      pool_group<T, NV, 1>(g, x_rows, rows, out_row, wo, c0);
      wo += 1;
    }
  }
}

// Output rows [r0, r1) of the flattened (batch, row) index; out is channels_last-contiguous.
template <typename T>
FASTNAS_INLINE void pool_rows_body(const Geometry& g, const T* __restrict x, T* __restrict out, int64_t r0,
                                   int64_t r1) {
  constexpr int64_t W = Lanes<T>::kCount;
  for (int64_t r = r0; r < r1; ++r) {
    const T* x_b = x + (r / g.Ho) * g.xb;
    const Window rows = window(r % g.Ho, g.sh, g.ph, g.KH, g.H);
    T* out_row = out + r * g.Wo * g.C;
    int64_t c0 = 0;
    for (; c0 + kMaxVectors * W <= g.C; c0 += kMaxVectors * W) pool_row_block<T, kMaxVectors>(g, x_b, rows, out_row, c0);
    switch ((g.C - c0) / W) {
      case 3: pool_row_block<T, 3>(g, x_b, rows, out_row, c0); c0 += 3 * W; break;
      case 2: pool_row_block<T, 2>(g, x_b, rows, out_row, c0); c0 += 2 * W; break;
      case 1: pool_row_block<T, 1>(g, x_b, rows, out_row, c0); c0 += W; break;
      default: break;
    }
    if (c0 == g.C) continue;
    for (int64_t wo = 0; wo < g.Wo; ++wo) {  // channels that do not fill a vector
      const Window cols = window(wo, g.sw, g.pw, g.KW, g.W);
      const T count = static_cast<T>(g.count_include_pad ? g.KH * g.KW : rows.n * cols.n);
      const T* src = x_b + rows.start * g.xh + cols.start * g.xw;
      for (int64_t c = c0; c < g.C; ++c) {
        T acc = 0;
        for (int64_t i = 0; i < rows.n; ++i) {
          for (int64_t j = 0; j < cols.n; ++j) acc += src[i * g.xh + j * g.xw + c];
        }
        out_row[wo * g.C + c] = acc / count;
      }
    }
  }
}

// P input pixels (sw columns apart: their windows one output column apart), NV vectors of channels:
// the output gradient of each one's windows (nh rows, nw columns from grad; their scales from scale,
// a row of Wo per window row) weighted and summed in (ho, wo) order.
template <typename T, int NV, int P>
FASTNAS_INLINE void gather_pixels(const Geometry& g, const T* __restrict grad, const T* __restrict scale, int64_t nh,
                                  int64_t nw, T* __restrict dst) {
  using L = Lanes<T>;
  typename L::V acc[P][NV] = {};
  for (int64_t i = 0; i < nh; ++i) {
    for (int64_t j = 0; j < nw; ++j) {
      const T* p = grad + i * g.xh + j * g.xw;
      const T* s = scale + i * g.Wo + j;
      for (int q = 0; q < P; ++q) {
        for (int v = 0; v < NV; ++v) acc[q][v] += L::load(p + q * g.xw + v * L::kCount) * s[q];
      }
    }
  }
  for (int q = 0; q < P; ++q) {
    for (int v = 0; v < NV; ++v) L::store(dst + q * g.sw * g.C + v * L::kCount, acc[q][v]);
  }
}

// Q input pixels from wi on, sw columns apart, when their windows are as many (then they lie one
// output column apart): their gradient gathered, true; else false.
template <typename T, int NV, int Q>
FASTNAS_INLINE bool gather_group(const Geometry& g, const T* __restrict grad_rows, const T* __restrict scale_rows,
                                 Window rows, T* __restrict out_row, int64_t wi, int64_t c0) {
  if (wi + (Q - 1) * g.sw >= g.W) return false;
  const Window cols = windows_over(wi, g.sw, g.pw, g.KW, g.Wo);
  if (Q > 1) {
    const Window last = windows_over(wi + (Q - 1) * g.sw, g.sw, g.pw, g.KW, g.Wo);
    if (last.n != cols.n || last.start != cols.start + Q - 1) return false;
  }
  gather_pixels<T, NV, Q>(g, grad_rows + cols.start * g.xw, scale_rows + cols.start, rows.n, cols.n,
                          out_row + wi * g.C + c0);
  return true;
}

// One input-gradient row (its windows' rows `rows` of grad_b), the NV vectors of channels from c0;
// the columns visited one residue modulo sw at a time, kPixels<NV> at a time where their windows
// are as many, fewer near the edges.
template <typename T, int NV>
FASTNAS_INLINE void gather_row_block(const Geometry& g, const T* __restrict grad_b, const T* __restrict scale,
                                     Window rows, T* __restrict out_row, int64_t c0) {
  constexpr int P = kPixels<NV>;
  const T* grad_rows = grad_b + rows.start * g.xh + c0;
  const T* scale_rows = scale + rows.start * g.Wo;
  for (int64_t first = 0; first < std::min(g.sw, g.W); ++first) {
    for (int64_t wi = first; wi < g.W;) {
      if (gather_group<T, NV, P>(g, grad_rows, scale_rows, rows, out_row, wi, c0)) {
        wi += P * g.sw;
      } else if (P > 4 && gather_group<T, NV, 4>(g, grad_rows, scale_rows, rows, out_row, wi, c0)) {
        wi += 4 * g.sw;
      } else if (P > 2 && gather_group<T, NV, 2>(g, grad_rows, scale_rows, rows, out_row, wi, c0)) {
        wi += 2 * g.sw;
      } else {
        gather_group<T, NV, 1>(g, grad_rows, scale_rows, rows, out_row, wi, c0);
        wi += g.sw;
      }
    }
  }
}

// Input gradient rows [r0, r1) of the flattened (batch, row) index; scale[ho * Wo + wo] = 1 / count.
template <typename T>
FASTNAS_INLINE void gather_rows_body(const Geometry& g, const T* __restrict grad, const T* __restrict scale,
                                     T* __restrict out, int64_t r0, int64_t r1) {
  constexpr int64_t W = Lanes<T>::kCount;
  for (int64_t r = r0; r < r1; ++r) {
    const T* grad_b = grad + (r / g.H) * g.xb;
    const Window rows = windows_over(r % g.H, g.sh, g.ph, g.KH, g.Ho);
    T* out_row = out + r * g.W * g.C;
    int64_t c0 = 0;
    for (; c0 + kMaxVectors * W <= g.C; c0 += kMaxVectors * W) {
      gather_row_block<T, kMaxVectors>(g, grad_b, scale, rows, out_row, c0);
    }
    switch ((g.C - c0) / W) {
      case 3: gather_row_block<T, 3>(g, grad_b, scale, rows, out_row, c0); c0 += 3 * W; break;
      case 2: gather_row_block<T, 2>(g, grad_b, scale, rows, out_row, c0); c0 += 2 * W; break;
      case 1: gather_row_block<T, 1>(g, grad_b, scale, rows, out_row, c0); c0 += W; break;
      default: break;
    }
    if (c0 == g.C) continue;
    for (int64_t wi = 0; wi < g.W; ++wi) {  // channels that do not fill a vector
      const Window cols = windows_over(wi, g.sw, g.pw, g.KW, g.Wo);
      const T* src = grad_b + rows.start * g.xh + cols.start * g.xw;
      const T* s = scale + rows.start * g.Wo + cols.start;
      for (int64_t c = c0; c < g.C; ++c) {
        T acc = 0;
        for (int64_t i = 0; i < rows.n; ++i) {
          for (int64_t j = 0; j < cols.n; ++j) acc += src[i * g.xh + j * g.xw + c] * s[i * g.Wo + j];
        }
        out_row[wi * g.C + c] = acc;
      }
    }
  }
}

FASTNAS_MULTIVERSION void pool_rows(const Geometry& g, const float* x, float* out, int64_t r0, int64_t r1) {
  pool_rows_body(g, x, out, r0, r1);
}
FASTNAS_MULTIVERSION void pool_rows(const Geometry& g, const double* x, double* out, int64_t r0, int64_t r1) {
  pool_rows_body(g, x, out, r0, r1);
}
FASTNAS_MULTIVERSION void gather_rows(const Geometry& g, const float* grad, const float* scale, float* out,
                                      int64_t r0, int64_t r1) {
  gather_rows_body(g, grad, scale, out, r0, r1);
}
FASTNAS_MULTIVERSION void gather_rows(const Geometry& g, const double* grad, const double* scale, double* out,
                                      int64_t r0, int64_t r1) {
  gather_rows_body(g, grad, scale, out, r0, r1);
}

// Checks the geometry shared by both kernels (input_size: the pooled input's shape) and returns it,
// without strides.
Geometry check_geometry(const char* op, at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                        at::IntArrayRef stride, at::IntArrayRef padding, bool count_include_pad) {
  TORCH_CHECK_VALUE(input_size.size() == 4, op, ": the input must be 4-D [B, C, H, W], got ", input_size.size(),
                    " dimensions");
  TORCH_CHECK_VALUE(input_size[0] >= 0 && input_size[1] >= 1 && input_size[2] >= 1 && input_size[3] >= 1, op,
                    ": the input must have at least one channel, row and column, got shape ", input_size);
  const auto k = pair_arg(kernel_size, op, "kernel_size", 1);
  const auto s = pair_arg(stride, op, "stride", 1), p = pair_arg(padding, op, "padding", 0);
  TORCH_CHECK_VALUE(p[0] <= k[0] / 2 && p[1] <= k[1] / 2, op, ": padding must be at most half of kernel_size, got ",
                    padding, " for ", kernel_size);
  Geometry g{};
  g.B = input_size[0], g.C = input_size[1], g.H = input_size[2], g.W = input_size[3];
  g.KH = k[0], g.KW = k[1], g.sh = s[0], g.sw = s[1], g.ph = p[0], g.pw = p[1];
  g.count_include_pad = count_include_pad;
  TORCH_CHECK_VALUE(g.H + 2 * g.ph >= g.KH && g.W + 2 * g.pw >= g.KW, op, ": kernel_size ", kernel_size,
                    " does not fit in the padded input (", g.H + 2 * g.ph, "x", g.W + 2 * g.pw, ")");
  g.Ho = (g.H + 2 * g.ph - g.KH) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.KW) / g.sw + 1;
  return g;
}

void check_tensor(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
                   " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(is_nhwc(t), op, ": ", name, " must be 4-D and channels_last-contiguous, got shape ", t.sizes(),
              " and strides ", t.strides());
}

// A channels_last-contiguous result of `sizes`, from the pool of page-resident blocks (the meta
// tensor only describes the layout).
at::Tensor nhwc_empty(at::IntArrayRef sizes, const at::Tensor& like) {
  return pooled_empty_like(
      at::empty(sizes, like.options().device(at::kMeta).memory_format(at::MemoryFormat::ChannelsLast)));
}

at::Tensor avg_pool2d_nhwc_cpu(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                               at::IntArrayRef padding, bool count_include_pad) {
  const char* op = "fastnas::avg_pool2d_nhwc";
  TORCH_CHECK_VALUE(input.dim() == 4, op, ": input must be 4-D [B, C, H, W], got ", input.dim(), " dimensions");
  check_tensor(op, "input", input);
  Geometry g = check_geometry(op, input.sizes(), kernel_size, stride, padding, count_include_pad);
  g.xb = input.stride(0), g.xh = input.stride(2), g.xw = input.stride(3);
  at::Tensor result = nhwc_empty({g.B, g.C, g.Ho, g.Wo}, input);
  if (result.numel() == 0) return result;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "avg_pool2d_nhwc_cpu", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* out = result.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kRowPixels / g.Wo);
    at::parallel_for(0, g.B * g.Ho, grain, [&](int64_t begin, int64_t end) { pool_rows(g, x, out, begin, end); });
  });
  return result;
}

at::Tensor avg_pool2d_nhwc_backward_cpu(const at::Tensor& grad, at::IntArrayRef input_size,
                                        at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                        bool count_include_pad) {
  const char* op = "fastnas::avg_pool2d_nhwc_backward";
  TORCH_CHECK_VALUE(grad.dim() == 4, op, ": grad must be 4-D [B, C, Ho, Wo], got ", grad.dim(), " dimensions");
  check_tensor(op, "grad", grad);
  Geometry g = check_geometry(op, input_size, kernel_size, stride, padding, count_include_pad);
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef({g.B, g.C, g.Ho, g.Wo}), op, ": grad must have shape ",
                    at::IntArrayRef({g.B, g.C, g.Ho, g.Wo}), " for this input and kernel, got ", grad.sizes());
  g.xb = grad.stride(0), g.xh = grad.stride(2), g.xw = grad.stride(3);
  at::Tensor result = nhwc_empty(input_size, grad);
  if (result.numel() == 0) return result;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "avg_pool2d_nhwc_backward_cpu", [&] {
    std::vector<scalar_t> scale(g.Ho * g.Wo);  // 1 / count of each window
    for (int64_t ho = 0; ho < g.Ho; ++ho) {
      const int64_t rows = window(ho, g.sh, g.ph, g.KH, g.H).n;
      for (int64_t wo = 0; wo < g.Wo; ++wo) {
        const int64_t count = g.count_include_pad ? g.KH * g.KW : rows * window(wo, g.sw, g.pw, g.KW, g.W).n;
        scale[ho * g.Wo + wo] = scalar_t(1) / static_cast<scalar_t>(count);
      }
    }
    const scalar_t* gr = grad.const_data_ptr<scalar_t>();
    scalar_t* out = result.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kRowPixels / g.W);
    at::parallel_for(0, g.B * g.H, grain,
                     [&](int64_t begin, int64_t end) { gather_rows(g, gr, scale.data(), out, begin, end); });
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnas, CPU, m) {
  m.impl("avg_pool2d_nhwc", &avg_pool2d_nhwc_cpu);
  m.impl("avg_pool2d_nhwc_backward", &avg_pool2d_nhwc_backward_cpu);
}

}  // namespace fastnas
