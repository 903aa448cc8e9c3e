// Flash kernels vs the float64 reference, and the exactness properties forward() relies on.
//
// Every variant this CPU runs (flash_kernels_supported) × {fp32, bf16} is checked case by case; a
// failure prints the variant, dtype and shape.
//
// Tolerance (as flash-attention's tests do): the fast kernel's max error against float64 may be at
// most twice the max error of a plain same-precision implementation of the same inputs, plus one
// ulp of the output scale (the rounding of the final value alone, so that cases where the plain
// implementation happens to be exact, e.g. one key, do not demand exactness).
//  - plain fp32: fp32 dot products, fp32 softmax with the exact row max, fp32 P·V, one division;
//  - plain bf16: what an unfused bf16 framework path does: fp32-accumulated scores rounded to bf16,
//    fp32 softmax, P rounded to bf16, fp32-accumulated P·V, output rounded to bf16.
// UAA_TEST_VERBOSE=1 prints every case's errors and tolerances.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "common/test_data.h"
#include "common/test_rng.h"
#include "kernels/kernel.h"
#include "kernels/kernel_test_util.h"
#include "uaa/bf16.h"

namespace uaa::detail {
namespace {

using namespace kernel_test;

using test::element;

struct Shape {
  std::int64_t Sq, Skv, Hq, Hkv, D;
  bool causal;
  float sharpness = 1.0f;  // scale = sharpness / sqrt(D): > 1 makes the softmax peaky
  std::int64_t wl = -1, wr = -1;  // sliding window (KernelProblem::window_left / window_right)
  std::string str() const {
    return "Sq=" + std::to_string(Sq) + " Skv=" + std::to_string(Skv) + " Hq=" + std::to_string(Hq) +
           " Hkv=" + std::to_string(Hkv) + " D=" + std::to_string(D) + (causal ? " causal" : "") +
           window_str(wl, wr) + " sharp=" + std::to_string(sharpness);
  }
  float scale() const { return sharpness / std::sqrt(static_cast<float>(D)); }
  std::int64_t first_key(std::int64_t i) const { return first_visible_key(i, Sq, Skv, wl); }
  std::int64_t last_key(std::int64_t i) const { return last_visible_key(i, Sq, Skv, causal, wr); }
  bool sees_none(std::int64_t i) const { return first_key(i) > last_key(i); }
  Shape with(const Mask& m) const {
    Shape t = *this;
    t.causal = m.causal;
    t.wl = m.window.left;
    t.wr = m.window.right;
    return t;
  }
};

struct Inputs {
  Shape s;
  DType dt;
  Tensor3 q, k, v;
};

Inputs make_inputs(const Shape& s, DType dt, std::uint64_t seed = 7) {
  return {s, dt, make(seed, 0, s.Sq, s.Hq, s.D, dt), make(seed, 1, s.Skv, s.Hkv, s.D, dt),
          make(seed, 2, s.Skv, s.Hkv, s.D, dt)};
}

struct Result {
  std::vector<float> out;  // [Sq][Hq][D] as float
  std::vector<float> lse;  // [Sq][Hq]
  std::vector<std::byte> raw;  // out bytes, for bitwise comparison
};

// How a run presents the data to the kernel.
struct RunOptions {
  std::vector<std::int64_t> q_cuts, kv_cuts;  // segment lengths (empty: one segment)
  int threads = 1;
  std::int64_t head_begin = 0, head_count = -1;  // q heads computed (-1: all)
  bool head_major_padded = false;  // [H][S][D + 3] storage instead of [S][H][D]
  std::int64_t row_begin = 0, row_end = -1;  // query rows of the call (-1: all); others stay 0x5a
};

Result run(const AttentionKernel& kernel, const Inputs& in, const RunOptions& o) {
  const Shape& s = in.s;
  const DType dt = in.dt;
  const std::size_t es = dt == DType::bf16 ? 2 : 4;
  const std::int64_t group = s.Hq / s.Hkv;
  const std::int64_t h0 = o.head_begin, nh = o.head_count < 0 ? s.Hq : o.head_count;
  const std::int64_t kv0 = h0 / group;
  const Stored q = store(in.q, dt, o.head_major_padded), k = store(in.k, dt, o.head_major_padded),
               v = store(in.v, dt, o.head_major_padded);
  std::vector<std::byte> out(static_cast<std::size_t>(std::max<std::int64_t>(1, s.Sq * s.Hq * s.D)) * es,
                             std::byte{0x5a});
  std::vector<float> lse(static_cast<std::size_t>(std::max<std::int64_t>(1, s.Sq * s.Hq)), 12345.0f);
  std::vector<TokenSegment> qs, ks, vs;
  std::vector<OutSegment> os;
  const auto* qb = static_cast<const std::byte*>(q.base(dt));
  const auto* kb = static_cast<const std::byte*>(k.base(dt));
  const auto* vb = static_cast<const std::byte*>(v.base(dt));
  const std::int64_t rb = o.row_begin, re = o.row_end < 0 ? s.Sq : o.row_end;
  std::int64_t at = rb;
  for (std::int64_t n : cuts_or_whole(o.q_cuts, re - rb)) {
    qs.push_back({qb + (at * q.ts + h0 * q.hs) * es, n, q.ts, q.hs});
    os.push_back({out.data() + ((at * s.Hq + h0) * s.D) * es, s.Hq * s.D, s.D,
                  lse.data() + at * s.Hq + h0, s.Hq});
    at += n;
  }
  at = 0;
  for (std::int64_t n : cuts_or_whole(o.kv_cuts, s.Skv)) {
    ks.push_back({kb + (at * k.ts + kv0 * k.hs) * es, n, k.ts, k.hs});
    vs.push_back({vb + (at * v.ts + kv0 * v.hs) * es, n, v.ts, v.hs});
    at += n;
  }
  KernelProblem p;
  p.dtype = dt;
  p.head_dim = s.D;
  p.q_heads = nh;
  p.q_head_begin = h0;
  p.kv_head_begin = kv0;
  p.group = group;
  p.q = qs;
  p.k = ks;
  p.v = vs;
  p.out = os;
  p.q_first = rb;
  p.q_total = s.Sq;
  p.kv_total = s.Skv;
  p.scale = s.scale();
  p.causal = s.causal;
  p.window_left = s.wl;
  p.window_right = s.wr;
  p.threads = o.threads;
  const std::size_t bytes = (kernel.scratch_bytes(p) + 63) / 64 * 64 + 64;
  std::unique_ptr<void, decltype(&std::free)> scratch(std::aligned_alloc(64, bytes), &std::free);
  std::memset(scratch.get(), 0xcd, bytes);  // garbage, as a reused workspace would hold
  p.scratch = scratch.get();
  kernel.run(p);
  Result r;
  r.raw = out;
  r.lse = lse;
  r.out.resize(static_cast<std::size_t>(s.Sq * s.Hq * s.D));
  for (std::size_t i = 0; i < r.out.size(); ++i) {
    if (dt == DType::bf16) {
      std::uint16_t b;
      std::memcpy(&b, out.data() + 2 * i, 2);
      r.out[i] = uaa::f32_from_bf16(b);
    } else {
      std::memcpy(&r.out[i], out.data() + 4 * i, 4);
    }
  }
  return r;
}

// Plain same-precision attention (see the file comment), token-major, all heads.
void plain(const Inputs& in, std::vector<float>& out, std::vector<float>& lse) {
  const Shape& s = in.s;
  const bool bf = in.dt == DType::bf16;
  const std::int64_t D = s.D, group = s.Hq / s.Hkv;
  out.assign(static_cast<std::size_t>(s.Sq * s.Hq * D), 0.0f);
  lse.assign(static_cast<std::size_t>(s.Sq * s.Hq), 0.0f);
  std::vector<float> sc(static_cast<std::size_t>(s.Skv)), acc(static_cast<std::size_t>(D));
  for (std::int64_t h = 0; h < s.Hq; ++h)
    for (std::int64_t i = 0; i < s.Sq; ++i) {
      const std::int64_t first = s.first_key(i), last = s.last_key(i);
      float* o = &out[static_cast<std::size_t>((i * s.Hq + h) * D)];
      if (first > last) {
        lse[static_cast<std::size_t>(i * s.Hq + h)] = -std::numeric_limits<float>::infinity();
        continue;
      }
      const float* q = &in.q.f[static_cast<std::size_t>((i * s.Hq + h) * D)];
      float m = -std::numeric_limits<float>::infinity();
      for (std::int64_t j = first; j <= last; ++j) {
        const float* k = &in.k.f[static_cast<std::size_t>((j * s.Hkv + h / group) * D)];
        float d = 0;
        for (std::int64_t e = 0; e < D; ++e) d += q[e] * k[e];
        d *= s.scale();
        sc[j] = bf ? round_bf16(d) : d;
        m = std::max(m, sc[j]);
      }
      float l = 0;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (std::int64_t j = first; j <= last; ++j) {
        const float e = std::exp(sc[j] - m);
        l += e;
        const float p = bf ? round_bf16(e) : e;
        const float* v = &in.v.f[static_cast<std::size_t>((j * s.Hkv + h / group) * D)];
        for (std::int64_t e2 = 0; e2 < D; ++e2) acc[e2] += p * v[e2];
      }
      for (std::int64_t e = 0; e < D; ++e) o[e] = bf ? round_bf16(acc[e] / l) : acc[e] / l;
      lse[static_cast<std::size_t>(i * s.Hq + h)] = m + std::log(l);
    }
}

struct Reference {
  std::vector<double> out, lse;
  std::vector<float> plain_out, plain_lse;
};

Reference reference(const Inputs& in) {
  const Shape& s = in.s;
  Reference r;
  r.out.resize(static_cast<std::size_t>(std::max<std::int64_t>(1, s.Sq * s.Hq * s.D)));
  r.lse.resize(static_cast<std::size_t>(std::max<std::int64_t>(1, s.Sq * s.Hq)));
  reference_attention(in.q.f.data(), in.k.f.data(), in.v.f.data(), s.Sq, s.Skv, s.Hq, s.Hkv, s.D,
                      s.scale(), s.causal, r.out.data(), r.lse.data(), s.wl, s.wr);
  plain(in, r.plain_out, r.plain_lse);
  return r;
}

// Max |x - ref| over finite reference values; rows without keys must match exactly (0, -inf).
template <class T>
double max_err(const std::vector<T>& x, const std::vector<double>& ref, std::size_t n, bool* special_ok) {
  double e = 0;
  for (std::size_t i = 0; i < n; ++i) {
    if (std::isinf(ref[i])) {
      if (!(std::isinf(x[i]) && x[i] < 0)) *special_ok = false;
      continue;
    }
    e = std::max(e, std::abs(static_cast<double>(x[i]) - ref[i]));
  }
  return e;
}

double max_abs(const std::vector<double>& v, std::size_t n) {
  double m = 0;
  for (std::size_t i = 0; i < n; ++i)
    if (std::isfinite(v[i])) m = std::max(m, std::abs(v[i]));
  return m;
}

void expect_close(const AttentionKernel& k, const Inputs& in, const Reference& ref, const Result& r) {
  const Shape& s = in.s;
  const std::size_t n_out = static_cast<std::size_t>(s.Sq * s.Hq * s.D), n_lse = static_cast<std::size_t>(s.Sq * s.Hq);
  const double ulp = in.dt == DType::bf16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -23);
  bool ok = true;
  const double e_out = max_err(r.out, ref.out, n_out, &ok);
  const double e_plain = max_err(ref.plain_out, ref.out, n_out, &ok);
  const double tol_out = 2 * e_plain + ulp * max_abs(ref.out, n_out);
  const double e_lse = max_err(r.lse, ref.lse, n_lse, &ok);
  const double e_plain_lse = max_err(ref.plain_lse, ref.lse, n_lse, &ok);
  const double tol_lse = 2 * e_plain_lse + ulp * std::max(1.0, max_abs(ref.lse, n_lse));
  const std::string what = std::string(k.name()) + " " + dtype_name(in.dt) + " " + s.str();
  EXPECT_TRUE(ok) << what << ": rows without keys must give lse -inf";
  if (std::getenv("UAA_TEST_VERBOSE"))
    std::printf("%s out %.3g tol %.3g lse %.3g tol %.3g\n", what.c_str(), e_out, tol_out, e_lse,
                tol_lse);
  EXPECT_LE(e_out, tol_out) << what << " (plain " << e_plain << ")";
  EXPECT_LE(e_lse, tol_lse) << what << " (plain " << e_plain_lse << ")";
  // Rows without a visible key are exactly zero.
  for (std::int64_t i = 0; i < s.Sq; ++i)
    if (s.sees_none(i))
      for (std::int64_t j = 0; j < s.Hq * s.D; ++j)
        if (r.out[static_cast<std::size_t>(i * s.Hq * s.D + j)] != 0.0f) {
          ADD_FAILURE() << what << ": row " << i << " has no key but a nonzero output";
          return;
        }
}

std::vector<const AttentionKernel*> variants() {
  auto s = flash_kernels_supported();
  return {s.begin(), s.end()};
}

const DType kDtypes[] = {DType::f32, DType::bf16};

void check_against_reference(const std::vector<Shape>& shapes) {
  for (const Shape& s : shapes)
    for (DType dt : kDtypes) {
      const Inputs in = make_inputs(s, dt);
      const Reference ref = reference(in);
      for (const AttentionKernel* k : variants()) {
        const int threads = (s.Sq * s.Skv > 100000) ? 2 : 1;
        expect_close(*k, in, ref, run(*k, in, {{}, {}, threads, 0, -1, false}));
      }
    }
}

bool bitwise_equal(const Result& a, const Result& b) {
  return a.raw == b.raw && std::memcmp(a.lse.data(), b.lse.data(), a.lse.size() * 4) == 0;
}

TEST(FlashKernel, VariantsIncludePortable) {
  const auto v = variants();
  ASSERT_FALSE(v.empty());
  EXPECT_STREQ(v.back()->name(), "flash_portable");
  for (const AttentionKernel* k : v) {
    EXPECT_TRUE(k->supports(DType::f32));
    EXPECT_TRUE(k->supports(DType::bf16));
  }
}

// The process-wide choice follows UAA_ISA (CTest runs this once per ISA value, see CMakeLists.txt).
TEST(FlashKernel, SelectedKernelHonoursIsaCap) {
  const char* cap = std::getenv("UAA_ISA");
  if (!cap || !*cap || std::getenv("UAA_KERNEL")) GTEST_SKIP() << "UAA_ISA not set";
  const std::string want = std::string("flash_") + cap;
  bool cpu_has = false;
  for (const AttentionKernel* k : variants()) cpu_has |= want == k->name();
  if (cpu_has)
    EXPECT_EQ(want, select_kernel().name());
  else  // capped at an ISA this CPU lacks: the best one below the cap
    EXPECT_NE(std::string(select_kernel().name()).find("flash_"), std::string::npos);
}

// first_visible_key / last_visible_key against the definition in KernelProblem, key by key; huge
// windows do not overflow; the old 4-argument last_visible_key is the causal / full mask.
TEST(FlashKernel, VisibleKeysFollowTheDefinition) {
  const std::int64_t big = std::numeric_limits<std::int64_t>::max();
  for (auto [sq, skv] : {std::pair<std::int64_t, std::int64_t>{9, 9}, {4, 11}, {11, 4}, {5, 0}})
    for (bool causal : {false, true})
      for (std::int64_t wl : {std::int64_t{-1}, std::int64_t{0}, std::int64_t{2}, big})
        for (std::int64_t wr : {std::int64_t{-1}, std::int64_t{0}, std::int64_t{3}, big})
          for (std::int64_t i = 0; i < sq; ++i) {
            const std::int64_t a = i + skv - sq;  // i'
            std::int64_t first = skv, last = -1;
            for (std::int64_t j = 0; j < skv; ++j) {
              const bool visible = (wl < 0 || a - j <= wl) && (wr < 0 || j - a <= wr) && (!causal || j <= a);
              if (visible) {
                first = std::min(first, j);
                last = std::max(last, j);
              }
            }
            const std::int64_t f = first_visible_key(i, sq, skv, wl);
            const std::int64_t l = last_visible_key(i, sq, skv, causal, wr);
            const std::string what = "Sq=" + std::to_string(sq) + " Skv=" + std::to_string(skv) + " causal=" +
                                     std::to_string(causal) + " wl=" + std::to_string(wl) + " wr=" +
                                     std::to_string(wr) + " row " + std::to_string(i);
            if (last < 0) {
              EXPECT_GT(f, l) << what;
            } else {
              EXPECT_EQ(f, first) << what;
              EXPECT_EQ(l, last) << what;
            }
            if (wr < 0) {
              EXPECT_EQ(l, last_visible_key(i, sq, skv, causal)) << what;
            }
          }
}

TEST(FlashKernel, AwkwardLengthsSelfAttention) {
  std::vector<Shape> shapes;
  for (std::int64_t S : {1, 7, 63, 65, 127, 129, 1000})
    for (bool causal : {false, true}) shapes.push_back({S, S, 2, 2, 64, causal, 4.0f});
  check_against_reference(shapes);
}

TEST(FlashKernel, LongSequence4097) {
  check_against_reference({{4097, 4097, 1, 1, 16, false, 4.0f}, {4097, 4097, 1, 1, 16, true, 4.0f}});
}

TEST(FlashKernel, CrossLengths) {
  std::vector<Shape> shapes;
  for (auto [sq, skv] : {std::pair<std::int64_t, std::int64_t>{65, 1000}, {1000, 65}, {7, 129},
                         {129, 7}, {1, 4097}, {300, 1}})
    for (bool causal : {false, true}) shapes.push_back({sq, skv, 2, 1, 32, causal, 4.0f});
  check_against_reference(shapes);
}

TEST(FlashKernel, HeadDims) {
  std::vector<Shape> shapes;
  for (std::int64_t D : {1, 2, 3, 15, 17, 33, 64, 80, 96, 100, 127, 128, 160, 192, 255, 256})
    shapes.push_back({129, 97, 1, 1, D, (D % 2) == 1, 2.0f});
  check_against_reference(shapes);
}

TEST(FlashKernel, GqaAndMqa) {
  check_against_reference({{100, 130, 6, 2, 64, false, 1.0f},
                           {100, 130, 6, 2, 64, true, 1.0f},
                           {70, 70, 4, 1, 128, true, 8.0f}});
}

TEST(FlashKernel, GentleAndSharpSoftmax) {
  check_against_reference({{200, 200, 1, 1, 64, false, 0.25f}, {200, 200, 1, 1, 64, true, 30.0f}});
}

// Sliding windows (kWindows, with and without causal) on self and cross attention, Sq < Skv and
// Sq > Skv; the latter leaves leading rows that see no key (out 0, lse -inf).
TEST(FlashKernel, SlidingWindow) {
  std::vector<Shape> shapes;
  for (auto [sq, skv] : {std::pair<std::int64_t, std::int64_t>{300, 300}, {130, 400}, {400, 130}})
    for (const Mask& m : masks_with_windows())
      if (m.window.left >= 0 || m.window.right >= 0)
        shapes.push_back(Shape{sq, skv, 2, 1, 32, false, 4.0f}.with(m));
  check_against_reference(shapes);
}

// The readable kernels (reference_f64, tiled_f32_portable; fp32 only) take the same windows:
// against the float64 function, and a row range with segments gives the rows of the whole call.
TEST(FlashKernel, ReferenceAndTiledKernelsSlidingWindow) {
  for (const AttentionKernel* k : {&reference_kernel(), &tiled_f32_kernel()})
    for (auto [sq, skv] : {std::pair<std::int64_t, std::int64_t>{200, 200}, {130, 260}, {260, 130}})
      for (const Mask& m : masks_with_windows()) {
        const Shape s = Shape{sq, skv, 2, 1, 32, false, 4.0f}.with(m);
        const Inputs in = make_inputs(s, DType::f32);
        const Result whole = run(*k, in, {});
        expect_close(*k, in, reference(in), whole);
        RunOptions o;
        o.row_begin = 48;
        o.q_cuts = {30, 0, sq - 78};
        o.kv_cuts = {skv - 70, 70};
        const Result part = run(*k, in, o);
        const std::size_t row = static_cast<std::size_t>(s.Hq * s.D) * 4;
        EXPECT_EQ(0, std::memcmp(whole.raw.data() + 48 * row, part.raw.data() + 48 * row, (sq - 48) * row))
            << k->name() << " " << s.str();
      }
}

// Random segmentations (with empty segments) of q and kv give bitwise the unsegmented result.
TEST(FlashKernel, SegmentsBitwiseEqualToOneSegment) {
  test::Rng rng(11);
  for (const AttentionKernel* k : variants())
    for (DType dt : kDtypes)
      for (const Mask& m : masks_with_windows()) {
        const Shape s = Shape{333, 301, 2, 1, 64, false, 4.0f}.with(m);
        const Inputs in = make_inputs(s, dt);
        const Result whole = run(*k, in, {});
        for (int trial = 0; trial < 3; ++trial) {
          RunOptions o;
          for (std::int64_t left = s.Sq; left > 0;) {
            const std::int64_t n = std::min(left, rng.uniform(0, 150));
            o.q_cuts.push_back(n);
            left -= n;
          }
          for (std::int64_t left = s.Skv; left > 0;) {
            const std::int64_t n = std::min(left, rng.uniform(0, 120));
            o.kv_cuts.push_back(n);
            left -= n;
          }
          o.kv_cuts.push_back(0);
          EXPECT_TRUE(bitwise_equal(whole, run(*k, in, o)))
              << k->name() << " " << dtype_name(dt) << " " << s.str() << " trial " << trial;
        }
      }
}

TEST(FlashKernel, ThreadCountsBitwiseEqual) {
  for (const AttentionKernel* k : variants())
    for (DType dt : kDtypes)
      for (const Mask& m : masks_with_windows()) {
        const Shape s = Shape{400, 350, 3, 3, 64, false, 4.0f}.with(m);
        const Inputs in = make_inputs(s, dt);
        const Result one = run(*k, in, {{}, {}, 1, 0, -1, false});
        for (int t : {2, 3})
          EXPECT_TRUE(bitwise_equal(one, run(*k, in, {{}, {}, t, 0, -1, false})))
              << k->name() << " " << dtype_name(dt) << " threads " << t << " " << s.str();
      }
}

// Computing a subset of heads (a rank's share under Ulysses) gives the same bits for those heads.
TEST(FlashKernel, HeadSplitBitwiseEqual) {
  for (const AttentionKernel* k : variants())
    for (DType dt : kDtypes)
      for (const Mask& m : masks_with_windows()) {
        if (!m.causal && m.window.left < 0 && m.window.right < 0) continue;
        const Shape s = Shape{150, 150, 6, 2, 64, true, 4.0f}.with(m);
        const Inputs in = make_inputs(s, dt);
        const Result all = run(*k, in, {});
        const std::size_t es = dt == DType::bf16 ? 2 : 4;
        for (auto [h0, nh] : {std::pair<std::int64_t, std::int64_t>{0, 1}, {1, 3}, {4, 2}, {5, 1}}) {
          const Result part = run(*k, in, {{}, {}, 1, h0, nh, false});
          for (std::int64_t i = 0; i < s.Sq; ++i) {
            const std::size_t off = static_cast<std::size_t>((i * s.Hq + h0) * s.D) * es;
            ASSERT_EQ(0, std::memcmp(all.raw.data() + off, part.raw.data() + off, nh * s.D * es))
                << k->name() << " " << dtype_name(dt) << " " << s.str() << " heads [" << h0 << ", "
                << h0 + nh << ") row " << i;
            ASSERT_EQ(0, std::memcmp(&all.lse[i * s.Hq + h0], &part.lse[i * s.Hq + h0], nh * 4));
          }
        }
      }
}

// Rows split at multiples of kQueryRowGranule (a plan's head split): each range, computed alone
// (other threads, segments), gives the rows of the whole call bitwise. Self and cross lengths, every
// mask; with Sq > Skv leading rows see no key.
TEST(FlashKernel, RowSplitBitwiseEqual) {
  for (const AttentionKernel* k : variants())
    for (DType dt : kDtypes)
      for (auto [sq, skv] : {std::pair<std::int64_t, std::int64_t>{300, 300}, {250, 400}, {400, 250}})
        for (const Mask& m : masks_with_windows()) {
          const Shape s = Shape{sq, skv, 2, 1, 32, false, 4.0f}.with(m);
          const Inputs in = make_inputs(s, dt);
          const Result whole = run(*k, in, {});
          const std::size_t es = dt == DType::bf16 ? 2 : 4, row = static_cast<std::size_t>(s.Hq * s.D) * es;
          for (const std::vector<std::int64_t>& cuts : {std::vector<std::int64_t>{0, 48, sq},
                                                        std::vector<std::int64_t>{0, 144, 240, sq}})
            for (std::size_t piece = 0; piece + 1 < cuts.size(); ++piece) {
              RunOptions o;
              o.row_begin = cuts[piece];
              o.row_end = cuts[piece + 1];
              o.threads = 1 + static_cast<int>(piece % 2);
              o.q_cuts = {std::min<std::int64_t>(37, o.row_end - o.row_begin), 0};
              o.q_cuts.push_back(o.row_end - o.row_begin - o.q_cuts[0]);
              const Result r = run(*k, in, o);
              const std::size_t i0 = static_cast<std::size_t>(o.row_begin);
              const std::size_t n = static_cast<std::size_t>(o.row_end - o.row_begin);
              EXPECT_EQ(0, std::memcmp(whole.raw.data() + i0 * row, r.raw.data() + i0 * row, n * row))
                  << k->name() << " " << dtype_name(dt) << " " << s.str() << " rows [" << cuts[piece] << ", "
                  << cuts[piece + 1] << ")";
              EXPECT_EQ(0, std::memcmp(whole.lse.data() + i0 * s.Hq, r.lse.data() + i0 * s.Hq, n * s.Hq * 4))
                  << k->name() << " " << dtype_name(dt) << " " << s.str() << " lse";
            }
        }
}

// A NaN or Inf in K or V at a key a row cannot see (outside its window, or past its causal
// horizon) never reaches the row: such rows keep the bits of a run on clean data, whatever other
// rows of their query tile see; rows that see a poisoned key come out non-finite (as in the
// reference).
TEST(FlashKernel, WindowMasksNonFiniteKeys) {
  const std::int64_t bad_k = 100, bad_v = 140;  // in key tiles 1 and 2
  for (const AttentionKernel* k : variants())
    for (DType dt : kDtypes)
      for (const Mask& m : masks_with_windows()) {
        if (m.window.left < 0 && m.window.right < 0) continue;
        const Shape s = Shape{230, 200, 1, 1, 32, false, 4.0f}.with(m);
        const Inputs clean = make_inputs(s, dt);
        Inputs bad = clean;
        for (std::int64_t d = 0; d < s.D; ++d) {
          bad.k.f[bad_k * s.D + d] = std::nanf("");
          const float inf = std::numeric_limits<float>::infinity();
          bad.v.f[bad_v * s.D + d] = d % 2 ? inf : -inf;
          if (dt == DType::bf16) {
            bad.k.b[bad_k * s.D + d] = 0x7fc0;
            bad.v.b[bad_v * s.D + d] = d % 2 ? 0x7f80 : 0xff80;
          }
        }
        for (int threads : {1, 2}) {
          const Result a = run(*k, clean, {{}, {}, threads, 0, -1, false});
          const Result b = run(*k, bad, {{}, {}, threads, 0, -1, false});
          const std::size_t es = dt == DType::bf16 ? 2 : 4, row = static_cast<std::size_t>(s.D) * es;
          for (std::int64_t i = 0; i < s.Sq; ++i) {
            const bool sees = (s.first_key(i) <= bad_k && bad_k <= s.last_key(i)) ||
                              (s.first_key(i) <= bad_v && bad_v <= s.last_key(i));
            const std::string what = std::string(k->name()) + " " + dtype_name(dt) + " " + s.str() + " row " +
                                     std::to_string(i);
            if (sees) {
              bool finite = true;
              for (std::int64_t d = 0; d < s.D; ++d) finite &= std::isfinite(b.out[i * s.D + d]);
              EXPECT_FALSE(finite) << what << " sees a poisoned key";
            } else {
              ASSERT_EQ(0, std::memcmp(a.raw.data() + i * row, b.raw.data() + i * row, row)) << what;
              ASSERT_EQ(0, std::memcmp(&a.lse[i], &b.lse[i], 4)) << what;
            }
          }
        }
      }
}

// Head-major storage with padded rows (NaN padding) reads and writes the same values.
TEST(FlashKernel, StridedSegmentsBitwiseEqual) {
  for (const AttentionKernel* k : variants())
    for (DType dt : kDtypes) {
      const Shape s{130, 140, 2, 2, 40, true, 4.0f};
      const Inputs in = make_inputs(s, dt);
      RunOptions o;
      o.head_major_padded = true;
      o.q_cuts = {50, 0, 80};
      o.kv_cuts = {1, 139};
      EXPECT_TRUE(bitwise_equal(run(*k, in, {}), run(*k, in, o))) << k->name() << " " << dtype_name(dt);
    }
}

TEST(FlashKernel, EmptyKeys) {
  for (const AttentionKernel* k : variants()) {
    const Shape s{5, 0, 1, 1, 8, false, 1.0f};
    const Inputs in = make_inputs(s, DType::f32);
    const Result r = run(*k, in, {});
    for (float x : r.out) EXPECT_EQ(x, 0.0f);
    for (float x : r.lse) EXPECT_TRUE(std::isinf(x) && x < 0);
  }
}

}  // namespace
}  // namespace uaa::detail
