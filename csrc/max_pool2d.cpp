// dlkern::max_pool2d: the op schemas and the CPU kernels.
//
// Semantics are ATen's max_pool2d_with_indices: windows scanned rows outer, columns inner; an element replaces the
// running max when it is greater or NaN (first of equal values wins, NaN propagates); the running max starts at
// -inf (lowest for integers) with the index of the window's first in-bounds element; indices are flat h*W + w.
//
// The loops are plain C++ shaped for the compiler's auto-vectorizer. On x86-64 each is compiled three times, for
// AVX-512, AVX2 and the baseline ISA, and the variant is picked at run time as ATen picks its own kernels, so one
// build runs on any x86-64 CPU at that CPU's vector width.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "max_pool2d.h"

#if defined(__GNUC__) || defined(__clang__)
#define DLKERN_INLINE inline __attribute__((always_inline))
#else
#define DLKERN_INLINE inline
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DLKERN_X86_VARIANTS 1
#define DLKERN_TARGET_AVX2 __attribute__((target("avx2,fma,bmi,bmi2,popcnt")))
#define DLKERN_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,bmi2,popcnt")))
#endif

namespace dlkern {
namespace {

constexpr int64_t kGrainSize = 32768;  // elements of work per parallel task, as ATen's GRAIN_SIZE

// ---------------------------------------------------------------------------------------------------------------
// Run-time ISA choice
// ---------------------------------------------------------------------------------------------------------------

enum class Isa { kBaseline, kAvx2, kAvx512 };

// ATen's own choice (the CPU's best, or what ATEN_CPU_CAPABILITY asks for), within what this CPU really runs.
Isa cpu_isa() {
  static const Isa isa = [] {
#ifdef DLKERN_X86_VARIANTS
    const std::string capability = at::get_cpu_capability();
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
                      __builtin_cpu_supports("popcnt");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    if (capability == "AVX512" && avx512) return Isa::kAvx512;
    if ((capability == "AVX512" || capability == "AVX2") && avx2) return Isa::kAvx2;
#endif
    return Isa::kBaseline;
  }();
  return isa;
}

#ifdef DLKERN_X86_VARIANTS
template <typename Body, typename... Args>
DLKERN_TARGET_AVX512 void run_avx512(Args... args) {
  Body::run(args...);
}
template <typename Body, typename... Args>
DLKERN_TARGET_AVX2 void run_avx2(Args... args) {
  Body::run(args...);
}
#endif

// Body::run(args...), compiled for this CPU's ISA. Body::run and everything it calls are force-inlined, so each
// variant vectorizes them for its own ISA.
template <typename Body, typename... Args>
void run_for_cpu(Args... args) {
#ifdef DLKERN_X86_VARIANTS
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return run_avx512<Body>(args...);
    case Isa::kAvx2:
      return run_avx2<Body>(args...);
    case Isa::kBaseline:
      break;
  }
#endif
  Body::run(args...);
}

// ---------------------------------------------------------------------------------------------------------------
// Shared pieces
// ---------------------------------------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return a <= 0 ? 0 : (a + b - 1) / b; }

// First in-bounds tap of a window starting at `start` (may be negative, inside the padding).
int64_t first_valid(int64_t start, int64_t dilation) {
  return start >= 0 ? start : start + ceil_div(-start, dilation) * dilation;
}

// ATen's update rule: the new value wins when it is greater, or NaN (val != val; never for integers).
template <typename acc_t>
DLKERN_INLINE bool takes(acc_t val, acc_t max) {
  return (val > max) | (val != val);
}

// take ? a : b without a branch: on random data a branch per element mispredicts half the time, which costs more
// than the whole select (GCC turns a scalar floating-point ?: into one).
template <typename T>
DLKERN_INLINE T select(bool take, T a, T b) {
  if constexpr (std::is_floating_point_v<T>) {
    using bits_t = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
    bits_t x, y;
    std::memcpy(&x, &a, sizeof(T));
    std::memcpy(&y, &b, sizeof(T));
    const bits_t mask = bits_t(0) - static_cast<bits_t>(take);
    const bits_t r = (x & mask) | (y & ~mask);
    T out;
    std::memcpy(&out, &r, sizeof(T));
    return out;
  } else {
    return take ? a : b;
  }
}

// The running argmax is kept in integers as wide as the compared values where it fits (a float compare selects
// 32-bit lanes: GCC vectorizes the select only then); it is widened to int64 on the store.
template <typename acc_t>
using narrow_index_t = std::conditional_t<sizeof(acc_t) == 8, int64_t, int32_t>;

// An output tensor on 2 MB pages where the kernel allows it (transparent huge pages in "madvise" mode): a large
// fresh tensor is first touched by the kernel that writes it, and on 4 KB pages those page faults cost more than
// the kernel itself (a 100 MB gradient: 40 of ATen's 46 ms on a 2-core VM, 6 ms on 2 MB pages). Only tensors
// above glibc's largest mmap threshold (32 MB) are advised: they are mapped for themselves and unmapped when
// freed, so no heap range is left advised. Every advised page is written at once, so no memory is added.
// PyTorch's allocator does the same for every allocation >= 2 MB under THP_MEM_ALLOC_ENABLE=1.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20, kAdviseAbove = uintptr_t(32) << 20;
  if (out.nbytes() > kAdviseAbove) {
    const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t last = (begin + out.nbytes()) & ~(kHugePage - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice only
  }
#endif
  return out;
}

// The 2x2, stride-2 window without padding or dilation (every classic CNN's pool), whose windows tile the input.
bool is_2x2_tiling(const MaxPool2dShape& s) {
  return s.kH == 2 && s.kW == 2 && s.sH == 2 && s.sW == 2 && s.pH == 0 && s.pW == 0 && s.dH == 1 && s.dW == 1 &&
         2 * s.OH <= s.H && 2 * s.OW <= s.W;
}

// ---------------------------------------------------------------------------------------------------------------
// Forward, NCHW
// ---------------------------------------------------------------------------------------------------------------

// Any window. One output row at a time: the taps are the outer loops and the output columns the inner one, so the
// compare-and-select vectorizes; every output still sees its taps rows-outer, columns-inner. The running argmax
// is kept minus ow * sW, which makes each tap's index one scalar for the whole row.
template <typename scalar_t, typename index_t>
struct PoolNchw {
  using acc_t = at::opmath_type<scalar_t>;

  DLKERN_INLINE static void run(const scalar_t* in, scalar_t* out, int64_t* ind, const MaxPool2dShape* sp,
                                const int64_t* ow_range, const index_t* first_w, int64_t begin, int64_t end) {
    const MaxPool2dShape& s = *sp;
    std::vector<acc_t> maxval(s.OW);
    std::vector<index_t> maxrel(s.OW);
    acc_t* __restrict__ mv = maxval.data();
    index_t* __restrict__ mr = maxrel.data();
    for (int64_t row = begin; row < end; ++row) {
      const int64_t plane = row / s.OH;
      const int64_t oh = row % s.OH;
      const scalar_t* in_plane = in + plane * s.H * s.W;
      const int64_t hstart = oh * s.sH - s.pH;
      const index_t first_h = static_cast<index_t>(first_valid(hstart, s.dH) * s.W);
      for (int64_t ow = 0; ow < s.OW; ++ow) {
        mv[ow] = lower_bound<acc_t>();
        mr[ow] = first_h + first_w[ow];
      }
      for (int64_t kh = 0; kh < s.kH; ++kh) {
        const int64_t ih = hstart + kh * s.dH;
        if (ih < 0 || ih >= s.H) continue;
        for (int64_t kw = 0; kw < s.kW; ++kw) {
          const int64_t ow_begin = ow_range[2 * kw], ow_end = ow_range[2 * kw + 1];
          const int64_t offset = kw * s.dW - s.pW;  // iw = ow * sW + offset
          const index_t rel = static_cast<index_t>(ih * s.W + offset);
          const scalar_t* __restrict__ src = in_plane + ih * s.W + offset;
          if (s.sW == 1) {
            for (int64_t ow = ow_begin; ow < ow_end; ++ow) update(src[ow], rel, mv[ow], mr[ow]);
          } else if (s.sW == 2) {
            for (int64_t ow = ow_begin; ow < ow_end; ++ow) update(src[2 * ow], rel, mv[ow], mr[ow]);
          } else {
            for (int64_t ow = ow_begin; ow < ow_end; ++ow) update(src[ow * s.sW], rel, mv[ow], mr[ow]);
          }
        }
      }
      scalar_t* __restrict__ out_row = out + row * s.OW;
      int64_t* __restrict__ ind_row = ind + row * s.OW;
      for (int64_t ow = 0; ow < s.OW; ++ow) {
        out_row[ow] = static_cast<scalar_t>(mv[ow]);
        ind_row[ow] = static_cast<int64_t>(mr[ow]) + ow * s.sW;
      }
    }
  }

  DLKERN_INLINE static void update(scalar_t x, index_t rel, acc_t& max, index_t& arg) {
    const acc_t val = static_cast<acc_t>(x);
    const bool take = takes(val, max);
    max = take ? val : max;
    arg = take ? rel : arg;
  }
};

// 2x2 tiling windows: each output reads two pairs; the pairs' maxima, then the max of the two, select exactly what
// the scan in window order selects (the first of equal maxima; the last NaN, which is a NaN as ATen's).
template <typename scalar_t, typename index_t>
struct Pool2x2Nchw {
  using acc_t = at::opmath_type<scalar_t>;

  DLKERN_INLINE static void run(const scalar_t* in, scalar_t* out, int64_t* ind, const MaxPool2dShape* sp,
                                int64_t begin, int64_t end) {
    const MaxPool2dShape& s = *sp;
    const int64_t W = s.W, OW = s.OW;
    int64_t oh = begin % s.OH, plane = begin / s.OH;
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* __restrict__ top = in + (plane * s.H + 2 * oh) * W;
      const scalar_t* __restrict__ bottom = top + W;
      scalar_t* __restrict__ out_row = out + row * OW;
      int64_t* __restrict__ ind_row = ind + row * OW;
      const int64_t base = 2 * oh * W;
      for (int64_t ow = 0; ow < OW; ++ow) {
        const acc_t a = top[2 * ow], b = top[2 * ow + 1], c = bottom[2 * ow], d = bottom[2 * ow + 1];
        const bool tb = takes(b, a), td = takes(d, c);
        const acc_t m1 = select(tb, b, a), m2 = select(td, d, c);
        const index_t i1 = tb ? 1 : 0, i2 = td ? W + 1 : W;
        const bool t2 = takes(m2, m1);
        out_row[ow] = static_cast<scalar_t>(select(t2, m2, m1));
        ind_row[ow] = base + 2 * ow + (t2 ? i2 : i1);
      }
      if (++oh == s.OH) {
        oh = 0;
        ++plane;
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Forward, NHWC
// ---------------------------------------------------------------------------------------------------------------

// One output pixel at a time, its channels (contiguous) in blocks of one 512-bit register: a block's running max
// and argmax stay in registers across the taps, and each tap's index is one scalar for the whole block.
// kIndices false: values only (dlkern::max_pool2d_values), as ATen's forward when no gradient is needed.
template <typename scalar_t, typename index_t, bool kIndices = true>
struct PoolNhwc {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int64_t kBlock = 64 / sizeof(acc_t) > 0 ? 64 / sizeof(acc_t) : 1;

  DLKERN_INLINE static void run(const scalar_t* in, scalar_t* out, int64_t* ind, const MaxPool2dShape* sp,
                                int64_t begin, int64_t end) {
    const MaxPool2dShape& s = *sp;
    const int64_t C = s.C;
    int64_t ow = begin % s.OW, oh = (begin / s.OW) % s.OH, n = begin / (s.OW * s.OH);
    for (int64_t pixel = begin; pixel < end; ++pixel) {
      const scalar_t* in_image = in + n * s.H * s.W * C;
      const int64_t hstart = oh * s.sH - s.pH, wstart = ow * s.sW - s.pW;
      const index_t first = static_cast<index_t>(first_valid(hstart, s.dH) * s.W + first_valid(wstart, s.dW));
      for (int64_t c = 0; c < C; c += kBlock) {
        block(in_image + c, s, hstart, wstart, first, std::min(kBlock, C - c), out + pixel * C + c,
              kIndices ? ind + pixel * C + c : nullptr);
      }
      if (++ow == s.OW) {
        ow = 0;
        if (++oh == s.OH) {
          oh = 0;
          ++n;
        }
      }
    }
  }

  // Channels [0, count) of one pixel, count <= kBlock. (A constant count would be unrolled whole before the
  // vectorizer sees the loops, into branches.)
  DLKERN_INLINE static void block(const scalar_t* in_image, const MaxPool2dShape& s, int64_t hstart,
                                  int64_t wstart, index_t first, int64_t count, scalar_t* __restrict__ out,
                                  int64_t* __restrict__ ind) {
    acc_t mv[kBlock];
    index_t mi[kBlock];
    for (int64_t j = 0; j < count; ++j) {
      mv[j] = lower_bound<acc_t>();
      if constexpr (kIndices) mi[j] = first;
    }
    for (int64_t kh = 0; kh < s.kH; ++kh) {
      const int64_t ih = hstart + kh * s.dH;
      if (ih < 0 || ih >= s.H) continue;
      for (int64_t kw = 0; kw < s.kW; ++kw) {
        const int64_t iw = wstart + kw * s.dW;
        if (iw < 0 || iw >= s.W) continue;
        const index_t index = static_cast<index_t>(ih * s.W + iw);
        const scalar_t* __restrict__ src = in_image + (ih * s.W + iw) * s.C;
        for (int64_t j = 0; j < count; ++j) {
          const acc_t val = static_cast<acc_t>(src[j]);
          const bool take = takes(val, mv[j]);
          mv[j] = take ? val : mv[j];
          if constexpr (kIndices) mi[j] = take ? index : mi[j];
        }
      }
    }
    for (int64_t j = 0; j < count; ++j) {
      out[j] = static_cast<scalar_t>(mv[j]);
      if constexpr (kIndices) ind[j] = static_cast<int64_t>(mi[j]);
    }
  }
};

// 2x2 tiling windows, channels_last: the four taps of an output pixel are four contiguous runs of C channels,
// paired as in Pool2x2Nchw, so the loop over channels is one plain vector loop (no per-tap bounds, no blocks).
template <typename scalar_t, typename index_t, bool kIndices = true>
struct Pool2x2Nhwc {
  using acc_t = at::opmath_type<scalar_t>;

  DLKERN_INLINE static void run(const scalar_t* in, scalar_t* out, int64_t* ind, const MaxPool2dShape* sp,
                                int64_t begin, int64_t end) {
    const MaxPool2dShape& s = *sp;
    const int64_t C = s.C, W = s.W;
    int64_t ow = begin % s.OW, oh = (begin / s.OW) % s.OH, n = begin / (s.OW * s.OH);
    for (int64_t pixel = begin; pixel < end; ++pixel) {
      const scalar_t* __restrict__ a = in + ((n * s.H + 2 * oh) * W + 2 * ow) * C;
      const scalar_t* __restrict__ b = a + C;
      const scalar_t* __restrict__ c = a + W * C;
      const scalar_t* __restrict__ d = c + C;
      scalar_t* __restrict__ o = out + pixel * C;
      const index_t first = static_cast<index_t>(2 * oh * W + 2 * ow);
      for (int64_t j = 0; j < C; ++j) {
        const acc_t va = a[j], vb = b[j], vc = c[j], vd = d[j];
        const bool tb = takes(vb, va), td = takes(vd, vc);
        const acc_t m1 = select(tb, vb, va), m2 = select(td, vd, vc);
        const bool t2 = takes(m2, m1);
        o[j] = static_cast<scalar_t>(select(t2, m2, m1));
        if constexpr (kIndices) {
          const index_t i1 = tb ? first + 1 : first, i2 = td ? first + W + 1 : first + W;
          ind[pixel * C + j] = static_cast<int64_t>(t2 ? i2 : i1);
        }
      }
      if (++ow == s.OW) {
        ow = 0;
        if (++oh == s.OH) {
          oh = 0;
          ++n;
        }
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------------
//
// grad_output scattered into its argmax: each task owns whole planes (NCHW) or whole images (NHWC), so every
// grad_input element is summed by one thread in a fixed order (deterministic), in opmath precision: straight into
// grad_input for float and double, through a buffer of one plane or image for 16-bit types.
//
// An index outside [0, H*W) of its plane is skipped: it adds nothing anywhere. ATen's forward gives such indices for
// a window that lies wholly in the padding (dilation and padding together; its value is -inf whatever the input,
// so no input element has a gradient from it), and a caller of dlkern::max_pool2d_backward may pass any int64.
// ATen's own CPU backward writes them out of bounds; every path here (the scatters, and the 2x2 channels_last
// writer, which hands an image with such an index to the scatter) reads and writes only inside its plane.

// Sums the gradients of `count` outputs into `acc` (zeroed first), then stores it in grad_input when it is a buffer.
template <typename scalar_t>
DLKERN_INLINE void scatter_plane(const scalar_t* __restrict__ go, const int64_t* __restrict__ ind, int64_t count,
                                 int64_t plane_in, at::opmath_type<scalar_t>* __restrict__ acc,
                                 scalar_t* __restrict__ gi) {
  using acc_t = at::opmath_type<scalar_t>;
  std::fill(acc, acc + plane_in, acc_t(0));
  for (int64_t o = 0; o < count; ++o) {
    const int64_t index = ind[o];
    if (index >= 0 && index < plane_in) acc[index] += static_cast<acc_t>(go[o]);
  }
  if constexpr (!std::is_same_v<acc_t, scalar_t>) {
    for (int64_t i = 0; i < plane_in; ++i) gi[i] = static_cast<scalar_t>(acc[i]);
  }
}

// Sums into `acc` when opmath differs from scalar_t (a buffer of one plane), else straight into grad_input.
template <typename scalar_t>
struct Accumulator {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> buffer;
  explicit Accumulator(int64_t size) : buffer(std::is_same_v<acc_t, scalar_t> ? 0 : size) {}
  acc_t* for_plane(scalar_t* gi) {
    if constexpr (std::is_same_v<acc_t, scalar_t>) {
      return gi;
    } else {
      return buffer.data();
    }
  }
};

template <typename scalar_t>
struct UnpoolNchw {
  DLKERN_INLINE static void run(const scalar_t* go, const int64_t* ind, scalar_t* gi, const MaxPool2dShape* sp,
                                int64_t begin, int64_t end) {
    const int64_t plane_in = sp->H * sp->W, plane_out = sp->OH * sp->OW;
    Accumulator<scalar_t> acc(plane_in);
    for (int64_t plane = begin; plane < end; ++plane) {
      scalar_t* gi_plane = gi + plane * plane_in;
      scatter_plane(go + plane * plane_out, ind + plane * plane_out, plane_out, plane_in, acc.for_plane(gi_plane),
                    gi_plane);
    }
  }
};

template <typename scalar_t>
struct UnpoolNhwc {
  using acc_t = at::opmath_type<scalar_t>;

  DLKERN_INLINE static void run(const scalar_t* go, const int64_t* ind, scalar_t* gi, const MaxPool2dShape* sp,
                                int64_t begin, int64_t end) {
    const int64_t C = sp->C, plane_in = sp->H * sp->W, plane_out = sp->OH * sp->OW;
    Accumulator<scalar_t> acc(plane_in * C);
    for (int64_t n = begin; n < end; ++n) {
      scatter_image(go + n * plane_out * C, ind + n * plane_out * C, C, plane_in, plane_out,
                    acc.for_plane(gi + n * plane_in * C), gi + n * plane_in * C);
    }
  }

  DLKERN_INLINE static void scatter_image(const scalar_t* __restrict__ go, const int64_t* __restrict__ ind,
                                          int64_t C, int64_t plane_in, int64_t plane_out, acc_t* __restrict__ acc,
                                          scalar_t* __restrict__ gi) {
    std::fill(acc, acc + plane_in * C, acc_t(0));
    for (int64_t o = 0; o < plane_out; ++o) {
      // the channels of one pixel land on distinct elements: no two lanes of a vector collide
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const int64_t index = ind[o * C + c];
        if (index >= 0 && index < plane_in) acc[index * C + c] += static_cast<acc_t>(go[o * C + c]);
      }
    }
    if constexpr (!std::is_same_v<acc_t, scalar_t>) {
      for (int64_t i = 0; i < plane_in * C; ++i) gi[i] = static_cast<scalar_t>(acc[i]);
    }
  }
};

// 2x2 tiling windows, channels_last: every input element lies in at most one window, so its gradient is written
// once -- the output gradient where the window's index names it, else zero -- with no fill and no scatter. That
// holds when each index names a tap of its own window, as the forward's do; an image with any other index is
// redone by the scatter, which sums into whatever in-plane index it is given, as ATen's, and skips the others.
template <typename scalar_t>
struct Unpool2x2Nhwc {
  using acc_t = at::opmath_type<scalar_t>;

  DLKERN_INLINE static void run(const scalar_t* go, const int64_t* ind, scalar_t* gi, const MaxPool2dShape* sp,
                                int64_t begin, int64_t end) {
    const MaxPool2dShape& s = *sp;
    const int64_t C = s.C, W = s.W, plane_in = s.H * W, plane_out = s.OH * s.OW;
    // A gradient larger than the caches keep between calls is not in them: a vector store would first read each
    // line from memory (a read for ownership), where memset claims it without reading. At 1024x32x12x12 (19 MB)
    // zeroing each image first makes the backward 1.5x faster; below, it costs more than it saves.
    const bool claim_lines = s.N * plane_in * C * int64_t(sizeof(scalar_t)) > (int64_t(4) << 20);
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* go_image = go + n * plane_out * C;
      const int64_t* ind_image = ind + n * plane_out * C;
      scalar_t* gi_image = gi + n * plane_in * C;
      if (!write_image(go_image, ind_image, gi_image, s, claim_lines)) {  // rare: the buffer only then
        Accumulator<scalar_t> acc(plane_in * C);
        UnpoolNhwc<scalar_t>::scatter_image(go_image, ind_image, C, plane_in, plane_out,
                                            acc.for_plane(gi_image), gi_image);
      }
    }
  }

  // Writes one image's gradient; false when some index is not a tap of its window (the image is then rewritten).
  DLKERN_INLINE static bool write_image(const scalar_t* go, const int64_t* ind, scalar_t* gi,
                                        const MaxPool2dShape& s, bool claim_lines) {
    const int64_t C = s.C, W = s.W;
    int64_t foreign = 0;
    if (claim_lines) std::memset(static_cast<void*>(gi), 0, sizeof(scalar_t) * s.H * W * C);
    for (int64_t oh = 0; oh < s.OH; ++oh) {
      for (int64_t ow = 0; ow < s.OW; ++ow) {
        const int64_t first = 2 * oh * W + 2 * ow;
        const scalar_t* __restrict__ g = go + (oh * s.OW + ow) * C;
        const int64_t* __restrict__ i = ind + (oh * s.OW + ow) * C;
        scalar_t* __restrict__ a = gi + first * C;
        scalar_t* __restrict__ b = a + C;
        scalar_t* __restrict__ c = a + W * C;
        scalar_t* __restrict__ d = c + C;
        for (int64_t j = 0; j < C; ++j) {
          // + 0 as the scatter's zero-filled sum: a -0 gradient lands as +0, bit for bit what ATen writes
          const scalar_t v = static_cast<scalar_t>(static_cast<acc_t>(g[j]) + acc_t(0)), zero = scalar_t(0);
          // unsigned: a caller's index far outside the plane wraps instead of overflowing, and is foreign
          const uint64_t tap = static_cast<uint64_t>(i[j]) - static_cast<uint64_t>(first);
          const uint64_t w = static_cast<uint64_t>(W);
          a[j] = tap == 0 ? v : zero;
          b[j] = tap == 1 ? v : zero;
          c[j] = tap == w ? v : zero;
          d[j] = tap == w + 1 ? v : zero;
          foreign |= (tap != 0) & (tap != 1) & (tap != w) & (tap != w + 1);
        }
      }
    }
    // the last row and column of an odd-sized image are in no window
    for (int64_t h = 2 * s.OH; h < s.H; ++h) std::fill(gi + h * W * C, gi + (h + 1) * W * C, scalar_t(0));
    if (2 * s.OW < W) {
      for (int64_t h = 0; h < 2 * s.OH; ++h) {
        std::fill(gi + (h * W + 2 * s.OW) * C, gi + (h + 1) * W * C, scalar_t(0));
      }
    }
    return foreign == 0;
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------------------------

template <typename scalar_t, typename index_t>
void max_pool2d_kernel(const scalar_t* in, scalar_t* out, int64_t* ind, const MaxPool2dShape& s) {
  const MaxPool2dShape* sp = &s;
  if (s.channels_last) {
    const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, s.C * s.kH * s.kW));
    at::parallel_for(0, s.N * s.OH * s.OW, grain, [&](int64_t begin, int64_t end) {
      if (is_2x2_tiling(s)) {
        run_for_cpu<Pool2x2Nhwc<scalar_t, index_t>>(in, out, ind, sp, begin, end);
      } else {
        run_for_cpu<PoolNhwc<scalar_t, index_t>>(in, out, ind, sp, begin, end);
      }
    });
    return;
  }
  const int64_t rows = s.N * s.C * s.OH;
  const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, s.OW * s.kH * s.kW));
  if (is_2x2_tiling(s)) {
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      run_for_cpu<Pool2x2Nchw<scalar_t, index_t>>(in, out, ind, sp, begin, end);
    });
    return;
  }
  // Per column: the outputs [ow_range[2kw], ow_range[2kw + 1]) whose tap kw is inside the row, and the index of
  // each output's first in-bounds column, minus ow * sW.
  std::vector<int64_t> ow_range(2 * s.kW);
  for (int64_t kw = 0; kw < s.kW; ++kw) {
    const int64_t offset = kw * s.dW - s.pW;
    ow_range[2 * kw] = offset >= 0 ? 0 : ceil_div(-offset, s.sW);
    ow_range[2 * kw + 1] = std::max(ow_range[2 * kw], std::min(s.OW, ceil_div(s.W - offset, s.sW)));
  }
  std::vector<index_t> first_w(s.OW);
  for (int64_t ow = 0; ow < s.OW; ++ow) first_w[ow] = static_cast<index_t>(first_valid(ow * s.sW - s.pW, s.dW) - ow * s.sW);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    run_for_cpu<PoolNchw<scalar_t, index_t>>(in, out, ind, sp, ow_range.data(), first_w.data(), begin, end);
  });
}

// Values only, for a forward that needs no gradient and no indices: channels_last skips the int64 index stores
// (a third of the bytes written); NCHW, where the index is a by-product of the pair compares, runs the full kernel.
std::tuple<at::Tensor, at::Tensor> max_pool2d_cpu(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                                  at::IntArrayRef dilation, bool ceil_mode);

at::Tensor max_pool2d_values_cpu(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  const MaxPool2dShape s = check_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode);
  if (!s.channels_last) return std::get<0>(max_pool2d_cpu(input, kernel_size, stride, padding, dilation, ceil_mode));
  at::Tensor out = empty_output(output_sizes(input, s), input.options().memory_format(memory_format_of(s)));
  if (out.numel() == 0) return out;
  const at::Tensor in = input.contiguous(memory_format_of(s));
  const MaxPool2dShape* sp = &s;
  const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, s.C * s.kH * s.kW));
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dlkern::max_pool2d_values", [&] {
    const scalar_t* in_ptr = in.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    int64_t* no_indices = nullptr;
    at::parallel_for(0, s.N * s.OH * s.OW, grain, [&](int64_t begin, int64_t end) {
      if (is_2x2_tiling(s)) {
        run_for_cpu<Pool2x2Nhwc<scalar_t, int32_t, false>>(in_ptr, out_ptr, no_indices, sp, begin, end);
      } else {
        run_for_cpu<PoolNhwc<scalar_t, int64_t, false>>(in_ptr, out_ptr, no_indices, sp, begin, end);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_cpu(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                                  at::IntArrayRef dilation, bool ceil_mode) {
  const MaxPool2dShape s = check_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode);
  const auto format = memory_format_of(s);
  const auto sizes = output_sizes(input, s);
  at::Tensor out = empty_output(sizes, input.options().memory_format(format));
  at::Tensor ind = empty_output(sizes, input.options().dtype(at::kLong).memory_format(format));
  if (out.numel() == 0) return {out, ind};
  const at::Tensor in = input.contiguous(format);
  const bool narrow_fits = s.H * s.W <= std::numeric_limits<int32_t>::max();
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dlkern::max_pool2d", [&] {
    using narrow_t = narrow_index_t<at::opmath_type<scalar_t>>;
    const scalar_t* in_ptr = in.const_data_ptr<scalar_t>();
    if (narrow_fits) {
      max_pool2d_kernel<scalar_t, narrow_t>(in_ptr, out.data_ptr<scalar_t>(), ind.data_ptr<int64_t>(), s);
    } else {
      max_pool2d_kernel<scalar_t, int64_t>(in_ptr, out.data_ptr<scalar_t>(), ind.data_ptr<int64_t>(), s);
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
  at::Tensor grad_input = empty_output(input.sizes(), input.options().memory_format(format));
  if (grad_input.numel() == 0) return grad_input;
  const at::Tensor go = grad_output.contiguous(format);
  const at::Tensor ind = indices.contiguous(format);
  const MaxPool2dShape* sp = &s;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dlkern::max_pool2d_backward",
                                  [&] {
    const scalar_t* go_ptr = go.const_data_ptr<scalar_t>();
    const int64_t* ind_ptr = ind.const_data_ptr<int64_t>();
    scalar_t* gi_ptr = grad_input.data_ptr<scalar_t>();
    if (s.channels_last) {
      at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) {
        if (is_2x2_tiling(s)) {
          run_for_cpu<Unpool2x2Nhwc<scalar_t>>(go_ptr, ind_ptr, gi_ptr, sp, begin, end);
        } else {
          run_for_cpu<UnpoolNhwc<scalar_t>>(go_ptr, ind_ptr, gi_ptr, sp, begin, end);
        }
      });
    } else {
      at::parallel_for(0, s.N * s.C, 1, [&](int64_t begin, int64_t end) {
        run_for_cpu<UnpoolNchw<scalar_t>>(go_ptr, ind_ptr, gi_ptr, sp, begin, end);
      });
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
  // The forward's values alone (CPU): what dlkern.functional.max_pool2d runs when no gradient or indices are needed.
  m.def(
      "max_pool2d_values(Tensor input, int[] kernel_size, int[] stride, int[] padding, int[] dilation,"
      " bool ceil_mode) -> Tensor");
}

TORCH_LIBRARY_IMPL(dlkern, CPU, m) {
  m.impl("max_pool2d", &max_pool2d_cpu);
  m.impl("max_pool2d_backward", &max_pool2d_backward_cpu);
  m.impl("max_pool2d_values", &max_pool2d_values_cpu);
}

}  // namespace dlkern
