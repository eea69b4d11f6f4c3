// Shared by the CPU and CUDA max-pool kernels: ATen's argument checks and output-size rule, reproduced exactly
// (aten/src/ATen/native/DilatedMaxPool2d.cpp and Pool.h), so both devices accept and reject the same inputs
// with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <limits>
#include <vector>

namespace dlkern {

// The running max starts below every value: -inf for floating types, the lowest value for integers.
template <typename T>
C10_HOST_DEVICE constexpr T lower_bound() {
  if constexpr (std::numeric_limits<T>::has_infinity) {
    return -std::numeric_limits<T>::infinity();
  } else {
    return std::numeric_limits<T>::lowest();
  }
}

struct MaxPool2dShape {
  int64_t kH, kW, sH, sW, pH, pW, dH, dW;
  int64_t N, C, H, W, OH, OW;
  bool channels_last;  // NHWC storage for input, output and indices (4-D inputs only)
};

// floor division, as ATen's div_rtn
inline int64_t floor_div(int64_t a, int64_t b) {
  int64_t q = a / b;
  int64_t r = a % b;
  return (r != 0 && ((r < 0) != (b < 0))) ? q - 1 : q;
}

inline int64_t pooling_output_size(int64_t in, int64_t k, int64_t pad, int64_t stride, int64_t dilation,
                                   bool ceil_mode) {
  TORCH_CHECK(stride != 0, "stride should not be zero");
  TORCH_CHECK(pad >= 0, "pad must be non-negative, but got pad: ", pad);
  TORCH_CHECK(pad <= ((k - 1) * dilation + 1) / 2,
              "pad should be at most half of effective kernel size, but got pad=", pad, ", kernel_size=", k,
              " and dilation=", dilation);
  int64_t out = floor_div(in + 2 * pad - dilation * (k - 1) - 1 + (ceil_mode ? stride - 1 : 0), stride) + 1;
  // with ceil_mode the last window must start inside the input or its left padding
  if (ceil_mode && (out - 1) * stride >= in + pad) {
    --out;
  }
  return out;
}

inline MaxPool2dShape check_max_pool2d(const at::Tensor& input, at::IntArrayRef kernel_size,
                                       at::IntArrayRef stride, at::IntArrayRef padding,
                                       at::IntArrayRef dilation, bool ceil_mode) {
  TORCH_CHECK(kernel_size.size() == 1 || kernel_size.size() == 2,
              "max_pool2d: kernel_size must either be a single int, or a tuple of two ints");
  TORCH_CHECK(stride.empty() || stride.size() == 1 || stride.size() == 2,
              "max_pool2d: stride must either be omitted, a single int, or a tuple of two ints");
  TORCH_CHECK(padding.size() == 1 || padding.size() == 2,
              "max_pool2d: padding must either be a single int, or a tuple of two ints");
  TORCH_CHECK(dilation.size() == 1 || dilation.size() == 2,
              "max_pool2d: dilation must be either a single int, or a tuple of two ints");
  MaxPool2dShape s;
  s.kH = kernel_size[0];
  s.kW = kernel_size.size() == 1 ? s.kH : kernel_size[1];
  s.sH = stride.empty() ? s.kH : stride[0];
  s.sW = stride.empty() ? s.kW : (stride.size() == 1 ? s.sH : stride[1]);
  s.pH = padding[0];
  s.pW = padding.size() == 1 ? s.pH : padding[1];
  s.dH = dilation[0];
  s.dW = dilation.size() == 1 ? s.dH : dilation[1];

  const auto memory_format = input.suggest_memory_format();
  s.channels_last = memory_format == at::MemoryFormat::ChannelsLast;
  const int64_t ndim = input.dim();
  if (s.channels_last) {
    TORCH_CHECK(ndim == 4, "non-empty 4D (batch mode) tensor expected for input with channels_last layout");
  } else {
    TORCH_CHECK(ndim == 3 || ndim == 4, "non-empty 3D or 4D (batch mode) tensor expected for input");
  }
  s.N = ndim == 4 ? input.size(-4) : 1;
  s.C = input.size(-3);
  s.H = input.size(-2);
  s.W = input.size(-1);
  s.OH = pooling_output_size(s.H, s.kH, s.pH, s.sH, s.dH, ceil_mode);
  s.OW = pooling_output_size(s.W, s.kW, s.pW, s.sW, s.dW, ceil_mode);

  TORCH_CHECK(s.kW > 0 && s.kH > 0, "kernel size should be greater than zero, but got kH: ", s.kH,
              " kW: ", s.kW);
  TORCH_CHECK(s.sW > 0 && s.sH > 0, "stride should be greater than zero, but got dH: ", s.sH, " dW: ", s.sW);
  TORCH_CHECK(s.dH > 0 && s.dW > 0, "dilation should be greater than zero, but got dilationH: ", s.dH,
              " dilationW: ", s.dW);
  const bool valid_dims = input.size(1) != 0 && input.size(2) != 0;
  if (s.channels_last) {
    TORCH_CHECK(ndim == 4 && valid_dims && input.size(3) != 0,
                "Expected 4D (batch mode) tensor expected for input with channels_last layout"
                " with optional 0 dim batch size for input, but got: ",
                input.sizes());
  } else {
    TORCH_CHECK((ndim == 3 && input.size(0) != 0 && valid_dims) ||
                    (ndim == 4 && valid_dims && input.size(3) != 0),
                "Expected 3D or 4D (batch mode) tensor with optional 0 dim batch size for input, but got:",
                input.sizes());
  }
  TORCH_CHECK(s.kW / 2 >= s.pW && s.kH / 2 >= s.pH,
              "pad should be smaller than or equal to half of kernel size, but got padW = ", s.pW,
              ", padH = ", s.pH, ", kW = ", s.kW, ", kH = ", s.kH);
  // ATen keeps kH and kW in `int`; dlkern numbers the taps of a window in 32 bits as well.
  TORCH_CHECK(s.kH * s.kW <= std::numeric_limits<int32_t>::max(), "max_pool2d: kernel of ", s.kH, "x", s.kW,
              " has more than 2**31 - 1 elements");
  TORCH_CHECK(s.OW >= 1 && s.OH >= 1, "Given input size: (", s.C, "x", s.H, "x", s.W, "). ",
              "Calculated output size: (", s.C, "x", s.OH, "x", s.OW, "). ", "Output size is too small");
  return s;
}

inline at::MemoryFormat memory_format_of(const MaxPool2dShape& s) {
  return s.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// The output shape: the input's with (H, W) replaced by (OH, OW).
inline std::vector<int64_t> output_sizes(const at::Tensor& input, const MaxPool2dShape& s) {
  std::vector<int64_t> sizes(input.sizes().begin(), input.sizes().end());
  sizes[sizes.size() - 2] = s.OH;
  sizes[sizes.size() - 1] = s.OW;
  return sizes;
}

inline void check_backward_args(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& indices,
                                const MaxPool2dShape& s) {
  const auto expected = output_sizes(input, s);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(expected), "max_pool2d_backward: grad_output has shape ",
              grad_output.sizes(), " but the pooled output has shape ", at::IntArrayRef(expected));
  TORCH_CHECK(indices.sizes() == at::IntArrayRef(expected), "max_pool2d_backward: indices have shape ",
              indices.sizes(), " but the pooled output has shape ", at::IntArrayRef(expected));
  TORCH_CHECK(indices.scalar_type() == at::kLong, "max_pool2d_backward: indices must be int64, got ",
              indices.scalar_type());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "max_pool2d_backward: grad_output dtype ",
              grad_output.scalar_type(), " does not match input dtype ", input.scalar_type());
  TORCH_CHECK(grad_output.device() == input.device() && indices.device() == input.device(),
              "max_pool2d_backward: grad_output, input and indices must be on one device, got ",
              grad_output.device(), ", ", input.device(), " and ", indices.device());
}

}  // namespace dlkern
