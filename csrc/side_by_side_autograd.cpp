// The concatenation along dimension 0 of tensors that lie side by side in one storage, as a view:
//
//   _side_by_side(Tensor[] tensors) -> Tensor
//
// fastnas.spaces.ops.cat_parameters calls it for a group's packed convolution weights (the same op
// of several edges, run as one convolution) once it has checked that they are contiguous, in order
// and adjacent; the gradient is split into views, one per tensor, after one copy into their
// contiguous layout. In C++ because a Python autograd.Function costs the host more than the
// concatenation it replaces (benchmarks/RESULTS.md).
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

namespace fastnas {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor side_by_side_view(at::TensorList tensors) {
  const char* op = "fastnas::_side_by_side";
  TORCH_CHECK_VALUE(!tensors.empty(), op, ": tensors must not be empty");
  const at::Tensor& first = tensors[0];
  TORCH_CHECK_VALUE(first.dim() >= 1, op, ": tensors must have a first dimension");
  std::vector<int64_t> shape = first.sizes().vec();
  shape[0] = 0;
  int64_t expected_offset = first.storage_offset();
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK_VALUE(t.is_contiguous() && t.dim() == first.dim() && t.sizes().slice(1) == first.sizes().slice(1) &&
                          t.scalar_type() == first.scalar_type() && t.device() == first.device() &&
                          t.storage().is_alias_of(first.storage()) && t.storage_offset() == expected_offset,
                      op, ": tensors must be contiguous, of one dtype, device and trailing shape, and lie side by "
                      "side, in order, in one storage");
    expected_offset += t.numel();
    shape[0] += t.size(0);
  }
  std::vector<int64_t> strides(shape.size(), 1);
  for (int64_t d = static_cast<int64_t>(shape.size()) - 2; d >= 0; --d) strides[d] = strides[d + 1] * shape[d + 1];
  return first.as_strided(shape, strides, first.storage_offset());
}

class SideBySide : public torch::autograd::Function<SideBySide> {
 public:
  static at::Tensor forward(AutogradContext* ctx, at::TensorList tensors) {
    std::vector<int64_t> sizes;
    sizes.reserve(tensors.size());
    for (const at::Tensor& t : tensors) sizes.push_back(t.size(0));
    ctx->saved_data["sizes"] = sizes;
    ctx->save_for_backward(tensors.vec());  // for the version check: each may be modified in place
    return side_by_side_view(tensors);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    (void)ctx->get_saved_variables();  // raises if a tensor was modified in place since the forward
    const std::vector<int64_t> sizes = ctx->saved_data["sizes"].toIntVector();
    // one copy into the tensors' contiguous layout, where autograd would make one per tensor
    return grads[0].contiguous().split_with_sizes(sizes, 0);
  }
};

at::Tensor side_by_side_autograd(at::TensorList tensors) {
  return SideBySide::apply(tensors);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastnas, m) {
  m.def("_side_by_side(Tensor(a)[] tensors) -> Tensor(a)");  // a view of tensors[0]
}

TORCH_LIBRARY_IMPL(fastnas, Autograd, m) {
  m.impl("_side_by_side", &side_by_side_autograd);
}

TORCH_LIBRARY_IMPL(fastnas, CompositeExplicitAutograd, m) {
  m.impl("_side_by_side", &side_by_side_view);
}

}  // namespace fastnas
