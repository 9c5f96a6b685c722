// The compiled extension fastnas._C: the schemas of the native kernels (declared once, here) and the
// contract checks every mixed-sum backend shares. Each backend registers its kernels with its own
// TORCH_LIBRARY_IMPL in its own file: csrc/cpu/mixed_sum_cpu.cpp, csrc/cuda/mixed_sum_cuda.cu,
// csrc/cpu/depthwise_conv_cpu.cpp, csrc/cpu/avg_pool_cpu.cpp.
#include <Python.h>
#include <torch/library.h>

#include "mixed_sum.h"

extern "C" {
// Importing fastnas._C runs the static registrations below; the module itself holds nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace fastnas {

bool same_strides(at::IntArrayRef sizes, at::IntArrayRef a, at::IntArrayRef b) {
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] != 1 && a[d] != b[d]) return false;
  }
  return true;
}

bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && same_strides(a.sizes(), a.strides(), b.strides());
}

int64_t check_native_inputs(const at::Tensor& grad, at::TensorList outputs, const at::Tensor& weights,
                            c10::DeviceType device_type, const char* op_name) {
  TORCH_CHECK_VALUE(grad.defined() || !outputs.empty(), op_name, ": outputs must hold K >= 1 tensors");
  TORCH_CHECK(weights.dim() == 1 && weights.is_contiguous(), op_name, ": weights must be 1-D and contiguous");
  const int64_t K = weights.size(0);
  TORCH_CHECK_VALUE(K >= 1, op_name, ": weights must hold K >= 1 values");
  const at::Tensor& like = grad.defined() ? grad : outputs[0];
  const auto dtype = like.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                   op_name, ": unsupported dtype ", dtype);
  TORCH_CHECK_TYPE(weights.scalar_type() == accumulation_type(dtype), op_name, ": weights must be ",
                   accumulation_type(dtype), " for ", dtype, " inputs, got ", weights.scalar_type());
  TORCH_CHECK(like.device().type() == device_type && weights.device() == like.device(), op_name,
              ": tensors must all be on one ", c10::DeviceTypeName(device_type), " device");
  TORCH_CHECK(like.is_non_overlapping_and_dense(), op_name, ": inputs must be non-overlapping and dense");
  TORCH_CHECK_VALUE(outputs.empty() || static_cast<int64_t>(outputs.size()) == K, op_name, ": got ",
                    outputs.size(), " outputs for ", K, " weights");
  for (size_t k = 0; k < outputs.size(); ++k) {
    const at::Tensor& o = outputs[k];
    TORCH_CHECK(o.scalar_type() == dtype && o.device() == like.device() && same_layout(o, like), op_name,
                ": outputs[", k, "] must share the dtype, device, shape and strides of ",
                grad.defined() ? "grad" : "outputs[0]");
  }
  return K;
}

namespace {
thread_local bool shared_gradient_storage = false;
}  // namespace

SharedGradientStorage::SharedGradientStorage() : previous_(shared_gradient_storage) {
  shared_gradient_storage = true;
}
SharedGradientStorage::~SharedGradientStorage() { shared_gradient_storage = previous_; }
bool SharedGradientStorage::active() { return shared_gradient_storage; }

// One slot per input gradient in a shared buffer, rounded up to 64 bytes: every gradient starts where
// a fresh allocation would (16-byte vectors on a GPU, whole cache lines on a CPU).
constexpr int64_t kSlotAlignBytes = 64;

BackwardResults allocate_backward_results(const at::Tensor& grad, at::TensorList outputs, const at::Tensor& weights,
                                          bool compute_outputs_grad,
                                          at::Tensor (*empty_flat)(int64_t numel, const at::Tensor& like)) {
  const int64_t K = weights.size(0);
  BackwardResults results;
  if (compute_outputs_grad) {
    // one allocation for all K gradients when they may share it: one call into the allocator instead of
    // K (each costs about a microsecond of host time on a GPU); each is an ordinary tensor, not a view
    const bool shared = SharedGradientStorage::active();
    const int64_t per_slot = kSlotAlignBytes / static_cast<int64_t>(grad.element_size());
    const int64_t slot = shared ? (grad.numel() + per_slot - 1) / per_slot * per_slot : 0;
    const at::Tensor buffer = shared ? empty_flat(K * slot, grad) : at::Tensor();
    results.outputs_grad.reserve(K);
    for (int64_t k = 0; k < K; ++k) {
      const at::Tensor flat = shared ? buffer : empty_flat(grad.numel(), grad);
      auto impl =
          c10::make_intrusive<c10::TensorImpl>(c10::Storage(flat.storage()), flat.key_set(), flat.dtype());
      impl->set_sizes_and_strides(grad.sizes(), grad.strides(), k * slot);
      results.outputs_grad.emplace_back(std::move(impl));
    }
  }
  const bool no_elements = grad.numel() == 0;
  if (outputs.empty()) {
    results.weights_grad = weights.new_empty({0});
    results.done = !compute_outputs_grad || no_elements;
  } else {
    results.weights_grad = no_elements ? at::zeros_like(weights) : at::empty({K}, weights.options());
    results.done = no_elements;
  }
  return results;
}

TORCH_LIBRARY_FRAGMENT(fastnas, m) {
  m.def("_mixed_sum_forward(Tensor[] outputs, Tensor weights) -> Tensor");
  m.def(
      "_mixed_sum_backward(Tensor grad, Tensor[] outputs, Tensor weights, bool compute_outputs_grad)"
      " -> (Tensor[], Tensor)");
  // Gradients of a depthwise convolution (groups = channels, weight [C, 1, KH, KW]) given the output
  // gradient `grad`; CPU only (csrc/cpu/depthwise_conv_cpu.cpp), channels_last float32/float64.
  m.def(
      "depthwise_conv2d_weight_grad(Tensor grad, Tensor input, int[2] kernel_size, int[2] stride, int[2] padding,"
      " int[2] dilation) -> Tensor");
  m.def(
      "depthwise_conv2d_input_grad(Tensor grad, Tensor weight, int[4] input_size, int[2] stride, int[2] padding,"
      " int[2] dilation) -> Tensor");
  // Both of them, each where output_mask = [input, weight] asks (else an empty tensor): what autograd calls.
  m.def(
      "depthwise_conv2d_backward(Tensor grad, Tensor input, Tensor weight, int[2] stride, int[2] padding,"
      " int[2] dilation, bool[2] output_mask) -> (Tensor, Tensor)");
  // Training-mode BatchNorm without affine parameters over `parts` blocks of channels, the output one
  // channels_last-dense tensor per block ([parts, B, C / parts, H, W]), and its backward from the
  // blocks' outputs; CPU only (csrc/cpu/batch_norm_cpu.cpp), channels_last float32/float64.
  m.def(
      "batch_norm_parts(Tensor input, int parts, Tensor(a!)? running_mean, Tensor(b!)? running_var,"
      " float momentum, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("batch_norm_parts_backward(Tensor?[] grads, Tensor[] outputs, Tensor invstd) -> Tensor");
  // 2-D average pooling (ceil_mode=False, no divisor override) and its input gradient given the output
  // gradient `grad`; CPU only (csrc/cpu/avg_pool_cpu.cpp), channels_last float32/float64. The input's
  // size is SymInt[]: a traced graph with dynamic shapes keeps them symbolic.
  m.def(
      "avg_pool2d_nhwc(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, bool count_include_pad)"
      " -> Tensor");
  m.def(
      "avg_pool2d_nhwc_backward(Tensor grad, SymInt[4] input_size, int[2] kernel_size, int[2] stride, int[2] padding,"
      " bool count_include_pad) -> Tensor");
}

}  // namespace fastnas
