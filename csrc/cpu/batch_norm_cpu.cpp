// CPU kernels of the supernets' lean BatchNorm (schemas: csrc/fastnas_ops.cpp): training-mode batch
// statistics, no affine parameters, over a channels_last (NHWC) float32/float64 tensor whose channels
// are `parts` blocks of ops computed by one convolution, the output written as one dense tensor per
// block.
//
// Why: a supernet node sums the ops of its edges, and the ops of several edges leaving one node are
// computed by one convolution, so their BatchNorm runs over the concatenated channels. With the
// native kernel the output then had to be split into dense per-op tensors (a copy) and, in the
// backward, the per-op gradients and outputs concatenated again (two copies) for the native
// backward, which on channels_last CPU tensors is also several times slower than its forward
// (benchmarks/RESULTS.md). Here the forward writes the blocks directly and the backward reads them
// directly:
//
//   forward:  mean_c, var_c over the B*H*W pixels;  y_c = (x_c - mean_c) * invstd_c,  invstd = 1/sqrt(var + eps)
//   backward: dx_c = invstd_c * (g_c - sum(g_c) / N - y_c * sum(g_c * y_c) / N)
//
// (the backward from the output: it needs neither x nor the mean). Statistics are sums of fixed
// chunks of pixels (chunks depend on the shape only, not on the thread count) added in index order
// in double: deterministic. The forward's sums are shifted by each channel's first value, so that
// the variance does not lose digits to a large mean.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/block_pool.h"
#include "cpu/multiversion.h"
#include "cpu/nhwc.h"

namespace fastnas {
namespace {

constexpr int64_t kChunkPixels = 128;  // pixels per partial sum (a chunk of 64 float channels: 32 KB, in L1/L2)
constexpr int64_t kRunChunks = 16;     // chunks of pixels the backward's second pass does part by part

// Per channel k < c of `pixels` rows of `stride` values, in order of the pixels (deterministic):
// the forward's shifted sums s1 = sum(x - shift), s2 = sum((x - shift)^2) (kSquares), or the
// backward's s1 = sum(g), s2 = sum(g * y). Up to kMaxVectors vectors of channels (cpu/nhwc.h) are
// summed at once, their sums in registers for the whole chunk (each row read once, contiguously):
// with a runtime channel count they would live in memory, each pixel's add waiting on the previous
// pixel's store, worst for 16-channel blocks (one vector per pixel).
template <bool kSquares, int NV, typename T>
FASTNAS_INLINE void vector_sums(const T* __restrict a, const T* __restrict b, int64_t pixels, int64_t stride,
                                const T* __restrict shift, T* __restrict s1, T* __restrict s2) {
  using L = Lanes<T>;
  typename L::V acc1[NV] = {}, acc2[NV] = {}, sh[NV] = {};
  if constexpr (kSquares)
    for (int v = 0; v < NV; ++v) sh[v] = L::load(shift + v * L::kCount);
  for (int64_t p = 0; p < pixels; ++p) {
    for (int v = 0; v < NV; ++v) {
      const typename L::V av = L::load(a + p * stride + v * L::kCount);
      if constexpr (kSquares) {
        const typename L::V d = av - sh[v];
        acc1[v] += d;
        acc2[v] += d * d;
      } else {
        acc1[v] += av;
        acc2[v] += av * L::load(b + p * stride + v * L::kCount);
      }
    }
  }
  for (int v = 0; v < NV; ++v) L::store(s1 + v * L::kCount, acc1[v]), L::store(s2 + v * L::kCount, acc2[v]);
}

template <bool kSquares, typename T>
FASTNAS_MULTIVERSION void channel_sums(const T* __restrict a, const T* __restrict b, int64_t pixels, int64_t stride,
                                       int64_t c, const T* __restrict shift, T* __restrict s1, T* __restrict s2) {
  constexpr int64_t lanes = Lanes<T>::kCount;
  int64_t k0 = 0;
  while (c - k0 >= lanes) {
    const int64_t nv = std::min<int64_t>(kMaxVectors, (c - k0) / lanes);
    const T* sh = kSquares ? shift + k0 : nullptr;
    if (nv == 4)
      vector_sums<kSquares, 4, T>(a + k0, b + k0, pixels, stride, sh, s1 + k0, s2 + k0);
    else if (nv == 3)
      vector_sums<kSquares, 3, T>(a + k0, b + k0, pixels, stride, sh, s1 + k0, s2 + k0);
    else if (nv == 2)
      vector_sums<kSquares, 2, T>(a + k0, b + k0, pixels, stride, sh, s1 + k0, s2 + k0);
    else
      vector_sums<kSquares, 1, T>(a + k0, b + k0, pixels, stride, sh, s1 + k0, s2 + k0);
    k0 += nv * lanes;
  }
  for (int64_t k = k0; k < c; ++k) s1[k] = 0, s2[k] = 0;  // the last channels, fewer than a vector
  for (int64_t p = 0; p < pixels && k0 < c; ++p) {
    const T* __restrict ar = a + p * stride;
    const T* __restrict br = b + p * stride;
    for (int64_t k = k0; k < c; ++k) {
      if constexpr (kSquares) {
        const T d = ar[k] - shift[k];
        s1[k] += d;
        s2[k] += d * d;
      } else {
        s1[k] += ar[k];
        s2[k] += ar[k] * br[k];
      }
    }
  }
}

// y[part][pixel][c] = x[pixel][part * c_part + c] * scale + offset, for pixels [p0, p1).
template <typename T>
FASTNAS_MULTIVERSION void normalise_pixels(const T* __restrict x, T* __restrict y, int64_t p0, int64_t p1,
                                           int64_t C, int64_t parts, int64_t N, const T* __restrict scale,
                                           const T* __restrict offset) {
  const int64_t c_part = C / parts;
  for (int64_t p = p0; p < p1; ++p) {
    const T* __restrict row = x + p * C;
    for (int64_t q = 0; q < parts; ++q) {
      T* __restrict out = y + (q * N + p) * c_part;
      const T* __restrict in = row + q * c_part;
      const T* __restrict a = scale + q * c_part;
      const T* __restrict b = offset + q * c_part;
      for (int64_t c = 0; c < c_part; ++c) out[c] = in[c] * a[c] + b[c];
    }
  }
}

// dx[pixel][part * c + k] = g * a + y * b + d per channel, for pixels [p0, p1) of one block.
template <typename T>
FASTNAS_MULTIVERSION void input_grad_pixels(const T* __restrict g, const T* __restrict y, T* __restrict dx,
                                            int64_t p0, int64_t p1, int64_t c, int64_t C, const T* __restrict a,
                                            const T* __restrict b, const T* __restrict d) {
  for (int64_t p = p0; p < p1; ++p) {
    const T* __restrict gr = g + p * c;
    const T* __restrict yr = y + p * c;
    T* __restrict out = dx + p * C;
    for (int64_t k = 0; k < c; ++k) out[k] = gr[k] * a[k] + yr[k] * b[k] + d[k];
  }
}

template <typename T>
FASTNAS_MULTIVERSION void zero_pixels(T* __restrict dx, int64_t p0, int64_t p1, int64_t c, int64_t C) {
  for (int64_t p = p0; p < p1; ++p) {
    T* __restrict out = dx + p * C;
    for (int64_t k = 0; k < c; ++k) out[k] = 0;
  }
}

void check_running(const char* op, const char* name, const std::optional<at::Tensor>& t, const at::Tensor& input) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == input.size(1) && t->is_contiguous(), op, ": ", name,
                    " must be a contiguous 1-D tensor of ", input.size(1), " values (the input's channels), got shape ",
                    t->sizes());
  TORCH_CHECK_TYPE(t->scalar_type() == input.scalar_type(), op, ": ", name, " must have the input's dtype ",
                   input.scalar_type(), ", got ", t->scalar_type());
  TORCH_CHECK(t->device() == input.device(), op, ": ", name, " must be on the input's device");
}

// Returns (out [parts, B, C / parts, H, W], each block channels_last-dense; mean [C]; invstd [C]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_parts_cpu(const at::Tensor& input, int64_t parts,
                                                                    const std::optional<at::Tensor>& running_mean,
                                                                    const std::optional<at::Tensor>& running_var,
                                                                    double momentum, double eps) {
  const char* op = "fastnas::batch_norm_parts";
  TORCH_CHECK_VALUE(input.dim() == 4, op, ": input must be 4-D [B, C, H, W], got ", input.dim(), " dimensions");
  TORCH_CHECK_TYPE(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble, op,
                   ": input must be float32 or float64, got ", input.scalar_type());
  TORCH_CHECK(is_nhwc(input), op, ": input must be channels_last-contiguous");
  const int64_t B = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  TORCH_CHECK_VALUE(parts >= 1 && C % parts == 0, op, ": parts must divide the ", C, " channels, got ", parts);
  const int64_t N = B * H * W;
  TORCH_CHECK_VALUE(N > 1, op, ": expected more than 1 value per channel when training, got input of shape ",
                    input.sizes());
  TORCH_CHECK_VALUE(eps >= 0, op, ": eps must be non-negative, got ", eps);
  check_running(op, "running_mean", running_mean, input);
  check_running(op, "running_var", running_var, input);
  const bool has_mean = running_mean.has_value() && running_mean->defined();
  const bool has_var = running_var.has_value() && running_var->defined();
  TORCH_CHECK_VALUE(has_mean == has_var, op, ": running_mean and running_var must be given together");

  const int64_t c_part = C / parts;
  const at::Tensor layout = at::empty({parts, B, H, W, c_part}, input.options().device(at::kMeta));
  // (not from the block pool: a step's BatchNorm outputs all live until its backward, so pooling them
  // fills the pool and the mixed sums' gradients page-fault again)
  at::Tensor out = at::empty(layout.sizes(), input.options()).permute({0, 1, 4, 2, 3});
  at::Tensor mean = at::empty({C}, input.options());
  at::Tensor invstd = at::empty({C}, input.options());
  if (C == 0) return {out, mean, invstd};
  const int64_t chunks = (N + kChunkPixels - 1) / kChunkPixels;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "batch_norm_parts_cpu", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    std::vector<scalar_t> shift(x, x + C);  // the first pixel's values
    std::vector<double> partial(chunks * 2 * C);
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> s1(C), s2(C);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t p0 = i * kChunkPixels, p1 = std::min(N, p0 + kChunkPixels);
        channel_sums<true, scalar_t>(x + p0 * C, x + p0 * C, p1 - p0, C, C, shift.data(), s1.data(), s2.data());
        double* row = partial.data() + i * 2 * C;
        for (int64_t c = 0; c < C; ++c) row[c] = s1[c], row[C + c] = s2[c];
      }
    });
    std::vector<double> sum1(C, 0.0), sum2(C, 0.0);
    for (int64_t i = 0; i < chunks; ++i) {
      const double* row = partial.data() + i * 2 * C;
      for (int64_t c = 0; c < C; ++c) sum1[c] += row[c], sum2[c] += row[C + c];
    }
    std::vector<scalar_t> scale(C), offset(C);
    scalar_t* mean_p = mean.data_ptr<scalar_t>();
    scalar_t* invstd_p = invstd.data_ptr<scalar_t>();
    scalar_t* rm = has_mean ? running_mean->data_ptr<scalar_t>() : nullptr;
    scalar_t* rv = has_var ? running_var->data_ptr<scalar_t>() : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      const double m1 = sum1[c] / N;
      const double var = std::max(0.0, sum2[c] / N - m1 * m1);
      const double mu = static_cast<double>(shift[c]) + m1;
      const scalar_t istd = static_cast<scalar_t>(1.0 / std::sqrt(var + eps));
      mean_p[c] = static_cast<scalar_t>(mu);
      invstd_p[c] = istd;
      scale[c] = istd;
      offset[c] = -mean_p[c] * istd;
      if (rm != nullptr) {  // as the native kernel: the unbiased variance
        rm[c] = static_cast<scalar_t>((1.0 - momentum) * rm[c] + momentum * mu);
        rv[c] = static_cast<scalar_t>((1.0 - momentum) * rv[c] + momentum * var * N / (N - 1));
      }
    }
    scalar_t* y = out.data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      normalise_pixels<scalar_t>(x, y, begin * kChunkPixels, std::min(N, end * kChunkPixels), C, parts, N,
                                 scale.data(), offset.data());
    });
  });
  return {out, mean, invstd};
}

// dx [B, C, H, W] channels_last from the blocks' gradients (an undefined one: zero) and outputs.
// (grads as the dispatcher passes Tensor?[]: the C++ autograd, csrc/batch_norm_autograd.cpp, calls it so)
at::Tensor batch_norm_parts_backward_cpu(const c10::List<std::optional<at::Tensor>>& grads, at::TensorList outputs,
                                         const at::Tensor& invstd) {
  const char* op = "fastnas::batch_norm_parts_backward";
  const int64_t parts = static_cast<int64_t>(outputs.size());
  TORCH_CHECK_VALUE(parts >= 1, op, ": outputs must not be empty");
  TORCH_CHECK_VALUE(static_cast<int64_t>(grads.size()) == parts, op, ": grads must have one entry per output (",
                    parts, "), got ", grads.size());
  const at::Tensor& first = outputs[0];
  TORCH_CHECK_VALUE(first.dim() == 4, op, ": outputs must be 4-D [B, C, H, W], got ", first.dim(), " dimensions");
  TORCH_CHECK_TYPE(first.scalar_type() == at::kFloat || first.scalar_type() == at::kDouble, op,
                   ": outputs must be float32 or float64, got ", first.scalar_type());
  const int64_t B = first.size(0), c = first.size(1), H = first.size(2), W = first.size(3);
  const int64_t C = parts * c, N = B * H * W;
  for (int64_t q = 0; q < parts; ++q) {
    const at::Tensor& y = outputs[q];
    TORCH_CHECK_VALUE(y.sizes() == first.sizes(), op, ": outputs[", q, "] has shape ", y.sizes(), ", outputs[0] ",
                      first.sizes());
    TORCH_CHECK_TYPE(y.scalar_type() == first.scalar_type(), op, ": outputs[", q, "] has dtype ", y.scalar_type(),
                     ", outputs[0] ", first.scalar_type());
    TORCH_CHECK(y.device() == first.device(), op, ": outputs must be on one device");
    const std::optional<at::Tensor> g = grads.get(q);
    if (g.has_value() && g->defined()) {
      TORCH_CHECK_VALUE(g->sizes() == first.sizes(), op, ": grads[", q, "] has shape ", g->sizes(),
                        ", the outputs ", first.sizes());
      TORCH_CHECK_TYPE(g->scalar_type() == first.scalar_type(), op, ": grads[", q, "] has dtype ", g->scalar_type(),
                       ", the outputs ", first.scalar_type());
      TORCH_CHECK(g->device() == first.device(), op, ": grads[", q, "] is on another device than the outputs");
    }
  }
  TORCH_CHECK_VALUE(invstd.dim() == 1 && invstd.size(0) == C, op, ": invstd must be 1-D with ", C,
                    " values, got shape ", invstd.sizes());
  TORCH_CHECK_TYPE(invstd.scalar_type() == first.scalar_type(), op, ": invstd must have the outputs' dtype");
  TORCH_CHECK_VALUE(N > 0, op, ": outputs have no pixels");

  // the kernels read NHWC-dense blocks (the forward's are; a gradient in another layout is copied)
  std::vector<at::Tensor> ys, gs;
  for (int64_t q = 0; q < parts; ++q) {
    ys.push_back(outputs[q].contiguous(at::MemoryFormat::ChannelsLast));
    const std::optional<at::Tensor> g = grads.get(q);
    gs.push_back(g.has_value() && g->defined() ? g->contiguous(at::MemoryFormat::ChannelsLast) : at::Tensor());
  }
  const at::Tensor layout =
      at::empty({B, C, H, W}, first.options().device(at::kMeta).memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor dx = pooled_empty_like(layout);  // page-resident (block_pool.h): freed again within the backward
  if (C == 0) return dx;
  const int64_t chunks = (N + kChunkPixels - 1) / kChunkPixels;
  const at::Tensor istd = invstd.contiguous();
  AT_DISPATCH_FLOATING_TYPES(first.scalar_type(), "batch_norm_parts_backward_cpu", [&] {
    std::vector<double> partial(chunks * 2 * C, 0.0);
    at::parallel_for(0, chunks * parts, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> sg(c), sgy(c);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t q = i / chunks, chunk = i % chunks;  // part by part: long runs of each tensor
        if (!gs[q].defined()) continue;
        const int64_t p0 = chunk * kChunkPixels, p1 = std::min(N, p0 + kChunkPixels);
        channel_sums<false, scalar_t>(gs[q].const_data_ptr<scalar_t>() + p0 * c,
                                      ys[q].const_data_ptr<scalar_t>() + p0 * c, p1 - p0, c, c, nullptr, sg.data(),
                                      sgy.data());
        double* row = partial.data() + chunk * 2 * C + q * c;
        for (int64_t k = 0; k < c; ++k) row[k] = sg[k], row[C + k] = sgy[k];
      }
    });
    std::vector<double> sum_g(C, 0.0), sum_gy(C, 0.0);
    for (int64_t i = 0; i < chunks; ++i) {
      const double* row = partial.data() + i * 2 * C;
      for (int64_t k = 0; k < C; ++k) sum_g[k] += row[k], sum_gy[k] += row[C + k];
    }
    // dx = g * a + y * b + d: a = invstd, b = -invstd * mean(g * y), d = -invstd * mean(g)
    const scalar_t* is = istd.const_data_ptr<scalar_t>();
    std::vector<scalar_t> a(C), b(C), d(C);
    for (int64_t k = 0; k < C; ++k) {
      a[k] = is[k];
      b[k] = static_cast<scalar_t>(-static_cast<double>(is[k]) * sum_gy[k] / N);
      d[k] = static_cast<scalar_t>(-static_cast<double>(is[k]) * sum_g[k] / N);
    }
    scalar_t* out = dx.data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      // every part of a run of pixels, then the next run: a run's dx rows stay in L2 while each part's
      // run of g and y streams (runs of kRunChunks chunks: switching tensors every chunk is slower)
      for (int64_t run = begin; run < end; run += kRunChunks) {
        const int64_t p0 = run * kChunkPixels, p1 = std::min(N, std::min(end, run + kRunChunks) * kChunkPixels);
        for (int64_t q = 0; q < parts; ++q) {
          if (!gs[q].defined()) {
            zero_pixels<scalar_t>(out + q * c, p0, p1, c, C);
            continue;
          }
          input_grad_pixels<scalar_t>(gs[q].const_data_ptr<scalar_t>(), ys[q].const_data_ptr<scalar_t>(), out + q * c,
                                      p0, p1, c, C, a.data() + q * c, b.data() + q * c, d.data() + q * c);
        }
      }
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnas, CPU, m) {
  m.impl("batch_norm_parts", &batch_norm_parts_cpu);
  m.impl("batch_norm_parts_backward", &batch_norm_parts_backward_cpu);
}

}  // namespace fastnas
