// CUDA kernels of the mixed sum (contract: csrc/mixed_sum.h), registered for the CUDA dispatch key: the
// launchers. The device code and its rounding order are in mixed_sum_kernels.cuh; what runs where (vectors,
// tiles, units, grid, launches for K > 128) is decided by launch_plan.h.
//
// Forward: one launch (per 128 inputs), each input read once, y written once, every access 16 bytes.
// Backward: one launch (per 128 inputs): g and each input read once, each w_k * g written once, and the
// weight gradient finished in the same launch: each unit's sums go to a [K, units] workspace, and the
// last block to finish adds them in a fixed order.
//
// Host cost per call is what a launch needs: the multiprocessor count and every kernel's resident blocks
// are asked of the runtime once per device; the arguments are packed once into the kernel's parameter
// struct; the workspace comes from the caching allocator. The backward's arrival counter is a zeroed word
// per (device, stream) that every launch leaves at zero (launches on one stream run one after another);
// while a stream is captured into a CUDA graph it is a word of the call's workspace, zeroed by a captured
// memset, so replays on other streams never share it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "cuda/launch_plan.h"
#include "cuda/mixed_sum_kernels.cuh"
#include "mixed_sum.h"

namespace fastnas {
namespace {

namespace plan = cuda_plan;
using cuda_kernels::BackwardParams;
using cuda_kernels::ForwardParams;

// The kernels' element type for an ATen scalar type (same bits).
template <typename scalar_t>
struct DeviceElement {
  using type = scalar_t;
};
template <>
struct DeviceElement<at::Half> {
  using type = __half;
};
template <>
struct DeviceElement<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
constexpr int type_index() {
  if constexpr (std::is_same_v<T, float>) return 0;
  if constexpr (std::is_same_v<T, double>) return 1;
  if constexpr (std::is_same_v<T, __half>) return 2;
  return 3;
}

// What the runtime says of one device, asked once: resident blocks of every kernel, times the
// multiprocessor count.
struct DeviceLimits {
  int64_t forward_blocks[4][2];   // [type_index][shifted]
  int64_t backward_blocks[4][2];  // [type_index][shifted]
};

template <typename Kernel>
int64_t resident_blocks(Kernel kernel, int multiprocessors) {
  int per_multiprocessor = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_multiprocessor, kernel, plan::kThreads, 0));
  return static_cast<int64_t>(std::max(per_multiprocessor, 1)) * multiprocessors;
}

template <typename T>
void fill_limits(DeviceLimits& limits, int multiprocessors) {
  const auto kernels = cuda_kernels::kernels<T>();
  for (int shifted = 0; shifted < 2; ++shifted) {
    limits.forward_blocks[type_index<T>()][shifted] = resident_blocks(kernels.forward[shifted], multiprocessors);
    limits.backward_blocks[type_index<T>()][shifted] = resident_blocks(kernels.backward[shifted], multiprocessors);
  }
}

// Called under a CUDAGuard for `device`.
const DeviceLimits& device_limits(c10::DeviceIndex device) {
  static const int count = c10::cuda::device_count();
  static const std::unique_ptr<std::once_flag[]> once(new std::once_flag[count]);
  static const std::unique_ptr<DeviceLimits[]> limits(new DeviceLimits[count]);
  std::call_once(once[device], [device] {
    int multiprocessors = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
    multiprocessors = std::max(multiprocessors, 1);
    DeviceLimits& l = limits[device];
    fill_limits<float>(l, multiprocessors);
    fill_limits<double>(l, multiprocessors);
    fill_limits<__half>(l, multiprocessors);
    fill_limits<__nv_bfloat16>(l, multiprocessors);
  });
  return limits[device];
}

int64_t grid_limit(int64_t resident_blocks) {
  const int64_t cap = plan::max_grid_for_tests();
  return cap > 0 ? std::min(cap, resident_blocks) : resident_blocks;
}

bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// The zeroed arrival counter of (device, stream), allocated once and never freed.
unsigned int* arrival_counter(c10::DeviceIndex device, cudaStream_t stream) {
  thread_local c10::DeviceIndex last_device = -1;
  thread_local cudaStream_t last_stream = nullptr;
  thread_local unsigned int* last_counter = nullptr;
  if (last_counter != nullptr && device == last_device && stream == last_stream) return last_counter;
  static std::mutex mutex;
  static std::map<std::pair<c10::DeviceIndex, cudaStream_t>, unsigned int*> counters;
  const std::lock_guard<std::mutex> lock(mutex);
  unsigned int*& counter = counters[{device, stream}];
  if (counter == nullptr) {
    counter = static_cast<unsigned int*>(
        c10::cuda::CUDACachingAllocator::raw_alloc_with_stream(sizeof(unsigned int), stream));
    C10_CUDA_CHECK(cudaMemsetAsync(counter, 0, sizeof(unsigned int), stream));
  }
  last_device = device;
  last_stream = stream;
  last_counter = counter;
  return counter;
}

void check_element_aligned(std::uintptr_t address_bits, std::size_t element_size, const char* op) {
  TORCH_CHECK(address_bits % element_size == 0, op, ": tensors must start at a multiple of their element size");
}

std::uintptr_t address(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }

constexpr const char* kForwardName = "fastnas::_mixed_sum_forward";
constexpr const char* kBackwardName = "fastnas::_mixed_sum_backward";

template <typename T>
void launch_forward(at::TensorList outputs, const at::Tensor& weights, const at::Tensor& out) {
  using Acc = typename cuda_kernels::Element<T>::Acc;
  const int64_t K = static_cast<int64_t>(outputs.size());
  const int64_t numel = out.numel();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const DeviceLimits& limits = device_limits(out.device().index());
  const int64_t launches = plan::num_launches(K);
  T* y = static_cast<T*>(out.mutable_data_ptr());
  TORCH_INTERNAL_ASSERT(address(y) % plan::kVectorBytes == 0, kForwardName, ": y is not 16-byte aligned");
  // launches after the first continue from the sum so far: y itself when it holds Acc, else a buffer
  c10::DataPtr running_buffer;
  Acc* running = nullptr;
  if (launches > 1) {
    if constexpr (std::is_same_v<T, Acc>) {
      running = y;
    } else {
      running_buffer = c10::cuda::CUDACachingAllocator::get()->allocate(numel * sizeof(Acc));
      running = static_cast<Acc*>(running_buffer.get());
    }
  }
  for (int64_t launch = 0; launch < launches; ++launch) {
    const int64_t first = launch * plan::kMaxInputsPerLaunch;
    ForwardParams<T> params{};
    params.num_inputs = static_cast<int>(plan::inputs_of_launch(K, launch));
    std::uintptr_t address_bits = 0;
    for (int j = 0; j < params.num_inputs; ++j) {
      params.inputs[j] = static_cast<const T*>(outputs[first + j].const_data_ptr());
      address_bits |= address(params.inputs[j]);
    }
    check_element_aligned(address_bits, sizeof(T), kForwardName);
    const bool shifted = plan::element_shift(address_bits, 1) != 0;
    const plan::LaunchPlan lp =
        plan::plan_launch(numel, params.num_inputs, sizeof(T), sizeof(Acc), false, address_bits,
                          grid_limit(limits.forward_blocks[type_index<T>()][shifted]));
    params.weights = weights.const_data_ptr<Acc>() + first;
    params.running_in = launch == 0 ? nullptr : running;
    params.running_out = launch + 1 == launches ? nullptr : running;
    params.out = y;
    params.full_vectors = lp.full_vectors;
    params.tiles = lp.tiles;
    params.tail = lp.tail;
    cuda_kernels::kernels<T>().forward[shifted]<<<lp.grid, plan::kThreads, 0, stream>>>(params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void launch_backward(const at::Tensor& grad, at::TensorList outputs, const at::Tensor& weights,
                     const std::vector<at::Tensor>& outputs_grad, const at::Tensor& weights_grad) {
  using Acc = typename cuda_kernels::Element<T>::Acc;
  const int64_t K = weights.size(0);
  const int64_t numel = grad.numel();
  const bool want_inputs_grad = !outputs_grad.empty();
  const bool want_weights_grad = !outputs.empty();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const c10::DeviceIndex device = grad.device().index();
  const DeviceLimits& limits = device_limits(device);
  const int64_t launches = plan::num_launches(K);
  const T* g = static_cast<const T*>(grad.const_data_ptr());

  // The workspace: the widest launch's [inputs, units] partial sums (launches reuse it in stream order),
  // and, in graph capture, the arrival counter.
  c10::DataPtr workspace;
  Acc* partials = nullptr;
  unsigned int* arrivals = nullptr;
  if (want_weights_grad) {
    const plan::LaunchPlan widest =
        plan::plan_launch(numel, plan::inputs_of_launch(K, 0), sizeof(T), sizeof(Acc), true, 0, 1);
    const int64_t partials_bytes = widest.partials_bytes;  // whole 16-byte vectors
    const bool captured = capturing(stream);
    workspace = c10::cuda::CUDACachingAllocator::get()->allocate(partials_bytes + (captured ? sizeof(unsigned) : 0));
    partials = static_cast<Acc*>(workspace.get());
    if (captured) {
      arrivals = reinterpret_cast<unsigned int*>(static_cast<char*>(workspace.get()) + partials_bytes);
      C10_CUDA_CHECK(cudaMemsetAsync(arrivals, 0, sizeof(unsigned int), stream));
    } else {
      arrivals = arrival_counter(device, stream);
    }
  }

  for (int64_t launch = 0; launch < launches; ++launch) {
    const int64_t first = launch * plan::kMaxInputsPerLaunch;
    BackwardParams<T> params{};
    params.num_inputs = static_cast<int>(plan::inputs_of_launch(K, launch));
    std::uintptr_t address_bits = address(g);
    for (int j = 0; j < params.num_inputs; ++j) {
      if (want_weights_grad) {
        params.inputs[j] = static_cast<const T*>(outputs[first + j].const_data_ptr());
        address_bits |= address(params.inputs[j]);
      }
      if (want_inputs_grad) {
        params.inputs_grad[j] = static_cast<T*>(outputs_grad[first + j].mutable_data_ptr());
        TORCH_INTERNAL_ASSERT(address(params.inputs_grad[j]) % plan::kVectorBytes == 0, kBackwardName,
                              ": an input gradient is not 16-byte aligned");
      }
    }
    check_element_aligned(address_bits, sizeof(T), kBackwardName);
    const bool shifted = plan::element_shift(address_bits, 1) != 0;
    const plan::LaunchPlan lp =
        plan::plan_launch(numel, params.num_inputs, sizeof(T), sizeof(Acc), want_weights_grad, address_bits,
                          grid_limit(limits.backward_blocks[type_index<T>()][shifted]));
    params.grad = g;
    params.weights = weights.const_data_ptr<Acc>() + first;
    params.partials = partials;
    params.weights_grad = want_weights_grad ? weights_grad.mutable_data_ptr<Acc>() + first : nullptr;
    params.arrivals = arrivals;
    params.full_vectors = lp.full_vectors;
    params.tiles = lp.tiles;
    params.tiles_per_unit = lp.tiles_per_unit;
    params.units = lp.units;
    params.partials_stride = lp.partials_stride;
    params.tail = lp.tail;
    params.want_inputs_grad = want_inputs_grad;
    params.want_weights_grad = want_weights_grad;
    cuda_kernels::kernels<T>().backward[shifted]<<<lp.grid, plan::kThreads, 0, stream>>>(params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor mixed_sum_forward_cuda(at::TensorList outputs, const at::Tensor& weights) {
  check_native_inputs(at::Tensor(), outputs, weights, c10::DeviceType::CUDA, kForwardName);
  const c10::cuda::CUDAGuard device_guard(outputs[0].device());
  at::Tensor out = at::empty_like(outputs[0]);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "mixed_sum_forward_cuda", [&] {
    launch_forward<typename DeviceElement<scalar_t>::type>(outputs, weights, out);
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> mixed_sum_backward_cuda(const at::Tensor& grad,
                                                                         at::TensorList outputs,
                                                                         const at::Tensor& weights,
                                                                         bool compute_outputs_grad) {
  check_native_inputs(grad, outputs, weights, c10::DeviceType::CUDA, kBackwardName);
  const c10::cuda::CUDAGuard device_guard(grad.device());
  BackwardResults results = allocate_backward_results(
      grad, outputs, weights, compute_outputs_grad,
      [](int64_t numel, const at::Tensor& like) { return at::empty({numel}, like.options()); });
  if (!results.done) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "mixed_sum_backward_cuda", [&] {
      launch_backward<typename DeviceElement<scalar_t>::type>(grad, outputs, weights, results.outputs_grad,
                                                              results.weights_grad);
    });
  }
  return {std::move(results.outputs_grad), std::move(results.weights_grad)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnas, CUDA, m) {
  m.impl("_mixed_sum_forward", &mixed_sum_forward_cuda);
  m.impl("_mixed_sum_backward", &mixed_sum_backward_cuda);
}

}  // namespace fastnas
