// dlkern::max_pool2d: the op schemas and the CPU kernels.
//
// Semantics are ATen's max_pool2d_with_indices: windows scanned rows outer, columns inner; an element replaces the
// running max when it is greater or NaN (first of equal values wins, NaN propagates); the running max starts at
// -inf (lowest for integers) with the index of the window's first in-bounds element; indices are flat h*W + w.
#include <ATen/Dispatch.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "max_pool2d.h"

namespace dlkern {
namespace {

constexpr int64_t kGrainSize = 32768;  // elements of work per parallel task, as ATen's GRAIN_SIZE

int64_t ceil_div(int64_t a, int64_t b) { return a <= 0 ? 0 : (a + b - 1) / b; }

// First in-bounds tap of a window starting at `start` (may be negative, inside the padding).
int64_t first_valid(int64_t start, int64_t dilation) {
  return start >= 0 ? start : start + ceil_div(-start, dilation) * dilation;
}

// The running argmax is kept as a tap number (kh * kW + kw) of the same width as the compared values: GCC
// vectorizes a float compare-and-select only when the selected integers are 32-bit too. It becomes a flat
// index once, at the end.
template <typename acc_t>
using tap_t = std::conditional_t<sizeof(acc_t) == 8, int64_t, int32_t>;

// One tap of n windows at once: window i compares src[i * step] with its running max and takes it (and `tap`)
// when it is greater, or NaN. A compile-time STEP (0: use src_step), restrict pointers, a plain count and no
// branches let the loop vectorize.
template <int64_t STEP, typename scalar_t, typename acc_t, typename tap_type>
inline void update_max(const scalar_t* __restrict__ src, int64_t src_step, int64_t n, tap_type tap,
                       acc_t* __restrict__ maxval, tap_type* __restrict__ maxtap) {
  const int64_t step = STEP ? STEP : src_step;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t val = static_cast<acc_t>(src[i * step]);
    const bool take = (val > maxval[i]) | (val != val);  // val != val: NaN (never for integers)
    maxval[i] = take ? val : maxval[i];
    maxtap[i] = take ? tap : maxtap[i];
  }
}

// The tap of the window's first in-bounds element, which is ATen's initial argmax.
inline int64_t first_tap(int64_t hstart, int64_t wstart, const MaxPool2dShape& s) {
  return (first_valid(hstart, s.dH) - hstart) / s.dH * s.kW + (first_valid(wstart, s.dW) - wstart) / s.dW;
}

inline int64_t tap_index(int64_t tap, int64_t hstart, int64_t wstart, const MaxPool2dShape& s) {
  return (hstart + tap / s.kW * s.dH) * s.W + wstart + tap % s.kW * s.dW;
}

// NCHW: one task is one output row of one plane. The taps are the outer loops and the output columns the inner
// one, so the compare-and-select vectorizes; every output still sees its taps rows-outer, columns-inner.
template <typename scalar_t>
void max_pool2d_nchw(const scalar_t* in, scalar_t* out, int64_t* ind, const MaxPool2dShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = s.N * s.C * s.OH;
  const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, s.OW * s.kH * s.kW));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> maxval(s.OW);
    std::vector<tap_t<acc_t>> maxtap(s.OW);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t plane = row / s.OH;
      const int64_t oh = row % s.OH;
      const scalar_t* in_plane = in + plane * s.H * s.W;
      const int64_t hstart = oh * s.sH - s.pH;
      for (int64_t ow = 0; ow < s.OW; ++ow) {
        maxval[ow] = lower_bound<acc_t>();
        maxtap[ow] = first_tap(hstart, ow * s.sW - s.pW, s);
      }
      for (int64_t kh = 0; kh < s.kH; ++kh) {
        const int64_t ih = hstart + kh * s.dH;
        if (ih < 0 || ih >= s.H) continue;
        const scalar_t* in_row = in_plane + ih * s.W;
        for (int64_t kw = 0; kw < s.kW; ++kw) {
          const int64_t offset = kw * s.dW - s.pW;  // iw = ow * sW + offset
          const int64_t ow_begin = offset >= 0 ? 0 : ceil_div(-offset, s.sW);
          const int64_t ow_end = std::min(s.OW, ceil_div(s.W - offset, s.sW));
          if (ow_end <= ow_begin) continue;
          const scalar_t* src = in_row + ow_begin * s.sW + offset;
          const int64_t n = ow_end - ow_begin;
          const tap_t<acc_t> tap = kh * s.kW + kw;
          acc_t* mv = maxval.data() + ow_begin;
          tap_t<acc_t>* mt = maxtap.data() + ow_begin;
          if (s.sW == 1) {
            update_max<1>(src, 1, n, tap, mv, mt);
          } else if (s.sW == 2) {
            update_max<2>(src, 2, n, tap, mv, mt);
          } else {
            update_max<0>(src, s.sW, n, tap, mv, mt);
          }
        }
      }
      for (int64_t ow = 0; ow < s.OW; ++ow) {
        out[row * s.OW + ow] = static_cast<scalar_t>(maxval[ow]);
        ind[row * s.OW + ow] = tap_index(maxtap[ow], hstart, ow * s.sW - s.pW, s);
      }
    }
  });
}

// NHWC: one task is one output pixel; the channel loop is innermost and contiguous.
template <typename scalar_t>
void max_pool2d_nhwc(const scalar_t* in, scalar_t* out, int64_t* ind, const MaxPool2dShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = s.C;
  const int64_t pixels = s.N * s.OH * s.OW;
  const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, C * s.kH * s.kW));
  at::parallel_for(0, pixels, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> maxval(C);
    std::vector<tap_t<acc_t>> maxtap(C);
    for (int64_t pixel = begin; pixel < end; ++pixel) {
      const int64_t n = pixel / (s.OH * s.OW);
      const int64_t oh = (pixel / s.OW) % s.OH;
      const int64_t ow = pixel % s.OW;
      const int64_t hstart = oh * s.sH - s.pH;
      const int64_t wstart = ow * s.sW - s.pW;
      const scalar_t* in_image = in + n * s.H * s.W * C;
      std::fill(maxval.begin(), maxval.end(), lower_bound<acc_t>());
      std::fill(maxtap.begin(), maxtap.end(), first_tap(hstart, wstart, s));
      for (int64_t kh = 0; kh < s.kH; ++kh) {
        const int64_t ih = hstart + kh * s.dH;
        if (ih < 0 || ih >= s.H) continue;
        for (int64_t kw = 0; kw < s.kW; ++kw) {
          const int64_t iw = wstart + kw * s.dW;
          if (iw < 0 || iw >= s.W) continue;
          update_max<1>(in_image + (ih * s.W + iw) * C, 1, C, tap_t<acc_t>(kh * s.kW + kw), maxval.data(),
                        maxtap.data());
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        out[pixel * C + c] = static_cast<scalar_t>(maxval[c]);
        ind[pixel * C + c] = tap_index(maxtap[c], hstart, wstart, s);
      }
    }
  });
}

// Backward scatters grad_output into its argmax. Each task owns whole planes (NCHW) or whole images (NHWC), so
// every grad_input element is summed by one thread in a fixed order: deterministic. Sums run in opmath precision.
template <typename scalar_t>
void max_pool2d_backward_nchw(const scalar_t* go, const int64_t* ind, scalar_t* gi, const MaxPool2dShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane_in = s.H * s.W, plane_out = s.OH * s.OW;
  at::parallel_for(0, s.N * s.C, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(plane_in);
    for (int64_t plane = begin; plane < end; ++plane) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      const scalar_t* go_plane = go + plane * plane_out;
      const int64_t* ind_plane = ind + plane * plane_out;
      for (int64_t o = 0; o < plane_out; ++o) {
        const int64_t index = ind_plane[o];
        if (index >= 0 && index < plane_in) acc[index] += static_cast<acc_t>(go_plane[o]);
      }
      scalar_t* gi_plane = gi + plane * plane_in;
      for (int64_t i = 0; i < plane_in; ++i) gi_plane[i] = static_cast<scalar_t>(acc[i]);
    }
  });
}

template <typename scalar_t>
void max_pool2d_backward_nhwc(const scalar_t* go, const int64_t* ind, scalar_t* gi, const MaxPool2dShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = s.C, plane_in = s.H * s.W, plane_out = s.OH * s.OW;
  at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(plane_in * C);
    for (int64_t n = begin; n < end; ++n) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      const scalar_t* go_image = go + n * plane_out * C;
      const int64_t* ind_image = ind + n * plane_out * C;
      for (int64_t o = 0; o < plane_out; ++o) {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t index = ind_image[o * C + c];
          if (index >= 0 && index < plane_in) acc[index * C + c] += static_cast<acc_t>(go_image[o * C + c]);
        }
      }
      scalar_t* gi_image = gi + n * plane_in * C;
      for (int64_t i = 0; i < plane_in * C; ++i) gi_image[i] = static_cast<scalar_t>(acc[i]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_cpu(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                                  at::IntArrayRef dilation, bool ceil_mode) {
  const MaxPool2dShape s = check_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode);
  const auto format = memory_format_of(s);
  const auto sizes = output_sizes(input, s);
  at::Tensor out = at::empty(sizes, input.options().memory_format(format));
  at::Tensor ind = at::empty(sizes, input.options().dtype(at::kLong).memory_format(format));
  if (out.numel() == 0) return {out, ind};
  const at::Tensor in = input.contiguous(format);
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dlkern::max_pool2d", [&] {
    if (s.channels_last) {
      max_pool2d_nhwc<scalar_t>(in.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), ind.data_ptr<int64_t>(),
                                s);
    } else {
      max_pool2d_nchw<scalar_t>(in.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), ind.data_ptr<int64_t>(),
                                s);
    }
  });
  return {out, ind};
}

at::Tensor max_pool2d_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                   const at::Tensor& indices, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  const MaxPool2dShape s = check_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode);
  check_backward_args(grad_output, input, indices, s);
  const auto format = memory_format_of(s);
  at::Tensor grad_input = at::empty(input.sizes(), input.options().memory_format(format));
  if (grad_input.numel() == 0) return grad_input;
  const at::Tensor go = grad_output.contiguous(format);
  const at::Tensor ind = indices.contiguous(format);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dlkern::max_pool2d_backward",
                                  [&] {
    if (s.channels_last) {
      max_pool2d_backward_nhwc<scalar_t>(go.const_data_ptr<scalar_t>(), ind.const_data_ptr<int64_t>(),
                                         grad_input.data_ptr<scalar_t>(), s);
    } else {
      max_pool2d_backward_nchw<scalar_t>(go.const_data_ptr<scalar_t>(), ind.const_data_ptr<int64_t>(),
                                         grad_input.data_ptr<scalar_t>(), s);
    }
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY(dlkern, m) {
  m.def(
      "max_pool2d(Tensor input, int[] kernel_size, int[] stride, int[] padding, int[] dilation, bool ceil_mode)"
      " -> (Tensor, Tensor)");
  m.def(
      "max_pool2d_backward(Tensor grad_output, Tensor input, Tensor indices, int[] kernel_size, int[] stride,"
      " int[] padding, int[] dilation, bool ceil_mode) -> Tensor");
}

TORCH_LIBRARY_IMPL(dlkern, CPU, m) {
  m.impl("max_pool2d", &max_pool2d_cpu);
  m.impl("max_pool2d_backward", &max_pool2d_backward_cpu);
}

}  // namespace dlkern
