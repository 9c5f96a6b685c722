// Eager autograd of the channels_last average pooling (fastnas.ops.avg_pool.avg_pool2d) on the
// registered CPU kernels, in C++:
//
//   _avg_pool2d_autograd(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding,
//                        bool count_include_pad) -> Tensor
//
// runs fastnas::avg_pool2d_nhwc forward and fastnas::avg_pool2d_nhwc_backward backward, as the
// Python autograd.Functions beside them do (which torch.compile traces instead): in C++ because their
// host time is more than a small pooling's kernels (benchmarks/RESULTS.md). Pooling is linear: the backward is a function of the
// output gradient alone, whose own backward is the pooling again, so the two Functions below are
// each other's backward and a double backward (create_graph=True) runs the kernels too.
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

namespace fastnas {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor pool(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                at::IntArrayRef padding, bool count_include_pad) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastnas::avg_pool2d_nhwc", "")
                             .typed<at::Tensor(const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                                               at::IntArrayRef, bool)>();
  return op.call(input, kernel_size, stride, padding, count_include_pad);
}

at::Tensor pool_input_grad(const at::Tensor& grad, at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                           at::IntArrayRef stride, at::IntArrayRef padding, bool count_include_pad) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastnas::avg_pool2d_nhwc_backward", "")
                             .typed<at::Tensor(const at::Tensor&, c10::SymIntArrayRef, at::IntArrayRef,
                                               at::IntArrayRef, at::IntArrayRef, bool)>();
  return op.call(grad.contiguous(at::MemoryFormat::ChannelsLast), c10::fromIntArrayRefSlow(input_size),
                 kernel_size, stride, padding, count_include_pad);
}

// The pooling's geometry, kept in a Function's saved data.
void save_geometry(AutogradContext* ctx, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                   at::IntArrayRef padding, bool count_include_pad) {
  ctx->saved_data["kernel_size"] = kernel_size.vec();
  ctx->saved_data["stride"] = stride.vec();
  ctx->saved_data["padding"] = padding.vec();
  ctx->saved_data["count_include_pad"] = count_include_pad;
}

struct Geometry {
  std::vector<int64_t> kernel_size, stride, padding;
  bool count_include_pad;
};

Geometry saved_geometry(AutogradContext* ctx) {
  return {ctx->saved_data["kernel_size"].toIntVector(), ctx->saved_data["stride"].toIntVector(),
          ctx->saved_data["padding"].toIntVector(), ctx->saved_data["count_include_pad"].toBool()};
}

class AvgPool : public torch::autograd::Function<AvgPool> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, at::IntArrayRef kernel_size,
                            at::IntArrayRef stride, at::IntArrayRef padding, bool count_include_pad) {
    save_geometry(ctx, kernel_size, stride, padding, count_include_pad);
    ctx->saved_data["input_size"] = input.sizes().vec();  // nothing else is needed for the backward
    return pool(input, kernel_size, stride, padding, count_include_pad);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads);
};

// The input gradient as a function of the output gradient (the pooling's transpose).
class AvgPoolInputGrad : public torch::autograd::Function<AvgPoolInputGrad> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad, at::IntArrayRef input_size,
                            at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                            bool count_include_pad) {
    save_geometry(ctx, kernel_size, stride, padding, count_include_pad);
    return pool_input_grad(grad, input_size, kernel_size, stride, padding, count_include_pad);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Geometry g = saved_geometry(ctx);
    const at::Tensor grad_grad = grads[0].contiguous(at::MemoryFormat::ChannelsLast);
    return {AvgPool::apply(grad_grad, g.kernel_size, g.stride, g.padding, g.count_include_pad), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

variable_list AvgPool::backward(AutogradContext* ctx, variable_list grads) {
  // recorded by autograd only under create_graph=True; otherwise the kernel alone
  const Geometry g = saved_geometry(ctx);
  const std::vector<int64_t> input_size = ctx->saved_data["input_size"].toIntVector();
  return {AvgPoolInputGrad::apply(grads[0], input_size, g.kernel_size, g.stride, g.padding, g.count_include_pad),
          at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
}

at::Tensor avg_pool2d_autograd(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                               at::IntArrayRef padding, bool count_include_pad) {
  return AvgPool::apply(input, kernel_size, stride, padding, count_include_pad);
}

// Without autograd (inference mode): the forward kernel alone.
at::Tensor avg_pool2d_no_autograd(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                  at::IntArrayRef padding, bool count_include_pad) {
  return pool(input, kernel_size, stride, padding, count_include_pad);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastnas, m) {
  m.def(
      "_avg_pool2d_autograd(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding,"
      " bool count_include_pad) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastnas, Autograd, m) {
  m.impl("_avg_pool2d_autograd", &avg_pool2d_autograd);
}

TORCH_LIBRARY_IMPL(fastnas, CompositeExplicitAutograd, m) {
  m.impl("_avg_pool2d_autograd", &avg_pool2d_no_autograd);
}

}  // namespace fastnas
