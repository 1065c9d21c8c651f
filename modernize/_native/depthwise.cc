// Depthwise 2-D convolution (NHWC, float32) for XLA:CPU, exposed through the XLA FFI.
//
// Three handlers, each one custom call:
//   ModernizeDwFwd  y  = depthwise(x, w)            x (N,H,W,C), w (k,k,1,C) -> y (N,Ho,Wo,C)
//   ModernizeDwDx   dx = d depthwise / dx (dy, w)   dy (N,Ho,Wo,C), w -> dx (N,H,W,C)
//   ModernizeDwDw   dw = d depthwise / dw (x, dy)   x, dy -> dw (k,k,1,C)
// Padding is k/2 on every side (PyTorch `padding=k//2`), stride 1 or 2, k odd.
//
// Layout of the work: channels are innermost in memory, so every inner operation is on a
// vector of L consecutive channels (L = 16 floats = one AVX-512 register; a tail of C % 16
// channels goes through 8-, 4- and 1-wide versions of the same code).
//
// Forward and input gradient share one "gather" kernel:
//   out[o] = sum_t in_d[o * s - p + t] * w[t]   (separably in rows and columns)
// where in_d is the input dilated by d (d - 1 zeros between elements).  The forward pass is
// (s = stride, d = 1); the input gradient is (s = 1, d = stride) with the kernel flipped.
// Output pixels are computed in register tiles of T neighbours along the width: T
// accumulators stay in registers while the taps are walked, so each multiply-add costs one
// load of the input.  Border pixels (where some taps fall into the padding) use the same
// code with the shorter list of valid taps.
//
// The weight gradient keeps the k accumulators of one kernel row in registers while it walks
// along an output row.  Rows of the batch are split into a fixed number of parts whose
// partial sums are added in a fixed order, so the result does not depend on the thread count
// or on scheduling.
//
// Threads: the work is split over XLA's intra-op thread pool (ffi::ThreadPool).  The calling
// thread takes part in the work and only waits for chunks that other threads have already
// started, so it cannot deadlock when the pool is busy.  MODERNIZE_DEPTHWISE_THREADS=n caps
// the threads one call uses (e.g. 1 when many virtual CPU devices already run in parallel).
//
// SIMD uses GCC vector extensions, so the code builds for any target; -march=native picks
// the widest registers the machine has (AVX-512 here; AVX2 splits each vector in two).

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// Output pixels per register tile in the gather kernel (6..16 measured within noise here).
#ifndef MODERNIZE_DW_TILE
#define MODERNIZE_DW_TILE 8
#endif

namespace {

constexpr int kTile = MODERNIZE_DW_TILE;

template <int L>
struct VecOf {
  typedef float type __attribute__((vector_size(4 * L)));
};
template <>
struct VecOf<1> {
  typedef float type;
};

template <int L>
using Vec = typename VecOf<L>::type;

template <int L>
inline Vec<L> load(const float* p) {
  Vec<L> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int L>
inline void store(float* p, Vec<L> v) {
  std::memcpy(p, &v, sizeof(v));
}

template <int L>
inline Vec<L> zero() {
  return Vec<L>{};
}

// ---------------------------------------------------------------------------------------
// Parallel loop over [0, n) chunks on XLA's intra-op pool.
// ---------------------------------------------------------------------------------------

struct LoopState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;
};

// Optional cap on the threads one call uses: MODERNIZE_DEPTHWISE_THREADS (read once).
int64_t ThreadCap() {
  static const int64_t cap = [] {
    const char* v = std::getenv("MODERNIZE_DEPTHWISE_THREADS");
    const long n = v ? std::strtol(v, nullptr, 10) : 0;
    return n > 0 ? static_cast<int64_t>(n) : int64_t{1} << 30;
  }();
  return cap;
}

template <class F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t max_workers, const F& f) {
  max_workers = std::min(max_workers, ThreadCap());
  int64_t threads = pool.num_threads();
  int64_t workers = std::min<int64_t>({n, std::max<int64_t>(threads, 1), max_workers});
  if (workers <= 1) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  auto state = std::make_shared<LoopState>();
  const F* fp = &f;
  // A task that starts after all chunks are taken touches only `state` (kept alive by the
  // shared_ptr), never `f`, which may be gone by then.
  auto work = [state, fp, n]() {
    int64_t i;
    while ((i = state->next.fetch_add(1)) < n) {
      (*fp)(i);
      if (state->done.fetch_add(1) + 1 == n) {
        { std::lock_guard<std::mutex> lock(state->mu); }
        state->cv.notify_all();
      }
    }
  };
  for (int64_t i = 1; i < workers; ++i) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

// ---------------------------------------------------------------------------------------
// Tap plans along one spatial axis.
// out[o] = sum over taps t of in_d[o * s - p + t]; in_d[q] = in[q / d] if q % d == 0.
// A segment is a run of outputs o0, o0 + ostep, ... whose valid taps are the same kernel
// indices; the input index of tap i for output o0 + j * ostep is in_idx[i] + j * istep.
// ---------------------------------------------------------------------------------------

struct Segment {
  int64_t o0, ostep, count, istep;
  std::vector<int64_t> in_idx, kidx;
};

// Valid taps (input index, kernel index) of output o.
inline void TapsOf(int64_t o, int64_t n_in, int k, int s, int d,
                   std::vector<int64_t>& in_idx, std::vector<int64_t>& kidx) {
  in_idx.clear();
  kidx.clear();
  const int p = k / 2;
  for (int t = 0; t < k; ++t) {
    int64_t q = o * s - p + t;
    if (q < 0 || q % d != 0) continue;
    q /= d;
    if (q >= n_in) continue;
    in_idx.push_back(q);
    kidx.push_back(t);
  }
}

std::vector<Segment> MakeSegments(int64_t n_out, int64_t n_in, int k, int s, int d) {
  std::vector<Segment> segs;
  // With dilation d (then s == 1) outputs of one residue class mod d share tap patterns.
  const int64_t ostep = d;
  const int64_t istep = (d == 1) ? s : 1;
  std::vector<int64_t> in_idx, kidx;
  for (int64_t cls = 0; cls < ostep && cls < n_out; ++cls) {
    for (int64_t o = cls; o < n_out; o += ostep) {
      TapsOf(o, n_in, k, s, d, in_idx, kidx);
      if (!segs.empty()) {
        Segment& last = segs.back();
        if (last.o0 % ostep == cls && last.o0 + last.count * ostep == o &&
            last.kidx == kidx) {
          ++last.count;
          continue;
        }
      }
      segs.push_back(Segment{o, ostep, 1, istep, in_idx, kidx});
    }
  }
  return segs;
}

// ---------------------------------------------------------------------------------------
// Gather kernel (forward and input gradient).
// ---------------------------------------------------------------------------------------

// T outputs at out + j * ostride (j < T), each a vector of L channels.
// rows[r] / wrows[r]: input row and kernel row (already offset to the channel block);
// toff[i] / twoff[i]: element offsets of tap i in the input row / kernel row.
template <int T, int L>
inline void GatherTile(float* out, int64_t ostride, const float* const* rows,
                       const float* const* wrows, int nr, const int64_t* toff,
                       const int64_t* twoff, int nt, int64_t istride, int64_t ibase) {
  Vec<L> acc[T];
  for (int j = 0; j < T; ++j) acc[j] = zero<L>();
  for (int r = 0; r < nr; ++r) {
    const float* ip = rows[r];
    const float* wp = wrows[r];
    for (int t = 0; t < nt; ++t) {
      const Vec<L> wv = load<L>(wp + twoff[t]);
      const float* q = ip + ibase + toff[t];
      for (int j = 0; j < T; ++j) acc[j] += load<L>(q + j * istride) * wv;
    }
  }
  for (int j = 0; j < T; ++j) store<L>(out + j * ostride, acc[j]);
}

template <int L>
inline void GatherSegment(float* out, int64_t ostride, const float* const* rows,
                          const float* const* wrows, int nr, const int64_t* toff,
                          const int64_t* twoff, int nt, int64_t istride, int64_t count) {
  constexpr int T = (L >= 8) ? kTile : 8;
  int64_t j = 0;
  for (; j + T <= count; j += T)
    GatherTile<T, L>(out + j * ostride, ostride, rows, wrows, nr, toff, twoff, nt, istride,
                        j * istride);
  for (; j + 4 <= count; j += 4)
    GatherTile<4, L>(out + j * ostride, ostride, rows, wrows, nr, toff, twoff, nt, istride,
                        j * istride);
  for (; j < count; ++j)
    GatherTile<1, L>(out + j * ostride, ostride, rows, wrows, nr, toff, twoff, nt, istride,
                        j * istride);
}

struct GatherProblem {
  const float* in;   // (N, Hin, Win, C)
  const float* w;    // (k, k, C)
  float* out;        // (N, Hout, Wout, C)
  int64_t N, Hin, Win, Hout, Wout, C;
  int k, s, d;
};

template <int L>
void GatherChannelBlock(const GatherProblem& P, const std::vector<Segment>& segs,
                        const float* const* rows_in, const int64_t* kh, int nr,
                        float* out_row, int64_t c0) {
  const float* rows[64];
  const float* wrows[64];
  for (int r = 0; r < nr; ++r) {
    rows[r] = rows_in[r] + c0;
    wrows[r] = P.w + kh[r] * P.k * P.C + c0;
  }
  int64_t toff[64], twoff[64];
  for (const Segment& sg : segs) {
    const int nt = static_cast<int>(sg.kidx.size());
    float* o = out_row + sg.o0 * P.C + c0;
    if (nt == 0 || nr == 0) {
      for (int64_t j = 0; j < sg.count; ++j) store<L>(o + j * sg.ostep * P.C, zero<L>());
      continue;
    }
    for (int t = 0; t < nt; ++t) {
      toff[t] = sg.in_idx[t] * P.C;
      twoff[t] = sg.kidx[t] * P.C;
    }
    GatherSegment<L>(o, sg.ostep * P.C, rows, wrows, nr, toff, twoff, nt, sg.istep * P.C,
                     sg.count);
  }
}

void RunGather(ffi::ThreadPool& pool, const GatherProblem& P) {
  const std::vector<Segment> segs = MakeSegments(P.Wout, P.Win, P.k, P.s, P.d);
  const int64_t nrows = P.N * P.Hout;
  const int64_t chunk = std::max<int64_t>(1, nrows / 64);
  const int64_t nchunks = (nrows + chunk - 1) / chunk;
  auto body = [&](int64_t ci) {
    std::vector<int64_t> rin, rk;
    const float* rows[64];
    for (int64_t row = ci * chunk; row < std::min(nrows, (ci + 1) * chunk); ++row) {
      const int64_t n = row / P.Hout, oh = row % P.Hout;
      TapsOf(oh, P.Hin, P.k, P.s, P.d, rin, rk);
      const int nr = static_cast<int>(rin.size());
      for (int r = 0; r < nr; ++r) rows[r] = P.in + (n * P.Hin + rin[r]) * P.Win * P.C;
      float* out_row = P.out + (n * P.Hout + oh) * P.Wout * P.C;
      int64_t c0 = 0;
      for (; c0 + 16 <= P.C; c0 += 16)
        GatherChannelBlock<16>(P, segs, rows, rk.data(), nr, out_row, c0);
      for (; c0 + 8 <= P.C; c0 += 8)
        GatherChannelBlock<8>(P, segs, rows, rk.data(), nr, out_row, c0);
      for (; c0 + 4 <= P.C; c0 += 4)
        GatherChannelBlock<4>(P, segs, rows, rk.data(), nr, out_row, c0);
      for (; c0 < P.C; ++c0) GatherChannelBlock<1>(P, segs, rows, rk.data(), nr, out_row, c0);
    }
  };
  ParallelFor(pool, nchunks, 1 << 20, body);
}

// ---------------------------------------------------------------------------------------
// Weight gradient.
// dw[kh, kw, c] = sum_{n, oh, ow} dy[n, oh, ow, c] * x[n, oh*s - p + kh, ow*s - p + kw, c]
// ---------------------------------------------------------------------------------------

// Segment with all K taps valid: K accumulators in registers.
template <int L, int K>
inline void DwSegmentFixed(float* dwrow, const float* dyp, int64_t dystride, const float* xp,
                           const int64_t* toff, const int64_t* twoff, int64_t istride,
                           int64_t count) {
  Vec<L> acc[K];
  for (int t = 0; t < K; ++t) acc[t] = zero<L>();
  for (int64_t j = 0; j < count; ++j) {
    const Vec<L> g = load<L>(dyp + j * dystride);
    const float* q = xp + j * istride;
    for (int t = 0; t < K; ++t) acc[t] += g * load<L>(q + toff[t]);
  }
  for (int t = 0; t < K; ++t) store<L>(dwrow + twoff[t], load<L>(dwrow + twoff[t]) + acc[t]);
}

// Any number of taps: taps in blocks of up to 4 accumulators.
template <int L>
inline void DwSegmentAny(float* dwrow, const float* dyp, int64_t dystride, const float* xp,
                         const int64_t* toff, const int64_t* twoff, int nt, int64_t istride,
                         int64_t count) {
  int t = 0;
  for (; t + 4 <= nt; t += 4)
    DwSegmentFixed<L, 4>(dwrow, dyp, dystride, xp, toff + t, twoff + t, istride, count);
  for (; t < nt; ++t)
    DwSegmentFixed<L, 1>(dwrow, dyp, dystride, xp, toff + t, twoff + t, istride, count);
}

template <int L>
inline void DwSegment(float* dwrow, const float* dyp, int64_t dystride, const float* xp,
                      const int64_t* toff, const int64_t* twoff, int nt, int64_t istride,
                      int64_t count) {
  switch (nt) {
#define MODERNIZE_DW_CASE(K)                                                               \
  case K:                                                                                  \
    DwSegmentFixed<L, K>(dwrow, dyp, dystride, xp, toff, twoff, istride, count);          \
    return;
    MODERNIZE_DW_CASE(1)
    MODERNIZE_DW_CASE(2)
    MODERNIZE_DW_CASE(3)
    MODERNIZE_DW_CASE(4)
    MODERNIZE_DW_CASE(5)
    MODERNIZE_DW_CASE(6)
    MODERNIZE_DW_CASE(7)
    MODERNIZE_DW_CASE(8)
    MODERNIZE_DW_CASE(9)
    MODERNIZE_DW_CASE(10)
    MODERNIZE_DW_CASE(11)
#undef MODERNIZE_DW_CASE
    default:
      DwSegmentAny<L>(dwrow, dyp, dystride, xp, toff, twoff, nt, istride, count);
  }
}

struct DwProblem {
  const float* x;    // (N, H, W, C)
  const float* dy;   // (N, Ho, Wo, C)
  int64_t N, H, W, Ho, Wo, C;
  int k, s;
};

template <int L>
void DwChannelBlock(const DwProblem& P, const std::vector<Segment>& segs, const float* xrow,
                    const float* dyrow, float* dwrow, int64_t c0) {
  int64_t toff[64], twoff[64];
  for (const Segment& sg : segs) {
    const int nt = static_cast<int>(sg.kidx.size());
    if (nt == 0) continue;
    for (int t = 0; t < nt; ++t) {
      toff[t] = sg.in_idx[t] * P.C;
      twoff[t] = sg.kidx[t] * P.C;
    }
    DwSegment<L>(dwrow + c0, dyrow + sg.o0 * P.C + c0, sg.ostep * P.C, xrow + c0, toff, twoff,
                 nt, sg.istep * P.C, sg.count);
  }
}

void RunDw(ffi::ThreadPool& pool, const DwProblem& P, float* dw) {
  const std::vector<Segment> segs = MakeSegments(P.Wo, P.W, P.k, P.s, 1);
  const int64_t nrows = P.N * P.Ho;
  const int64_t kkc = static_cast<int64_t>(P.k) * P.k * P.C;
  // Fixed partition (independent of the thread count) for a deterministic sum.
  const int64_t nparts = std::max<int64_t>(1, std::min<int64_t>(nrows, 8));
  std::vector<float> partial(static_cast<size_t>(nparts) * kkc, 0.0f);
  auto body = [&](int64_t part) {
    float* acc = partial.data() + part * kkc;
    const int64_t r0 = nrows * part / nparts, r1 = nrows * (part + 1) / nparts;
    std::vector<int64_t> rin, rk;
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t n = row / P.Ho, oh = row % P.Ho;
      TapsOf(oh, P.H, P.k, P.s, 1, rin, rk);
      const float* dyrow = P.dy + (n * P.Ho + oh) * P.Wo * P.C;
      for (size_t r = 0; r < rin.size(); ++r) {
        const float* xrow = P.x + (n * P.H + rin[r]) * P.W * P.C;
        float* dwrow = acc + rk[r] * P.k * P.C;
        int64_t c0 = 0;
        for (; c0 + 16 <= P.C; c0 += 16) DwChannelBlock<16>(P, segs, xrow, dyrow, dwrow, c0);
        for (; c0 + 8 <= P.C; c0 += 8) DwChannelBlock<8>(P, segs, xrow, dyrow, dwrow, c0);
        for (; c0 + 4 <= P.C; c0 += 4) DwChannelBlock<4>(P, segs, xrow, dyrow, dwrow, c0);
        for (; c0 < P.C; ++c0) DwChannelBlock<1>(P, segs, xrow, dyrow, dwrow, c0);
      }
    }
  };
  ParallelFor(pool, nparts, 1 << 20, body);
  std::memcpy(dw, partial.data(), sizeof(float) * kkc);
  for (int64_t part = 1; part < nparts; ++part) {
    const float* src = partial.data() + part * kkc;
    for (int64_t i = 0; i < kkc; ++i) dw[i] += src[i];
  }
}

// ---------------------------------------------------------------------------------------
// Shape checks and FFI handlers.
// ---------------------------------------------------------------------------------------

inline int64_t OutSize(int64_t n, int k, int s) { return (n + 2 * (k / 2) - k) / s + 1; }

std::string Shape(const ffi::Buffer<ffi::F32>::Dimensions& d) {
  std::string s = "(";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? "," : "") + std::to_string(d[i]);
  return s + ")";
}

ffi::Error CheckCommon(const ffi::Buffer<ffi::F32>::Dimensions& big,
                       const ffi::Buffer<ffi::F32>::Dimensions& w, int64_t stride) {
  if (big.size() != 4) return ffi::Error::InvalidArgument("depthwise: activations must be 4-D NHWC, got " + Shape(big));
  if (w.size() != 4 || w[0] != w[1] || w[2] != 1 || w[3] != big[3] || w[0] % 2 != 1 || w[0] > 63)
    return ffi::Error::InvalidArgument("depthwise: kernel must be (k,k,1,C) with odd k <= 63, got " + Shape(w) + " for input " + Shape(big));
  if (stride != 1 && stride != 2) return ffi::Error::InvalidArgument("depthwise: stride must be 1 or 2");
  return ffi::Error::Success();
}

ffi::Error DwFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                     ffi::ResultBuffer<ffi::F32> y, int64_t stride) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (auto e = CheckCommon(xd, wd, stride); e.failure()) return e;
  const int k = static_cast<int>(wd[0]), s = static_cast<int>(stride);
  if (yd.size() != 4 || yd[0] != xd[0] || yd[1] != OutSize(xd[1], k, s) ||
      yd[2] != OutSize(xd[2], k, s) || yd[3] != xd[3])
    return ffi::Error::InvalidArgument("depthwise fwd: bad output shape " + Shape(yd));
  GatherProblem P{x.typed_data(), w.typed_data(), y->typed_data(), xd[0], xd[1], xd[2],
                  yd[1], yd[2], xd[3], k, s, 1};
  RunGather(pool, P);
  return ffi::Error::Success();
}

ffi::Error DwDxImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                    ffi::ResultBuffer<ffi::F32> dx, int64_t stride) {
  auto gd = dy.dimensions(), wd = w.dimensions(), xd = dx->dimensions();
  if (auto e = CheckCommon(xd, wd, stride); e.failure()) return e;
  const int k = static_cast<int>(wd[0]), s = static_cast<int>(stride);
  if (gd.size() != 4 || gd[0] != xd[0] || gd[1] != OutSize(xd[1], k, s) ||
      gd[2] != OutSize(xd[2], k, s) || gd[3] != xd[3])
    return ffi::Error::InvalidArgument("depthwise dx: bad cotangent shape " + Shape(gd));
  // dx = gather over dy dilated by the stride, with the kernel flipped in both axes.
  const int64_t C = xd[3];
  std::vector<float> wf(static_cast<size_t>(k) * k * C);
  const float* wp = w.typed_data();
  for (int a = 0; a < k; ++a)
    for (int b = 0; b < k; ++b)
      std::memcpy(&wf[(a * k + b) * C], wp + ((k - 1 - a) * k + (k - 1 - b)) * C,
                  sizeof(float) * C);
  GatherProblem P{dy.typed_data(), wf.data(), dx->typed_data(), xd[0], gd[1], gd[2],
                  xd[1], xd[2], C, k, 1, s};
  RunGather(pool, P);
  return ffi::Error::Success();
}

ffi::Error DwDwImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                    ffi::ResultBuffer<ffi::F32> dw, int64_t stride) {
  auto xd = x.dimensions(), gd = dy.dimensions(), wd = dw->dimensions();
  if (auto e = CheckCommon(xd, wd, stride); e.failure()) return e;
  const int k = static_cast<int>(wd[0]), s = static_cast<int>(stride);
  if (gd.size() != 4 || gd[0] != xd[0] || gd[1] != OutSize(xd[1], k, s) ||
      gd[2] != OutSize(xd[2], k, s) || gd[3] != xd[3])
    return ffi::Error::InvalidArgument("depthwise dw: bad cotangent shape " + Shape(gd));
  DwProblem P{x.typed_data(), dy.typed_data(), xd[0], xd[1], xd[2], gd[1], gd[2], xd[3], k, s};
  RunDw(pool, P, dw->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ModernizeDwFwd, DwFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ModernizeDwDx, DwDxImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ModernizeDwDw, DwDwImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride"));

// Version tag the Python loader can check.
extern "C" int ModernizeDwAbiVersion() { return 1; }
