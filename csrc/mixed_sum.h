// The native contract shared by the CPU and CUDA kernels of the mixed sum (see fastnas/ops/mixed_sum.py).
//
//   _mixed_sum_forward(Tensor[] outputs, Tensor weights) -> Tensor
//       y = sum_k weights[k] * outputs[k]
//   _mixed_sum_backward(Tensor grad, Tensor[] outputs, Tensor weights, bool compute_outputs_grad)
//       -> (Tensor[] outputs_grad, Tensor weights_grad)
//       outputs_grad[k] = weights[k] * grad            (none unless compute_outputs_grad)
//       weights_grad[k] = sum(grad * outputs[k])        (empty when outputs is empty)
//
// Inputs: K >= 1 tensors of one dtype (float16, bfloat16, float32, float64), shape and strides,
// non-overlapping and dense, so each is a flat array of numel elements in memory order; grad has
// those strides too. weights: 1-D, contiguous, length K, in the accumulation dtype (float64 for
// float64 inputs, float32 otherwise). Results are laid out like the inputs. The Python layer
// brings inputs to this form; the kernels check it again and raise rather than read out of bounds.
#pragma once

#include <ATen/ATen.h>

namespace fastnas {

// Checks the contract above for the forward (grad undefined) or backward; returns K.
int64_t check_native_inputs(const at::Tensor& grad, at::TensorList outputs, const at::Tensor& weights,
                            c10::DeviceType device_type, const char* op_name);

// The results of a backward call, allocated as the contract says: K outputs gradients laid out like
// grad (when compute_outputs_grad), each from `empty_flat(numel, like)` (the backend's allocator, a
// 1-D tensor of like's dtype and device), or all K as slices of one such buffer while a
// SharedGradientStorage lives; and weights_grad, [K] when outputs are given, else empty. `done` when nothing is left to compute (no elements, or nothing asked):
// weights_grad then holds its final value (zeros when there are no elements).
struct BackwardResults {
  std::vector<at::Tensor> outputs_grad;
  at::Tensor weights_grad;
  bool done;
};
BackwardResults allocate_backward_results(const at::Tensor& grad, at::TensorList outputs, const at::Tensor& weights,
                                          bool compute_outputs_grad,
                                          at::Tensor (*empty_flat)(int64_t numel, const at::Tensor& like));

// While one lives on a thread, the backward kernels allocate the K input gradients as slices of one
// buffer (see allocate_backward_results). Only the eager autograd node sets it, around its own
// backward call: its gradients go straight to the autograd engine. Called as registered operators,
// the kernels return K separate allocations, since torch.library requires that the outputs of a
// custom operator alias nothing (torch.compile and functionalization rely on it).
class SharedGradientStorage {
 public:
  SharedGradientStorage();
  ~SharedGradientStorage();
  SharedGradientStorage(const SharedGradientStorage&) = delete;
  SharedGradientStorage& operator=(const SharedGradientStorage&) = delete;
  static bool active();

 private:
  bool previous_;
};

// Strides a and b agree wherever a dimension of `sizes` has more than one element.
bool same_strides(at::IntArrayRef sizes, at::IntArrayRef a, at::IntArrayRef b);
// Same sizes, and the same strides wherever a dimension has more than one element.
bool same_layout(const at::Tensor& a, const at::Tensor& b);

inline at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace fastnas
