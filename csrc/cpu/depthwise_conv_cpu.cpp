// CPU kernels of the depthwise convolution's backward (schemas: csrc/fastnas_ops.cpp), for channels_last
// (NHWC) float32 and float64 tensors.
//
// Why: oneDNN's depthwise backward on x86 has fast kernels only for some shapes; for 5x5 and for
// dilated kernels its weight gradient (and the dilated input gradient) is an order of magnitude slower
// than the forward (benchmarks/RESULTS.md), and DARTS's sep/dil convs are all of that kind. Here both gradients are direct loops vectorised along
// the channels, which are contiguous in NHWC:
//
//   grad_weight[c, kh, kw] = sum_{b, ho, wo} grad[b, ho, wo, c] * input[b, ho*sh - ph + kh*dh, wo*sw - pw + kw*dw, c]
//   grad_input[b, hi, wi, c] = sum_{kh, kw: hi = ho*sh - ph + kh*dh, wi = wo*sw - pw + kw*dw} grad[b, ho, wo, c] * weight[c, kh, kw]
//
// Deterministic: the weight gradient is summed per fixed chunk of output rows (chunks depend on the
// shape only, not on the thread count), then over chunks in index order in double; each input
// gradient is summed by one thread over its taps in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <cstdint>
#include <vector>

#include "cpu/block_pool.h"
#include "cpu/multiversion.h"
#include "cpu/nhwc.h"

namespace fastnas {
namespace {

constexpr int64_t kChunkPixels = 256;   // output pixels per partial sum of the weight gradient (at least)

struct Geometry {
  int64_t B, C, H, W, Ho, Wo, KH, KW, sh, sw, ph, pw, dh, dw;
  int64_t xb, xh, xw;  // element strides of the input (batch, row, column); channels are contiguous
  int64_t gb, gh, gw;  // element strides of the output gradient
};

// The output columns [lo, hi) whose tap kw lands inside the input row: wi = wo * sw - pw + kw * dw.
inline void valid_columns(const Geometry& g, int64_t kw, int64_t* lo, int64_t* hi) {
  const int64_t shift = g.pw - kw * g.dw;  // wi = wo * sw - shift
  *lo = shift <= 0 ? 0 : (shift + g.sw - 1) / g.sw;
  const int64_t top = g.W - 1 + shift;
  *hi = top < 0 ? 0 : std::min(g.Wo, top / g.sw + 1);
}

// Weight gradient of NV vectors of channels from c0, tap (kh, kw), image b, output rows [h0, h1):
// two independent sums (even and odd columns) per vector, added at the end.
template <typename T, int NV>
FASTNAS_INLINE void weight_grad_tap(const Geometry& g, const T* __restrict x, const T* __restrict grad,
                                    T* __restrict out, int64_t b, int64_t h0, int64_t h1, int64_t kh, int64_t kw,
                                    int64_t c0) {
  using L = Lanes<T>;
  typename L::V acc[2][NV] = {};
  int64_t lo, hi;
  valid_columns(g, kw, &lo, &hi);
  const int64_t xstep = g.sw * g.xw;
  for (int64_t ho = h0; ho < h1; ++ho) {
    const int64_t row = ho * g.sh - g.ph + kh * g.dh;
    if (row < 0 || row >= g.H) continue;
    const T* gp = grad + b * g.gb + ho * g.gh + lo * g.gw + c0;
    const T* xp = x + b * g.xb + row * g.xh + (lo * g.sw + kw * g.dw - g.pw) * g.xw + c0;
    int64_t wo = lo;
    for (; wo + 1 < hi; wo += 2, gp += 2 * g.gw, xp += 2 * xstep) {
      for (int v = 0; v < NV; ++v) {
        acc[0][v] += L::load(gp + v * L::kCount) * L::load(xp + v * L::kCount);
        acc[1][v] += L::load(gp + g.gw + v * L::kCount) * L::load(xp + xstep + v * L::kCount);
      }
    }
    if (wo < hi) {
      for (int v = 0; v < NV; ++v) acc[0][v] += L::load(gp + v * L::kCount) * L::load(xp + v * L::kCount);
    }
  }
  for (int v = 0; v < NV; ++v) L::store(out + v * L::kCount, acc[0][v] + acc[1][v]);
}

// Input gradient of NV vectors of channels from c0 at one input pixel (row tap list khs/hos of nh
// entries, column tap list kws/wos of nw entries): two independent sums per vector.
template <typename T, int NV>
FASTNAS_INLINE void input_grad_pixel(const Geometry& g, const T* __restrict grad_b, const T* __restrict wt,
                                     T* __restrict dst, const int64_t* khs, const int64_t* hos, int64_t nh,
                                     const int64_t* kws, const int64_t* wos, int64_t nw, int64_t c0) {
  using L = Lanes<T>;
  typename L::V acc[2][NV] = {};
  for (int64_t i = 0; i < nh; ++i) {
    const T* gp = grad_b + hos[i] * g.gh + c0;
    const T* wp = wt + khs[i] * g.KW * g.C + c0;
    int64_t j = 0;
    for (; j + 1 < nw; j += 2) {
      const T *g0 = gp + wos[j] * g.gw, *w0 = wp + kws[j] * g.C;
      const T *g1 = gp + wos[j + 1] * g.gw, *w1 = wp + kws[j + 1] * g.C;
      for (int v = 0; v < NV; ++v) {
        acc[0][v] += L::load(g0 + v * L::kCount) * L::load(w0 + v * L::kCount);
        acc[1][v] += L::load(g1 + v * L::kCount) * L::load(w1 + v * L::kCount);
      }
    }
    if (j < nw) {
      const T *g0 = gp + wos[j] * g.gw, *w0 = wp + kws[j] * g.C;
      for (int v = 0; v < NV; ++v) acc[0][v] += L::load(g0 + v * L::kCount) * L::load(w0 + v * L::kCount);
    }
  }
  for (int v = 0; v < NV; ++v) L::store(dst + c0 + v * L::kCount, acc[0][v] + acc[1][v]);
}

// Channels that do not fill a vector (C not a multiple of the vector width), one at a time.
template <typename T>
FASTNAS_INLINE void weight_grad_tap_scalar(const Geometry& g, const T* x, const T* grad, T* out, int64_t b,
                                           int64_t h0, int64_t h1, int64_t kh, int64_t kw, int64_t c0) {
  int64_t lo, hi;
  valid_columns(g, kw, &lo, &hi);
  for (int64_t c = c0; c < g.C; ++c) {
    T acc = 0;
    for (int64_t ho = h0; ho < h1; ++ho) {
      const int64_t row = ho * g.sh - g.ph + kh * g.dh;
      if (row < 0 || row >= g.H) continue;
      for (int64_t wo = lo; wo < hi; ++wo) {
        acc += grad[b * g.gb + ho * g.gh + wo * g.gw + c] *
               x[b * g.xb + row * g.xh + (wo * g.sw + kw * g.dw - g.pw) * g.xw + c];
      }
    }
    out[c - c0] = acc;
  }
}

// partial[(kh * KW + kw) * C + c] = the weight gradient's sum over image b, output rows [h0, h1);
// the chunk's rows of grad and input stay in cache across the taps.
template <typename T>
FASTNAS_INLINE void weight_grad_chunk_body(const Geometry& g, const T* __restrict x, const T* __restrict grad,
                                           T* __restrict partial, int64_t b, int64_t h0, int64_t h1) {
  constexpr int64_t W = Lanes<T>::kCount;
  for (int64_t kh = 0; kh < g.KH; ++kh) {
    for (int64_t kw = 0; kw < g.KW; ++kw) {
      T* out = partial + (kh * g.KW + kw) * g.C;
      int64_t c0 = 0;
      for (; c0 + kMaxVectors * W <= g.C; c0 += kMaxVectors * W) {
        weight_grad_tap<T, kMaxVectors>(g, x, grad, out + c0, b, h0, h1, kh, kw, c0);
      }
      switch ((g.C - c0) / W) {
        case 3: weight_grad_tap<T, 3>(g, x, grad, out + c0, b, h0, h1, kh, kw, c0); c0 += 3 * W; break;
        case 2: weight_grad_tap<T, 2>(g, x, grad, out + c0, b, h0, h1, kh, kw, c0); c0 += 2 * W; break;
        case 1: weight_grad_tap<T, 1>(g, x, grad, out + c0, b, h0, h1, kh, kw, c0); c0 += W; break;
        default: break;
      }
      if (c0 < g.C) weight_grad_tap_scalar(g, x, grad, out + c0, b, h0, h1, kh, kw, c0);
    }
  }
}

// The taps that reach each input column (or row) i: pairs (tap k, output index o) with
// i = o * stride - pad + k * dilation, listed once per call.
struct TapLists {
  std::vector<int64_t> count;  // [positions]
  std::vector<int64_t> tap;    // [positions, K]
  std::vector<int64_t> out;    // [positions, K]
  TapLists(int64_t positions, int64_t K, int64_t stride, int64_t pad, int64_t dilation, int64_t outputs)
      : count(positions, 0), tap(positions * K), out(positions * K) {
    for (int64_t i = 0; i < positions; ++i) {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t num = i + pad - k * dilation;  // = o * stride
        if (num < 0 || num % stride != 0 || num / stride >= outputs) continue;
        tap[i * K + count[i]] = k;
        out[i * K + count[i]] = num / stride;
        ++count[i];
      }
    }
  }
};

// grad_input rows [r0, r1) of the flattened (batch, row) index; wt is [KH * KW, C].
template <typename T>
FASTNAS_INLINE void input_grad_rows_body(const Geometry& g, const TapLists& rows, const TapLists& cols,
                                         const T* __restrict grad, const T* __restrict wt, T* __restrict out,
                                         int64_t r0, int64_t r1) {
  constexpr int64_t W = Lanes<T>::kCount;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / g.H, hi = r % g.H;
    const int64_t nh = rows.count[hi];
    const int64_t* khs = rows.tap.data() + hi * g.KH;
    const int64_t* hos = rows.out.data() + hi * g.KH;
    const T* grad_b = grad + b * g.gb;
    for (int64_t wi = 0; wi < g.W; ++wi) {
      const int64_t nw = cols.count[wi];
      const int64_t* kws = cols.tap.data() + wi * g.KW;
      const int64_t* wos = cols.out.data() + wi * g.KW;
      T* dst = out + b * g.xb + hi * g.xh + wi * g.xw;
      int64_t c0 = 0;
      for (; c0 + kMaxVectors * W <= g.C; c0 += kMaxVectors * W) {
        input_grad_pixel<T, kMaxVectors>(g, grad_b, wt, dst, khs, hos, nh, kws, wos, nw, c0);
      }
      switch ((g.C - c0) / W) {
        case 3: input_grad_pixel<T, 3>(g, grad_b, wt, dst, khs, hos, nh, kws, wos, nw, c0); c0 += 3 * W; break;
        case 2: input_grad_pixel<T, 2>(g, grad_b, wt, dst, khs, hos, nh, kws, wos, nw, c0); c0 += 2 * W; break;
        case 1: input_grad_pixel<T, 1>(g, grad_b, wt, dst, khs, hos, nh, kws, wos, nw, c0); c0 += W; break;
        default: break;
      }
      for (int64_t c = c0; c < g.C; ++c) {  // channels that do not fill a vector
        T acc = 0;
        for (int64_t i = 0; i < nh; ++i) {
          for (int64_t j = 0; j < nw; ++j) {
            acc += grad_b[hos[i] * g.gh + wos[j] * g.gw + c] * wt[(khs[i] * g.KW + kws[j]) * g.C + c];
          }
        }
        dst[c] = acc;
      }
    }
  }
}

FASTNAS_MULTIVERSION void weight_grad_chunk(const Geometry& g, const float* x, const float* grad, float* partial,
                                            int64_t b, int64_t h0, int64_t h1) {
  weight_grad_chunk_body(g, x, grad, partial, b, h0, h1);
}
FASTNAS_MULTIVERSION void weight_grad_chunk(const Geometry& g, const double* x, const double* grad, double* partial,
                                            int64_t b, int64_t h0, int64_t h1) {
  weight_grad_chunk_body(g, x, grad, partial, b, h0, h1);
}
FASTNAS_MULTIVERSION void input_grad_rows(const Geometry& g, const TapLists& rows, const TapLists& cols,
                                          const float* grad, const float* wt, float* out, int64_t r0, int64_t r1) {
  input_grad_rows_body(g, rows, cols, grad, wt, out, r0, r1);
}
FASTNAS_MULTIVERSION void input_grad_rows(const Geometry& g, const TapLists& rows, const TapLists& cols,
                                          const double* grad, const double* wt, double* out, int64_t r0,
                                          int64_t r1) {
  input_grad_rows_body(g, rows, cols, grad, wt, out, r0, r1);
}

// Checks the arguments shared by both kernels and returns the geometry; `input` is the input tensor
// (weight gradient) or undefined (input gradient: input_size gives its shape).
Geometry check_geometry(const char* op, const at::Tensor& grad, const at::Tensor& input, at::IntArrayRef input_size,
                        at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation) {
  TORCH_CHECK_VALUE(input_size.size() == 4, op, ": the input must be 4-D [B, C, H, W], got ", input_size.size(),
                    " dimensions");
  const auto kernel = pair_arg(kernel_size, op, "kernel_size", 1);
  const auto s = pair_arg(stride, op, "stride", 1), p = pair_arg(padding, op, "padding", 0);
  const auto d = pair_arg(dilation, op, "dilation", 1);
  TORCH_CHECK_TYPE(grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kDouble, op,
                   ": grad must be float32 or float64, got ", grad.scalar_type());
  TORCH_CHECK(grad.device().is_cpu(), op, ": grad must be a CPU tensor");
  TORCH_CHECK(is_nhwc(grad), op, ": grad must be 4-D and channels_last-contiguous");
  Geometry g{};
  g.B = input_size[0], g.C = input_size[1], g.H = input_size[2], g.W = input_size[3];
  g.KH = kernel[0], g.KW = kernel[1], g.sh = s[0], g.sw = s[1], g.ph = p[0], g.pw = p[1], g.dh = d[0], g.dw = d[1];
  const int64_t Ho = (g.H + 2 * g.ph - g.dh * (g.KH - 1) - 1) / g.sh + 1;
  const int64_t Wo = (g.W + 2 * g.pw - g.dw * (g.KW - 1) - 1) / g.sw + 1;
  TORCH_CHECK_VALUE(Ho >= 1 && Wo >= 1, op, ": the kernel does not fit in the padded input");
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef({g.B, g.C, Ho, Wo}), op, ": grad must have shape ",
                    at::IntArrayRef({g.B, g.C, Ho, Wo}), " for this input and kernel, got ", grad.sizes());
  g.Ho = Ho, g.Wo = Wo;
  g.gb = grad.stride(0), g.gh = grad.stride(2), g.gw = grad.stride(3);
  if (input.defined()) {
    TORCH_CHECK_TYPE(input.scalar_type() == grad.scalar_type(), op, ": input must have grad's dtype ",
                     grad.scalar_type(), ", got ", input.scalar_type());
    TORCH_CHECK(input.device() == grad.device(), op, ": input must be on grad's device");
    TORCH_CHECK(is_nhwc(input), op, ": input must be 4-D and channels_last-contiguous");
    g.xb = input.stride(0), g.xh = input.stride(2), g.xw = input.stride(3);
  } else {  // the gradient is allocated channels_last
    g.xb = g.H * g.W * g.C, g.xh = g.W * g.C, g.xw = g.C;
  }
  return g;
}

at::Tensor depthwise_conv2d_weight_grad_cpu(const at::Tensor& grad, const at::Tensor& input,
                                            at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                            at::IntArrayRef padding, at::IntArrayRef dilation) {
  const char* op = "fastnas::depthwise_conv2d_weight_grad";
  TORCH_CHECK_VALUE(input.dim() == 4, op, ": input must be 4-D [B, C, H, W], got ", input.dim(), " dimensions");
  const Geometry g = check_geometry(op, grad, input, input.sizes(), kernel_size, stride, padding, dilation);
  const int64_t taps = g.KH * g.KW;
  const int64_t rows = std::max<int64_t>(1, std::min(g.Ho, (kChunkPixels + g.Wo - 1) / g.Wo));
  const int64_t per_image = (g.Ho + rows - 1) / rows;
  const int64_t chunks = g.B * per_image;
  at::Tensor result = at::empty({g.C, 1, g.KH, g.KW}, grad.options());
  if (chunks == 0 || g.C == 0) return result.zero_();
  at::Tensor partials = at::empty({chunks, taps * g.C}, grad.options());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "depthwise_conv2d_weight_grad_cpu", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* gr = grad.const_data_ptr<scalar_t>();
    scalar_t* part = partials.data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / per_image, h0 = (i % per_image) * rows;
        weight_grad_chunk(g, x, gr, part + i * taps * g.C, b, h0, std::min(g.Ho, h0 + rows));
      }
    });
    // second stage: chunks summed in index order, in double; [taps, C] transposed to [C, 1, KH, KW]
    scalar_t* out = result.data_ptr<scalar_t>();
    at::parallel_for(0, taps * g.C, 256, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        double sum = 0.0;
        for (int64_t i = 0; i < chunks; ++i) sum += static_cast<double>(part[i * taps * g.C + j]);
        out[(j % g.C) * taps + j / g.C] = static_cast<scalar_t>(sum);
      }
    });
  });
  return result;
}

at::Tensor depthwise_conv2d_input_grad_cpu(const at::Tensor& grad, const at::Tensor& weight,
                                           at::IntArrayRef input_size, at::IntArrayRef stride,
                                           at::IntArrayRef padding, at::IntArrayRef dilation) {
  const char* op = "fastnas::depthwise_conv2d_input_grad";
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(1) == 1, op, ": weight must be [C, 1, KH, KW], got shape ",
                    weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == grad.scalar_type(), op, ": weight must have grad's dtype ",
                   grad.scalar_type(), ", got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == grad.device(), op, ": weight must be on grad's device");
  if (input_size.size() == 4) {  // (other sizes: check_geometry names them)
    TORCH_CHECK_VALUE(weight.size(0) == input_size[1], op, ": weight has ", weight.size(0), " channels, the input ",
                      input_size[1]);
  }
  const Geometry g = check_geometry(op, grad, at::Tensor(), input_size, {weight.size(2), weight.size(3)}, stride,
                                    padding, dilation);
  // channels_last, from the pool of page-resident blocks (the meta tensor only describes the layout)
  const at::Tensor layout =
      at::empty(input_size, grad.options().device(at::kMeta).memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor result = pooled_empty_like(layout);
  if (result.numel() == 0) return result;
  // [C, 1, KH, KW] -> [KH * KW, C]: each tap's weights contiguous along the channels
  const at::Tensor taps_by_channel = weight.reshape({g.C, g.KH * g.KW}).t().contiguous();
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "depthwise_conv2d_input_grad_cpu", [&] {
    const scalar_t* gr = grad.const_data_ptr<scalar_t>();
    const scalar_t* wt = taps_by_channel.const_data_ptr<scalar_t>();
    scalar_t* out = result.data_ptr<scalar_t>();
    const TapLists rows(g.H, g.KH, g.sh, g.ph, g.dh, g.Ho), cols(g.W, g.KW, g.sw, g.pw, g.dw, g.Wo);
    const int64_t grain = std::max<int64_t>(1, kChunkPixels / std::max<int64_t>(1, g.W));
    at::parallel_for(0, g.B * g.H, grain,
                     [&](int64_t begin, int64_t end) { input_grad_rows(g, rows, cols, gr, wt, out, begin, end); });
  });
  return result;
}

// Both gradients in one call (what autograd runs: one dispatch per backward, as
// aten::convolution_backward), each only where output_mask asks for it, else an empty tensor; the
// input gradient in the input's layout (channels_last, or contiguous).
std::tuple<at::Tensor, at::Tensor> depthwise_conv2d_backward_cpu(const at::Tensor& grad, const at::Tensor& input,
                                                                 const at::Tensor& weight, at::IntArrayRef stride,
                                                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                                                 std::array<bool, 2> output_mask) {
  const char* op = "fastnas::depthwise_conv2d_backward";
  TORCH_CHECK_VALUE(input.dim() == 4, op, ": input must be 4-D [B, C, H, W], got ", input.dim(), " dimensions");
  TORCH_CHECK_VALUE(weight.dim() == 4, op, ": weight must be [C, 1, KH, KW], got shape ", weight.sizes());
  TORCH_CHECK_VALUE(grad.dim() == 4, op, ": grad must be 4-D, got ", grad.dim(), " dimensions");
  const at::Tensor grad_nhwc = grad.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor input_grad = at::empty({0}, grad.options());
  at::Tensor weight_grad = at::empty({0}, grad.options());
  if (output_mask[0]) {
    input_grad = depthwise_conv2d_input_grad_cpu(grad_nhwc, weight, input.sizes(), stride, padding, dilation);
    if (!input.is_contiguous(at::MemoryFormat::ChannelsLast)) input_grad = input_grad.contiguous();
  }
  if (output_mask[1]) {
    weight_grad = depthwise_conv2d_weight_grad_cpu(grad_nhwc, input.contiguous(at::MemoryFormat::ChannelsLast),
                                                   {weight.size(2), weight.size(3)}, stride, padding, dilation);
  }
  return {input_grad, weight_grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnas, CPU, m) {
  m.impl("depthwise_conv2d_weight_grad", &depthwise_conv2d_weight_grad_cpu);
  m.impl("depthwise_conv2d_input_grad", &depthwise_conv2d_input_grad_cpu);
  m.impl("depthwise_conv2d_backward", &depthwise_conv2d_backward_cpu);
}

}  // namespace fastnas
