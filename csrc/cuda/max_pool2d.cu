// CUDA kernels for dlkern::max_pool2d and its backward. Only c10's CUDA headers are included: ATen/cuda pulls in
// cuBLAS/cuSPARSE headers that a minimal CUDA toolkit does not ship.
//
// Forward: one thread per output element, NCHW (w fastest) or NHWC (c fastest, coalesced across channels).
// Backward: one thread per input element gathers the outputs whose window can contain it and whose index points at
// it, in a fixed order: deterministic, no atomics (as ATen's CUDA backward). All offsets are 64-bit. An index
// outside [0, H*W) of its plane (ATen's index for a window wholly in the padding, or any int64 a caller passes)
// equals no input element's, so it is skipped, as on the CPU: the backward writes each grad_input element once,
// reads only its own plane's outputs, and indexes nothing by the indices' values.
#include <ATen/Dispatch.h>
#include <ATen/NumericUtils.h>  // at::_isnan
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../max_pool2d.h"

namespace dlkern {
namespace {

constexpr int kThreads = 256;

struct Geometry {  // MaxPool2dShape without the host-only parts
  int64_t kH, kW, sH, sW, pH, pW, dH, dW, N, C, H, W, OH, OW;
};

Geometry geometry(const MaxPool2dShape& s) {
  return {s.kH, s.kW, s.sH, s.sW, s.pH, s.pW, s.dH, s.dW, s.N, s.C, s.H, s.W, s.OH, s.OW};
}

__device__ __forceinline__ int64_t first_valid(int64_t start, int64_t dilation) {
  return start >= 0 ? start : start + ((-start + dilation - 1) / dilation) * dilation;
}

// The max over one window; `in` points at the (n, c) plane (NCHW, step 1) or at (n, 0, 0, c) (NHWC, step C).
template <typename scalar_t>
__device__ __forceinline__ void window_max(const scalar_t* __restrict__ in, int64_t step, const Geometry& g,
                                           int64_t oh, int64_t ow, scalar_t* out, int64_t* ind) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t hstart = oh * g.sH - g.pH;
  const int64_t wstart = ow * g.sW - g.pW;
  acc_t maxval = lower_bound<acc_t>();
  int64_t maxidx = first_valid(hstart, g.dH) * g.W + first_valid(wstart, g.dW);
  for (int64_t kh = 0; kh < g.kH; ++kh) {
    const int64_t ih = hstart + kh * g.dH;
    if (ih < 0 || ih >= g.H) continue;
    for (int64_t kw = 0; kw < g.kW; ++kw) {
      const int64_t iw = wstart + kw * g.dW;
      if (iw < 0 || iw >= g.W) continue;
      const int64_t index = ih * g.W + iw;
      const acc_t val = static_cast<acc_t>(in[index * step]);
      if (val > maxval || at::_isnan(val)) {
        maxval = val;
        maxidx = index;
      }
    }
  }
  *out = static_cast<scalar_t>(maxval);
  *ind = maxidx;
}

template <typename scalar_t>
__global__ void max_pool2d_nchw_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                                       int64_t* __restrict__ ind, Geometry g, int64_t total) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ow = i % g.OW;
    const int64_t oh = (i / g.OW) % g.OH;
    const int64_t plane = i / (g.OW * g.OH);
    window_max(in + plane * g.H * g.W, 1, g, oh, ow, out + i, ind + i);
  }
}

template <typename scalar_t>
__global__ void max_pool2d_nhwc_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                                       int64_t* __restrict__ ind, Geometry g, int64_t total) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = i % g.C;
    const int64_t ow = (i / g.C) % g.OW;
    const int64_t oh = (i / (g.C * g.OW)) % g.OH;
    const int64_t n = i / (g.C * g.OW * g.OH);
    window_max(in + n * g.H * g.W * g.C + c, g.C, g, oh, ow, out + i, ind + i);
  }
}

// The output rows (or columns) whose windows can contain input row `i`: [begin, end).
__device__ __forceinline__ void window_range(int64_t i, int64_t pad, int64_t k, int64_t dilation, int64_t stride,
                                             int64_t out_size, int64_t* begin, int64_t* end) {
  const int64_t extent = (k - 1) * dilation + 1;
  *begin = (i + pad < extent) ? 0 : (i + pad - extent) / stride + 1;
  *end = min((i + pad) / stride + 1, out_size);
}

// `go`/`ind` point at the (n, c) output plane (NCHW, step 1) or at (n, 0, 0, c) (NHWC, step C).
template <typename scalar_t>
__device__ __forceinline__ scalar_t gather_grad(const scalar_t* __restrict__ go, const int64_t* __restrict__ ind,
                                                int64_t step, const Geometry& g, int64_t ih, int64_t iw) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t oh_begin, oh_end, ow_begin, ow_end;
  window_range(ih, g.pH, g.kH, g.dH, g.sH, g.OH, &oh_begin, &oh_end);
  window_range(iw, g.pW, g.kW, g.dW, g.sW, g.OW, &ow_begin, &ow_end);
  const int64_t index = ih * g.W + iw;
  acc_t acc = 0;
  for (int64_t oh = oh_begin; oh < oh_end; ++oh) {
    for (int64_t ow = ow_begin; ow < ow_end; ++ow) {
      const int64_t o = (oh * g.OW + ow) * step;
      if (ind[o] == index) acc += static_cast<acc_t>(go[o]);
    }
  }
  return static_cast<scalar_t>(acc);
}

template <typename scalar_t>
__global__ void max_pool2d_backward_nchw_kernel(const scalar_t* __restrict__ go, const int64_t* __restrict__ ind,
                                                scalar_t* __restrict__ gi, Geometry g, int64_t total) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t iw = i % g.W;
    const int64_t ih = (i / g.W) % g.H;
    const int64_t plane = i / (g.W * g.H);
    const int64_t out_offset = plane * g.OH * g.OW;
    gi[i] = gather_grad(go + out_offset, ind + out_offset, 1, g, ih, iw);
  }
}

template <typename scalar_t>
__global__ void max_pool2d_backward_nhwc_kernel(const scalar_t* __restrict__ go, const int64_t* __restrict__ ind,
                                                scalar_t* __restrict__ gi, Geometry g, int64_t total) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = i % g.C;
    const int64_t iw = (i / g.C) % g.W;
    const int64_t ih = (i / (g.C * g.W)) % g.H;
    const int64_t n = i / (g.C * g.W * g.H);
    const int64_t out_offset = n * g.OH * g.OW * g.C + c;
    gi[i] = gather_grad(go + out_offset, ind + out_offset, g.C, g, ih, iw);
  }
}

// Enough blocks to fill the GPU; the kernels loop over whatever is left (grid-stride).
unsigned int num_blocks(int64_t total) {
  const int64_t max_blocks = 65535LL * 8;
  return static_cast<unsigned int>(std::min<int64_t>((total + kThreads - 1) / kThreads, max_blocks));
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_cuda(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                                   at::IntArrayRef dilation, bool ceil_mode) {
  const MaxPool2dShape s = check_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto format = memory_format_of(s);
  const auto sizes = output_sizes(input, s);
  at::Tensor out = at::empty(sizes, input.options().memory_format(format));
  at::Tensor ind = at::empty(sizes, input.options().dtype(at::kLong).memory_format(format));
  const int64_t total = out.numel();
  if (total == 0) return {out, ind};
  const at::Tensor in = input.contiguous(format);
  const Geometry g = geometry(s);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dlkern::max_pool2d", [&] {
    if (s.channels_last) {
      max_pool2d_nhwc_kernel<scalar_t><<<num_blocks(total), kThreads, 0, stream>>>(
          in.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), ind.data_ptr<int64_t>(), g, total);
    } else {
      max_pool2d_nchw_kernel<scalar_t><<<num_blocks(total), kThreads, 0, stream>>>(
          in.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), ind.data_ptr<int64_t>(), g, total);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, ind};
}

at::Tensor max_pool2d_backward_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                    const at::Tensor& indices, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  const MaxPool2dShape s = check_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode);
  check_backward_args(grad_output, input, indices, s);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto format = memory_format_of(s);
  at::Tensor grad_input = at::empty(input.sizes(), input.options().memory_format(format));
  const int64_t total = grad_input.numel();
  if (total == 0) return grad_input;
  const at::Tensor go = grad_output.contiguous(format);
  const at::Tensor ind = indices.contiguous(format);
  const Geometry g = geometry(s);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dlkern::max_pool2d_backward",
                                  [&] {
    if (s.channels_last) {
      max_pool2d_backward_nhwc_kernel<scalar_t><<<num_blocks(total), kThreads, 0, stream>>>(
          go.const_data_ptr<scalar_t>(), ind.const_data_ptr<int64_t>(), grad_input.data_ptr<scalar_t>(), g, total);
    } else {
      max_pool2d_backward_nchw_kernel<scalar_t><<<num_blocks(total), kThreads, 0, stream>>>(
          go.const_data_ptr<scalar_t>(), ind.const_data_ptr<int64_t>(), grad_input.data_ptr<scalar_t>(), g, total);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(dlkern, CUDA, m) {
  m.impl("max_pool2d", &max_pool2d_cuda);
  m.impl("max_pool2d_backward", &max_pool2d_backward_cuda);
}

}  // namespace dlkern
