// Reverse-mode autograd of dlkern::max_pool2d and dlkern::max_pool2d_backward at the Autograd dispatch key, so an
// eager call with a gradient, and its backward, never enter Python. C++ autograd Functions have no forward-mode AD:
// dlkern/ops/max_pool.py keeps Python autograd.Functions for forward mode, torch.func and torch.compile.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace dlkern {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using MaxPool2dSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                                                         at::IntArrayRef, at::IntArrayRef, bool);
using BackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                               at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, bool);

const c10::TypedOperatorHandle<MaxPool2dSig>& max_pool2d_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("dlkern::max_pool2d", "").typed<MaxPool2dSig>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSig>& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("dlkern::max_pool2d_backward", "").typed<BackwardSig>();
  return op;
}

// The pooling arguments, kept in the context for the backward.
void save_args(AutogradContext* ctx, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
               at::IntArrayRef dilation, bool ceil_mode) {
  ctx->saved_data["kernel_size"] = kernel_size.vec();
  ctx->saved_data["stride"] = stride.vec();
  ctx->saved_data["padding"] = padding.vec();
  ctx->saved_data["dilation"] = dilation.vec();
  ctx->saved_data["ceil_mode"] = ceil_mode;
}

at::Tensor call_backward(AutogradContext* ctx, const at::Tensor& grad_output, const at::Tensor& input,
                         const at::Tensor& indices) {
  // A backward that builds a graph (double backward) goes through the Autograd key, which records it; any other
  // skips it.
  c10::optional<at::AutoDispatchBelowADInplaceOrView> below;
  if (!at::GradMode::is_enabled()) below.emplace();
  return backward_op().call(grad_output, input, indices, ctx->saved_data["kernel_size"].toIntVector(),
                            ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
                            ctx->saved_data["dilation"].toIntVector(), ctx->saved_data["ceil_mode"].toBool());
}

// The backward is linear in grad_output: its own gradient reads grad_grad_input at each window's argmax (0 where the
// index is outside the plane, which the backward skips); the input only selects the argmax (piecewise constant: no
// gradient).
class MaxPool2dBackwardFunction : public torch::autograd::Function<MaxPool2dBackwardFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_output, const at::Tensor& input,
                            const at::Tensor& indices, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({indices});
    at::AutoDispatchBelowADInplaceOrView guard;
    return backward_op().call(grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_grad_input = grads[0];
    at::Tensor grad_grad_output;
    if (grad_grad_input.defined()) {
      // An index outside the plane (a window wholly in the padding, or a caller's) was skipped by the backward:
      // its gradient is 0, and the gather reads a clamped, in-plane element in its place.
      const at::Tensor indices = ctx->get_saved_variables()[0];
      const at::Tensor flat = indices.flatten(-2);
      const at::Tensor safe = flat.clamp(0, grad_grad_input.size(-2) * grad_grad_input.size(-1) - 1);
      grad_grad_output =
          grad_grad_input.flatten(-2).gather(-1, safe).masked_fill(safe.ne(flat), 0).view(indices.sizes());
    }
    return {grad_grad_output, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

class MaxPool2dFunction : public torch::autograd::Function<MaxPool2dFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               bool ceil_mode) {
    ctx->set_materialize_grads(false);  // no zero-filled gradient for the indices
    save_args(ctx, kernel_size, stride, padding, dilation, ceil_mode);
    at::Tensor output, indices;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(output, indices) = max_pool2d_op().call(input, kernel_size, stride, padding, dilation, ceil_mode);
    }
    ctx->mark_non_differentiable({indices});
    ctx->save_for_backward({input, indices});
    return {output, indices};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor grad_input;
    if (grads[0].defined()) {
      const auto saved = ctx->get_saved_variables();
      grad_input = call_backward(ctx, grads[0], saved[0], saved[1]);
    }
    return {grad_input, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> max_pool2d_autograd(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                       at::IntArrayRef stride, at::IntArrayRef padding,
                                                       at::IntArrayRef dilation, bool ceil_mode) {
  auto outputs = MaxPool2dFunction::apply(input, kernel_size, stride, padding, dilation, ceil_mode);
  return {outputs[0], outputs[1]};
}

at::Tensor max_pool2d_backward_autograd(const at::Tensor& grad_output, const at::Tensor& input,
                                        const at::Tensor& indices, at::IntArrayRef kernel_size,
                                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                        bool ceil_mode) {
  return MaxPool2dBackwardFunction::apply(grad_output, input, indices, kernel_size, stride, padding, dilation,
                                          ceil_mode);
}

}  // namespace

TORCH_LIBRARY_IMPL(dlkern, Autograd, m) {
  m.impl("max_pool2d", &max_pool2d_autograd);
  m.impl("max_pool2d_backward", &max_pool2d_backward_autograd);
}

}  // namespace dlkern
