// Eager autograd of the lean BatchNorm (fastnas.ops.batch_norm.lean_batch_norm) on the registered
// kernels, in C++:
//
//   _lean_batch_norm_autograd(Tensor input, int parts, Tensor(a!)? running_mean, Tensor(b!)? running_var,
//                             float momentum, float eps) -> Tensor[]
//
// returns the parts' outputs, then mean (not differentiable) and invstd, as the Python autograd.Function
// beside it does; it runs fastnas::batch_norm_parts forward and fastnas::batch_norm_parts_backward
// backward (the CPU kernels, or the Triton ones registered for CUDA). In C++ because a Python
// autograd.Function's host time is more than the kernel's at supernet sizes (benchmarks/RESULTS.md).
// The backward of a backward (create_graph=True) and a gradient for invstd go to
// fastnas::_lean_batch_norm_backward_composite, PyTorch's differentiable operators, registered from
// Python (fastnas/ops/batch_norm.py). fastnas.ops.batch_norm.lean_batch_norm calls this op outside
// torch.compile, where the kernels apply.
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fastnas {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor, at::Tensor> parts_forward(const at::Tensor& input, int64_t parts,
                                                             const std::optional<at::Tensor>& running_mean,
                                                             const std::optional<at::Tensor>& running_var,
                                                             double momentum, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastnas::batch_norm_parts", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, int64_t, const std::optional<at::Tensor>&,
                                 const std::optional<at::Tensor>&, double, double)>();
  return op.call(input, parts, running_mean, running_var, momentum, eps);
}

// (Tensor?[] is a c10::List in the dispatcher's calling convention)
using OptionalTensors = c10::List<std::optional<at::Tensor>>;

at::Tensor parts_backward(const OptionalTensors& grads, at::TensorList outputs, const at::Tensor& invstd) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastnas::batch_norm_parts_backward", "")
                             .typed<at::Tensor(const OptionalTensors&, at::TensorList, const at::Tensor&)>();
  return op.call(grads, outputs, invstd);
}

at::Tensor composite_backward(const OptionalTensors& grads, at::TensorList outputs, const at::Tensor& invstd,
                              const std::optional<at::Tensor>& invstd_grad, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastnas::_lean_batch_norm_backward_composite", "")
                             .typed<at::Tensor(const OptionalTensors&, at::TensorList, const at::Tensor&,
                                               const std::optional<at::Tensor>&, double)>();
  return op.call(grads, outputs, invstd, invstd_grad, eps);
}

class LeanBatchNorm : public torch::autograd::Function<LeanBatchNorm> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, int64_t parts,
                               const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_var, double momentum, double eps) {
    auto [out, mean, invstd] = parts_forward(input, parts, running_mean, running_var, momentum, eps);
    variable_list result = out.unbind(0);
    std::vector<at::Tensor> saved{invstd};
    saved.insert(saved.end(), result.begin(), result.end());  // the outputs alone serve the backward
    ctx->save_for_backward(saved);
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({mean});
    ctx->set_materialize_grads(false);
    result.push_back(mean);
    result.push_back(invstd);
    return result;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& invstd = saved[0];
    const std::vector<at::Tensor> outputs(saved.begin() + 1, saved.end());
    const size_t parts = outputs.size();
    OptionalTensors output_grads;
    output_grads.reserve(parts);
    for (size_t p = 0; p < parts; ++p) {
      output_grads.push_back(grads[p].defined() ? std::optional<at::Tensor>(grads[p]) : std::nullopt);
    }
    const at::Tensor& invstd_grad = grads[parts + 1];
    at::Tensor input_grad;
    if (at::GradMode::is_enabled() || invstd_grad.defined()) {
      // create_graph=True (autograd records this backward) or a use of invstd: differentiable operators
      const std::optional<at::Tensor> maybe_invstd_grad =
          invstd_grad.defined() ? std::optional<at::Tensor>(invstd_grad) : std::nullopt;
      input_grad = composite_backward(output_grads, outputs, invstd, maybe_invstd_grad,
                                      ctx->saved_data["eps"].toDouble());
    } else {
      input_grad = parts_backward(output_grads, outputs, invstd);
    }
    return {input_grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::vector<at::Tensor> lean_batch_norm_autograd(const at::Tensor& input, int64_t parts,
                                                 const std::optional<at::Tensor>& running_mean,
                                                 const std::optional<at::Tensor>& running_var, double momentum,
                                                 double eps) {
  return LeanBatchNorm::apply(input, parts, running_mean, running_var, momentum, eps);
}

// Without autograd (inference mode): the forward kernel alone.
std::vector<at::Tensor> lean_batch_norm_no_autograd(const at::Tensor& input, int64_t parts,
                                                    const std::optional<at::Tensor>& running_mean,
                                                    const std::optional<at::Tensor>& running_var, double momentum,
                                                    double eps) {
  auto [out, mean, invstd] = parts_forward(input, parts, running_mean, running_var, momentum, eps);
  std::vector<at::Tensor> result = out.unbind(0);
  result.push_back(mean);
  result.push_back(invstd);
  return result;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastnas, m) {
  m.def(
      "_lean_batch_norm_autograd(Tensor input, int parts, Tensor(a!)? running_mean, Tensor(b!)? running_var,"
      " float momentum, float eps) -> Tensor[]");
  // PyTorch's differentiable BatchNorm backward from the parts' gradients and outputs, plus the
  // gradient through invstd when given; registered from Python (CompositeImplicitAutograd).
  m.def(
      "_lean_batch_norm_backward_composite(Tensor?[] grads, Tensor[] outputs, Tensor invstd, Tensor? invstd_grad,"
      " float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastnas, Autograd, m) {
  m.impl("_lean_batch_norm_autograd", &lean_batch_norm_autograd);
}

TORCH_LIBRARY_IMPL(fastnas, CompositeExplicitAutograd, m) {
  m.impl("_lean_batch_norm_autograd", &lean_batch_norm_no_autograd);
}

}  // namespace fastnas
