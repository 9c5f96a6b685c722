// CUDA kernels of the mixed sum (contract: csrc/mixed_sum.h), registered for the CUDA dispatch key.
//
// The K inputs are read where they lie: their pointers travel by value in the kernel's argument
// struct, up to kMaxPointers per launch; larger K is handled in chunks of kMaxPointers (below).
// Every thread walks the flat arrays with a grid-stride loop, 16 bytes per access when every
// pointer of the call is 16-byte aligned (vector path), one element per access otherwise (scalar
// path, also the tail of the vector path). Sums are accumulated in float32 (float64 for float64).
// The grid holds the blocks that fit on the device at once (multiprocessor count times resident
// blocks per multiprocessor), capped by the work.
//
// Forward, one pass: y = sum_k w_k * o_k, each o_k read once, y written once. For K > kMaxPointers
// the chunks run one after another on a running sum kept in the accumulation dtype (y itself for
// float32/float64, a float32 buffer for 16-bit outputs), so chunking changes no rounding: each
// element still sees w_0 o_0 + w_1 o_1 + ... in order. The cost is one extra write and read of the
// running sum per extra chunk (K = 40: ~5% more bytes than one pass for float32, ~10% for 16-bit).
//
// Backward, one pass: per element, g is read once; for each k, d o_k = w_k * g is written and
// g * o_k accumulated in a per-thread register. Each block reduces its K sums (warp shuffles, then
// the warps in order) into its row of a [grid, K] buffer of partials; a second kernel sums each
// column in a fixed order. The grid depends only on the device and numel, so d w is deterministic:
// bit-identical across runs on one device. For K > kMaxPointers each chunk re-reads g.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "mixed_sum.h"

namespace fastnas {
namespace {

constexpr int kThreads = 256;      // threads per block of the main kernels
constexpr int kWarps = kThreads / 32;
constexpr int kMaxPointers = 32;   // K inputs (and K output gradients) per launch
constexpr int kSmallK = 8;         // launches with K <= kSmallK use kernels unrolled 8 wide
constexpr int kVectorBytes = 16;
constexpr int kReduceThreads = 256;

// kVectorBytes of scalar_t, moved with one 16-byte load or store.
template <typename T>
struct alignas(kVectorBytes) Vec {
  static constexpr int kSize = kVectorBytes / sizeof(T);
  T v[kSize];
};

// Read-only-path load, for memory no thread of the kernel writes.
template <typename T>
__device__ __forceinline__ Vec<T> load_vec(const T* p) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  Vec<T> out;
  memcpy(&out, &raw, sizeof(out));
  return out;
}

// Plain (coherent) load, for memory the kernel also writes.
template <typename T>
__device__ __forceinline__ Vec<T> load_vec_coherent(const T* p) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  Vec<T> out;
  memcpy(&out, &raw, sizeof(out));
  return out;
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T>& value) {
  uint4 raw;
  memcpy(&raw, &value, sizeof(raw));
  *reinterpret_cast<uint4*>(p) = raw;
}

// ------------------------------------------------------------------------------------- forward

template <typename scalar_t, typename acc_t>
struct ForwardArgs {
  const scalar_t* inputs[kMaxPointers];  // this chunk's o_k
  const acc_t* weights;                  // this chunk's w_k (device memory)
  const acc_t* running_in;               // sum of the earlier chunks (may be out itself), or nullptr
  scalar_t* out;                         // y (last chunk), else nullptr
  acc_t* running_out;                    // running sum for the next chunk (not last chunk), else nullptr
  int64_t numel;
  int num_inputs;                        // 1..kMaxPointers
};

// kMaxK: compile-time bound on num_inputs, so the loop over k unrolls and the pointers are read
// from the argument space at constant offsets.
template <typename scalar_t, typename acc_t, int kMaxK, bool kVector>
__global__ void __launch_bounds__(kThreads) mixed_sum_forward_kernel(const ForwardArgs<scalar_t, acc_t> args) {
  __shared__ acc_t s_w[kMaxK];
  if (static_cast<int>(threadIdx.x) < args.num_inputs) s_w[threadIdx.x] = args.weights[threadIdx.x];
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  int64_t scalar_start = 0;
  if constexpr (kVector) {
    constexpr int V = Vec<scalar_t>::kSize;
    const int64_t num_vectors = args.numel / V;
    for (int64_t vi = thread; vi < num_vectors; vi += stride) {
      const int64_t i = vi * V;
      acc_t acc[V];
      if (args.running_in != nullptr) {
#pragma unroll
        for (int h = 0; h < V; h += Vec<acc_t>::kSize) {  // one or two 16-byte loads
          const Vec<acc_t> r = load_vec_coherent(args.running_in + i + h);
#pragma unroll
          for (int j = 0; j < Vec<acc_t>::kSize; ++j) acc[h + j] = r.v[j];
        }
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] = acc_t(0);
      }
#pragma unroll
      for (int k = 0; k < kMaxK; ++k) {
        if (k < args.num_inputs) {
          const Vec<scalar_t> x = load_vec(args.inputs[k] + i);
          const acc_t w = s_w[k];
#pragma unroll
          for (int j = 0; j < V; ++j) acc[j] += w * static_cast<acc_t>(x.v[j]);
        }
      }
      if (args.out != nullptr) {
        Vec<scalar_t> y;
#pragma unroll
        for (int j = 0; j < V; ++j) y.v[j] = static_cast<scalar_t>(acc[j]);
        store_vec(args.out + i, y);
      } else {
#pragma unroll
        for (int h = 0; h < V; h += Vec<acc_t>::kSize) {
          Vec<acc_t> r;
#pragma unroll
          for (int j = 0; j < Vec<acc_t>::kSize; ++j) r.v[j] = acc[h + j];
          store_vec(args.running_out + i + h, r);
        }
      }
    }
    scalar_start = num_vectors * V;
  }
  for (int64_t i = scalar_start + thread; i < args.numel; i += stride) {
    acc_t acc = args.running_in != nullptr ? args.running_in[i] : acc_t(0);
#pragma unroll
    for (int k = 0; k < kMaxK; ++k) {
      if (k < args.num_inputs) acc += s_w[k] * static_cast<acc_t>(args.inputs[k][i]);
    }
    if (args.out != nullptr) {
      args.out[i] = static_cast<scalar_t>(acc);
    } else {
      args.running_out[i] = acc;
    }
  }
}

// ------------------------------------------------------------------------------------- backward

template <typename scalar_t, typename acc_t>
struct BackwardArgs {
  const scalar_t* inputs[kMaxPointers];  // this chunk's o_k (unused without weights grad)
  scalar_t* inputs_grad[kMaxPointers];   // this chunk's d o_k (unused without outputs grad)
  const scalar_t* grad;                  // g
  const acc_t* weights;                  // this chunk's w_k (device memory)
  acc_t* partials;                       // [gridDim.x, partials_stride], at this chunk's first column
  int64_t partials_stride;               // K
  int64_t numel;
  int num_inputs;                        // 1..kMaxPointers
  bool want_outputs_grad;
  bool want_weights_grad;
};

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename scalar_t, typename acc_t, int kMaxK, bool kVector>
__global__ void __launch_bounds__(kThreads) mixed_sum_backward_kernel(const BackwardArgs<scalar_t, acc_t> args) {
  __shared__ acc_t s_w[kMaxK];
  __shared__ acc_t s_sums[kWarps][kMaxK];
  if (static_cast<int>(threadIdx.x) < args.num_inputs) s_w[threadIdx.x] = args.weights[threadIdx.x];
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  acc_t dot[kMaxK];
#pragma unroll
  for (int k = 0; k < kMaxK; ++k) dot[k] = acc_t(0);
  int64_t scalar_start = 0;
  if constexpr (kVector) {
    constexpr int V = Vec<scalar_t>::kSize;
    const int64_t num_vectors = args.numel / V;
    for (int64_t vi = thread; vi < num_vectors; vi += stride) {
      const int64_t i = vi * V;
      const Vec<scalar_t> g_raw = load_vec(args.grad + i);
      acc_t g[V];
#pragma unroll
      for (int j = 0; j < V; ++j) g[j] = static_cast<acc_t>(g_raw.v[j]);
#pragma unroll
      for (int k = 0; k < kMaxK; ++k) {
        if (k < args.num_inputs) {
          if (args.want_weights_grad) {
            const Vec<scalar_t> x = load_vec(args.inputs[k] + i);
            acc_t s = dot[k];
#pragma unroll
            for (int j = 0; j < V; ++j) s += g[j] * static_cast<acc_t>(x.v[j]);
            dot[k] = s;
          }
          if (args.want_outputs_grad) {
            const acc_t w = s_w[k];
            Vec<scalar_t> d;
#pragma unroll
            for (int j = 0; j < V; ++j) d.v[j] = static_cast<scalar_t>(w * g[j]);
            store_vec(args.inputs_grad[k] + i, d);
          }
        }
      }
    }
    scalar_start = num_vectors * V;
  }
  for (int64_t i = scalar_start + thread; i < args.numel; i += stride) {
    const acc_t g = static_cast<acc_t>(args.grad[i]);
#pragma unroll
    for (int k = 0; k < kMaxK; ++k) {
      if (k < args.num_inputs) {
        if (args.want_weights_grad) dot[k] += g * static_cast<acc_t>(args.inputs[k][i]);
        if (args.want_outputs_grad) args.inputs_grad[k][i] = static_cast<scalar_t>(s_w[k] * g);
      }
    }
  }
  if (!args.want_weights_grad) return;  // uniform over the grid
  // block sum, in a fixed order: butterfly within each warp, then the warps in index order
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < kMaxK; ++k) {
    if (k < args.num_inputs) {
      const acc_t s = warp_sum(dot[k]);
      if (lane == 0) s_sums[warp][k] = s;
    }
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < args.num_inputs) {
    acc_t s = s_sums[0][threadIdx.x];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) s += s_sums[w][threadIdx.x];
    args.partials[blockIdx.x * args.partials_stride + threadIdx.x] = s;
  }
}

// weights_grad[k] = sum over rows r of partials[r, k], in a fixed order: one block per k, each thread
// sums rows threadIdx.x, threadIdx.x + kReduceThreads, ..., then a tree over the threads.
template <typename acc_t>
__global__ void __launch_bounds__(kReduceThreads)
    sum_partials_kernel(const acc_t* partials, int64_t rows, int64_t K, acc_t* weights_grad) {
  __shared__ acc_t s_sums[kReduceThreads];
  const int64_t k = blockIdx.x;
  acc_t s = acc_t(0);
  for (int64_t r = threadIdx.x; r < rows; r += kReduceThreads) s += partials[r * K + k];
  s_sums[threadIdx.x] = s;
  __syncthreads();
#pragma unroll
  for (int half = kReduceThreads / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) s_sums[threadIdx.x] += s_sums[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) weights_grad[k] = s_sums[0];
}

// ------------------------------------------------------------------------------------- launching

bool aligned(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % kVectorBytes == 0; }

bool all_aligned(at::TensorList tensors) {
  return std::all_of(tensors.begin(), tensors.end(), [](const at::Tensor& t) { return aligned(t.data_ptr()); });
}

// Blocks of `kernel` that fit on the current device at once: resident blocks per multiprocessor
// times the multiprocessor count, asked of the runtime once per kernel and device. (ATen/cuda/
// CUDAContext.h is not included: it needs the cuBLAS/cuSPARSE headers, which a bare toolkit may lack.)
template <typename Kernel>
int64_t resident_blocks(Kernel kernel) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int64_t> cache;
  const int device = c10::cuda::current_device();
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), device);
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  int per_sm = 0;
  int num_sms = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t blocks = static_cast<int64_t>(std::max(per_sm, 1)) * std::max(num_sms, 1);
  cache.emplace(key, blocks);
  return blocks;
}

// The grid of a grid-stride kernel: the resident blocks, or fewer when the work needs fewer.
template <typename Kernel>
int64_t grid_size(Kernel kernel, int64_t work_items) {
  const int64_t needed = (work_items + kThreads - 1) / kThreads;
  return std::max<int64_t>(1, std::min(resident_blocks(kernel), needed));
}

template <typename scalar_t, typename acc_t, int kMaxK, bool kVector>
void launch_forward(const ForwardArgs<scalar_t, acc_t>& args) {
  auto kernel = mixed_sum_forward_kernel<scalar_t, acc_t, kMaxK, kVector>;
  const int64_t work = kVector ? (args.numel + Vec<scalar_t>::kSize - 1) / Vec<scalar_t>::kSize : args.numel;
  kernel<<<grid_size(kernel, work), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t>
void launch_forward(const ForwardArgs<scalar_t, acc_t>& args, bool vector) {
  if (args.num_inputs <= kSmallK) {
    if (vector) return launch_forward<scalar_t, acc_t, kSmallK, true>(args);
    return launch_forward<scalar_t, acc_t, kSmallK, false>(args);
  }
  if (vector) return launch_forward<scalar_t, acc_t, kMaxPointers, true>(args);
  return launch_forward<scalar_t, acc_t, kMaxPointers, false>(args);
}

template <typename scalar_t, typename acc_t>
auto backward_kernel_for(int num_inputs, bool vector) {
  if (num_inputs <= kSmallK) {
    return vector ? mixed_sum_backward_kernel<scalar_t, acc_t, kSmallK, true>
                  : mixed_sum_backward_kernel<scalar_t, acc_t, kSmallK, false>;
  }
  return vector ? mixed_sum_backward_kernel<scalar_t, acc_t, kMaxPointers, true>
                : mixed_sum_backward_kernel<scalar_t, acc_t, kMaxPointers, false>;
}

constexpr const char* kForwardName = "fastnas::_mixed_sum_forward";
constexpr const char* kBackwardName = "fastnas::_mixed_sum_backward";

at::Tensor mixed_sum_forward_cuda(at::TensorList outputs, const at::Tensor& weights) {
  const int64_t K = check_native_inputs(at::Tensor(), outputs, weights, c10::DeviceType::CUDA, kForwardName);
  const c10::cuda::CUDAGuard device_guard(outputs[0].device());
  at::Tensor out = at::empty_like(outputs[0]);
  const int64_t numel = out.numel();
  if (numel == 0) return out;
  const int64_t num_chunks = (K + kMaxPointers - 1) / kMaxPointers;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "mixed_sum_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
    // running sum between chunks: y itself when it holds acc_t, else a float32 buffer
    at::Tensor running;
    acc_t* running_ptr = nullptr;
    if (num_chunks > 1) {
      if constexpr (kSameType) {
        running_ptr = static_cast<acc_t*>(out.data_ptr());  // acc_t is scalar_t here
      } else {
        running = at::empty({numel}, weights.options());
        running_ptr = running.data_ptr<acc_t>();
      }
    }
    const bool vector = all_aligned(outputs) && aligned(out.data_ptr()) && aligned(running_ptr);
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t first = c * kMaxPointers;
      const bool last = c + 1 == num_chunks;
      ForwardArgs<scalar_t, acc_t> args{};
      args.num_inputs = static_cast<int>(std::min<int64_t>(kMaxPointers, K - first));
      for (int j = 0; j < args.num_inputs; ++j) args.inputs[j] = outputs[first + j].data_ptr<scalar_t>();
      args.weights = weights.data_ptr<acc_t>() + first;
      args.running_in = c == 0 ? nullptr : running_ptr;
      if (last) {
        args.out = out.data_ptr<scalar_t>();
      } else if constexpr (kSameType) {
        args.out = out.data_ptr<scalar_t>();  // y is the running sum
      } else {
        args.running_out = running_ptr;
      }
      args.numel = numel;
      launch_forward(args, vector);
    }
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> mixed_sum_backward_cuda(const at::Tensor& grad,
                                                                         at::TensorList outputs,
                                                                         const at::Tensor& weights,
                                                                         bool compute_outputs_grad) {
  const int64_t K = check_native_inputs(grad, outputs, weights, c10::DeviceType::CUDA, kBackwardName);
  const c10::cuda::CUDAGuard device_guard(grad.device());
  const int64_t numel = grad.numel();
  const bool want_weights_grad = !outputs.empty();
  BackwardResults results = allocate_backward_results(
      grad, outputs, weights, compute_outputs_grad,
      [](int64_t numel, const at::Tensor& like) { return at::empty({numel}, like.options()); });
  if (results.done) return {results.outputs_grad, results.weights_grad};
  std::vector<at::Tensor>& outputs_grad = results.outputs_grad;  // named, not bound: lambdas capture them
  at::Tensor& weights_grad = results.weights_grad;
  const int64_t num_chunks = (K + kMaxPointers - 1) / kMaxPointers;
  const bool vector = aligned(grad.data_ptr()) && all_aligned(outputs) && all_aligned(outputs_grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "mixed_sum_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    // one grid for every chunk (the partials have one row per block): that of the first, widest chunk
    const int64_t work = vector ? (numel + Vec<scalar_t>::kSize - 1) / Vec<scalar_t>::kSize : numel;
    const int widest = static_cast<int>(std::min<int64_t>(K, kMaxPointers));
    const int64_t grid = grid_size(backward_kernel_for<scalar_t, acc_t>(widest, vector), work);
    at::Tensor partials = want_weights_grad ? at::empty({grid, K}, weights.options()) : at::Tensor();
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t first = c * kMaxPointers;
      BackwardArgs<scalar_t, acc_t> args{};
      args.num_inputs = static_cast<int>(std::min<int64_t>(kMaxPointers, K - first));
      for (int j = 0; j < args.num_inputs; ++j) {
        if (want_weights_grad) args.inputs[j] = outputs[first + j].data_ptr<scalar_t>();
        if (compute_outputs_grad) args.inputs_grad[j] = outputs_grad[first + j].data_ptr<scalar_t>();
      }
      args.grad = grad.data_ptr<scalar_t>();
      args.weights = weights.data_ptr<acc_t>() + first;
      args.partials = want_weights_grad ? partials.data_ptr<acc_t>() + first : nullptr;
      args.partials_stride = K;
      args.numel = numel;
      args.want_outputs_grad = compute_outputs_grad;
      args.want_weights_grad = want_weights_grad;
      backward_kernel_for<scalar_t, acc_t>(args.num_inputs, vector)<<<grid, kThreads, 0, stream>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (want_weights_grad) {
      sum_partials_kernel<acc_t><<<K, kReduceThreads, 0, stream>>>(partials.data_ptr<acc_t>(), grid, K,
                                                                     weights_grad.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {outputs_grad, weights_grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnas, CUDA, m) {
  m.impl("_mixed_sum_forward", &mixed_sum_forward_cuda);
  m.impl("_mixed_sum_backward", &mixed_sum_backward_cuda);
}

}  // namespace fastnas
