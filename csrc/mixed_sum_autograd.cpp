// Eager autograd of the mixed sum on the compiled backends (cpu, cuda), in C++.
//
//   _mixed_sum_autograd(Tensor weights, Tensor[] outputs) -> Tensor
//
// fastnas.mixed_sum calls this op when the cpu or cuda backend runs, outside torch.compile. It checks
// its arguments, brings the K inputs to one dense layout and records a node whose backward runs
// without entering Python (the host time that saves: benchmarks/RESULTS.md).
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "mixed_sum.h"

namespace fastnas {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor native_forward(at::TensorList outputs, const at::Tensor& weights) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastnas::_mixed_sum_forward", "")
                             .typed<at::Tensor(at::TensorList, const at::Tensor&)>();
  return op.call(outputs, weights);
}

std::tuple<std::vector<at::Tensor>, at::Tensor> native_backward(const at::Tensor& grad, at::TensorList outputs,
                                                                const at::Tensor& weights, bool compute_outputs_grad) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastnas::_mixed_sum_backward", "")
          .typed<std::tuple<std::vector<at::Tensor>, at::Tensor>(const at::Tensor&, at::TensorList, const at::Tensor&,
                                                                 bool)>();
  return op.call(grad, outputs, weights, compute_outputs_grad);
}

// The weights in the kernels' accumulation dtype (float64 for float64 inputs, float32 otherwise).
at::Tensor accumulation_weights(const at::Tensor& weights, const at::Tensor& like) {
  const at::ScalarType acc = accumulation_type(like.scalar_type());
  if (weights.scalar_type() == acc && weights.is_contiguous()) return weights;  // no dispatch: the usual case
  return weights.to(acc).contiguous();
}

// The gradients by the reference formulas (fastnas/ops/reference.py) in ATen ops that autograd records:
// d o_k = w_k g and d w_k = sum(g * o_k), in the accumulation dtype, rounded once. Second and higher
// derivatives through them are exact.
variable_list differentiable_backward(const at::Tensor& grad, const std::vector<at::Tensor>& outputs,
                                      const at::Tensor& weights, bool needs_outputs_grad, bool needs_weights_grad) {
  const at::ScalarType acc = accumulation_type(grad.scalar_type());
  const at::Tensor g = grad.to(acc);
  const at::Tensor w = weights.to(acc);
  variable_list result{at::Tensor()};
  if (needs_weights_grad) {
    std::vector<at::Tensor> sums;
    sums.reserve(outputs.size());
    for (const at::Tensor& o : outputs) sums.push_back((g * o.to(acc)).sum());
    result[0] = at::stack(sums).to(weights.scalar_type());
  }
  for (int64_t k = 0; k < weights.size(0); ++k) {
    result.push_back(needs_outputs_grad ? (w[k] * g).to(grad.scalar_type()) : at::Tensor());
  }
  return result;
}

class MixedSum : public torch::autograd::Function<MixedSum> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& weights, at::TensorList outputs) {
    const at::Tensor w = accumulation_weights(weights, outputs[0]);
    bool needs_outputs_grad = false;
    for (const at::Tensor& o : outputs) needs_outputs_grad = needs_outputs_grad || o.requires_grad();
    const bool needs_weights_grad = weights.requires_grad();
    ctx->saved_data["needs_outputs_grad"] = needs_outputs_grad;
    ctx->saved_data["needs_weights_grad"] = needs_weights_grad;
    ctx->saved_data["strides"] = outputs[0].strides().vec();
    // The weights themselves, not w: a backward recorded for double backward differentiates through
    // them. The K inputs are needed only for dL/dw: not kept alive when the weights are frozen.
    std::vector<at::Tensor> saved{weights};
    if (needs_weights_grad) saved.insert(saved.end(), outputs.begin(), outputs.end());
    ctx->save_for_backward(saved);
    return native_forward(outputs, w);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& weights = saved[0];
    const std::vector<at::Tensor> outputs(saved.begin() + 1, saved.end());
    const bool needs_outputs_grad = ctx->saved_data["needs_outputs_grad"].toBool();
    const bool needs_weights_grad = ctx->saved_data["needs_weights_grad"].toBool();
    const int64_t K = weights.size(0);
    if (at::GradMode::is_enabled()) {
      // create_graph=True: autograd records this backward, so it is computed with differentiable ops
      return differentiable_backward(grad_outputs[0], outputs, weights, needs_outputs_grad, needs_weights_grad);
    }
    const at::Tensor w = accumulation_weights(weights, grad_outputs[0]);

    // the kernels take grad laid out like the inputs (autograd may hand over any strides, even 0)
    at::Tensor grad = grad_outputs[0];
    const std::vector<int64_t> strides = ctx->saved_data["strides"].toIntVector();
    if (!same_strides(grad.sizes(), grad.strides(), strides)) {
      at::Tensor dense = at::empty_strided(grad.sizes(), strides, grad.options());
      dense.copy_(grad);
      grad = dense;
    }
    const SharedGradientStorage one_allocation;  // the K gradients go straight to the autograd engine
    auto [outputs_grad, weights_grad] = native_backward(grad, outputs, w, needs_outputs_grad);

    // weights_grad is in the accumulation dtype; autograd casts it to the weights' own dtype
    variable_list result;
    result.reserve(K + 1);
    result.push_back(needs_weights_grad ? weights_grad : at::Tensor());
    for (int64_t k = 0; k < K; ++k) result.push_back(needs_outputs_grad ? outputs_grad[k] : at::Tensor());
    return result;
  }
};

// What the kernels cannot check once the weights are converted. fastnas.mixed_sum re-validates in
// Python when this op raises, for messages that name the argument; the kernels check the rest.
void check_arguments(const at::Tensor& weights, at::TensorList outputs) {
  const char* op = "fastnas::_mixed_sum_autograd";
  TORCH_CHECK_VALUE(!outputs.empty(), op, ": outputs must hold K >= 1 tensors");
  TORCH_CHECK_TYPE(weights.layout() == at::kStrided && outputs[0].layout() == at::kStrided, op,
                   ": weights and outputs must be dense tensors");
  TORCH_CHECK_TYPE(at::isFloatingType(weights.scalar_type()), op, ": weights must be real floating point");
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.size(0) == static_cast<int64_t>(outputs.size()), op,
                    ": weights must be 1-D of length K = ", outputs.size());
  TORCH_CHECK_VALUE(weights.device() == outputs[0].device(), op, ": weights must be on the outputs' device");
  for (const at::Tensor& o : outputs) {
    TORCH_CHECK_VALUE(o.sizes() == outputs[0].sizes() && o.device() == outputs[0].device() &&
                          o.scalar_type() == outputs[0].scalar_type() && o.layout() == at::kStrided,
                      op, ": outputs must share one shape, dtype, device and dense layout");
  }
}

// The K inputs in one shared dense layout: as they are when they share one, else copied (with
// autograd recording the copies) into the first one's layout, or contiguous when it is not dense.
std::vector<at::Tensor> shared_dense_layout(at::TensorList outputs) {
  const at::Tensor& first = outputs[0];
  const bool first_dense = first.is_non_overlapping_and_dense();
  bool shared = first_dense;
  for (size_t k = 1; k < outputs.size() && shared; ++k) shared = same_layout(outputs[k], first);
  if (shared) return outputs.vec();
  const at::Tensor like = first_dense ? first : first.contiguous();
  std::vector<at::Tensor> result{like};
  result.reserve(outputs.size());
  for (const at::Tensor& o : outputs.slice(1)) {
    if (same_layout(o, like)) {
      result.push_back(o);
    } else {
      at::Tensor copy = at::empty_like(like);
      copy.copy_(o);
      result.push_back(copy);
    }
  }
  return result;
}

at::Tensor mixed_sum_autograd(const at::Tensor& weights, at::TensorList outputs) {
  check_arguments(weights, outputs);
  const std::vector<at::Tensor> inputs = shared_dense_layout(outputs);
  return MixedSum::apply(weights, at::TensorList(inputs));
}

// Without autograd (inference mode): the forward kernel alone.
at::Tensor mixed_sum_no_autograd(const at::Tensor& weights, at::TensorList outputs) {
  check_arguments(weights, outputs);
  const std::vector<at::Tensor> inputs = shared_dense_layout(outputs);
  return native_forward(inputs, accumulation_weights(weights, inputs[0]));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastnas, m) {
  m.def("_mixed_sum_autograd(Tensor weights, Tensor[] outputs) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastnas, Autograd, m) {
  m.impl("_mixed_sum_autograd", &mixed_sum_autograd);
}

TORCH_LIBRARY_IMPL(fastnas, CompositeExplicitAutograd, m) {
  m.impl("_mixed_sum_autograd", &mixed_sum_no_autograd);
}

}  // namespace fastnas
