// Flash backward kernels vs the float64 reference backward, and the exactness properties of the
// backward contract (kernel.h, "Backward") that a partition-invariant backward relies on.
//
// Every variant this CPU runs (flash_backward_kernels_supported) × {fp32, bf16} is checked case by
// case; a failure prints the variant, dtype and shape.
//
// Inputs of a case: q, k, v, dO (bf16-representable values for bf16), and the per-(row, head) lse and
// delta = rowsum(dO∘O) that a caller would hand over, taken from the float64 reference forward and
// rounded to fp32. The float64 reference backward runs on the same (rounded) inputs.
//
// Tolerance (the forward test's rule, kernels/flash_kernel_test.cpp): per output (dq, dk, dv; dk and
// dv summed over the q heads of a GQA group in float64), the kernel's max error against float64 may
// be at most twice the max error of a plain same-precision implementation of the same inputs —
// a naive fp32 loop per (head, row, key): fp32 dot products, P = exp(s − lse), dS = P(dP − delta)·scale,
// fp32 accumulation of dQ over keys and of dK, dV over rows, dQ rounded to bf16 for bf16 — plus a
// floor for cases where the plain loop happens to be (nearly) exact:
//   - two fp32 roundings of the largest magnitude a sum passes through (Σ over its terms of |term|,
//     with |dP − delta| bounded by |dP| + |delta|: dS cancels, and a rounding of dP alone moves it by
//     eps·|dP|); e.g. one key makes dS exactly 0 in float64 but rounding noise in fp32;
//   - bf16 dq: one bf16 ulp of the largest |dq| (the final rounding alone).
//
// bf16 products (flash_avx512bf16 with bf16 inputs): P and dS are rounded to bf16 (round to nearest
// even) before dV = Pᵀ·dO, dK = dSᵀ·Q and dQ = dS·K, as GPU flash attention does; the plain loop
// keeps them fp32, so the kernel may exceed it by that rounding. The yardstick stays the float64
// reference. Rounding to an 8-bit significand moves a value x by at most u·|x|, u = 2^-8 (the
// bf16 unit roundoff: half the spacing 2^-7 of [1, 2), attained just above 1; 2^-9 is the bound
// only just below 2), and the other factor of each term is an exact bf16 input, so each term
// P·dO, dS·Q, dS·K moves by at most u·|term|, and element e of dV, dK or dQ by at most u·mag[e],
// mag[e] = Σ over its terms of |term| as above (|dS| ≤ P·(|dP| + |delta|)·scale). So an element's
// error minus u·mag[e] must stay within the fp32 tolerance:
//   max over e of (|kernel[e] − ref[e]| − u·mag[e]) ≤ tol (the fp32 rule above).
// This is a worst-case bound per element (every rounding at its maximum, all of one sign), and it
// is reached: an element with a single term (one query row, Sq = 1) shows |error| ≈ 0.99·u·mag, so
// 2^-9 would not do. UAA_TEST_VERBOSE prints the largest |error| / (u·mag) over the elements as
// "of bound" (for dq it includes dq's own final rounding to bf16, so it may pass 1).
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
#include <utility>
#include <vector>

#include "common/test_data.h"
#include "common/test_rng.h"
#include "kernels/kernel.h"
#include "kernels/kernel_test_util.h"
#include "uaa/bf16.h"

namespace uaa::detail {
namespace {

using namespace kernel_test;

struct Shape {
  std::int64_t Sq, Skv, Hq, Hkv, D;
  bool causal;
  float sharpness = 2.0f;  // scale = sharpness / sqrt(D)
  std::int64_t wl = -1, wr = -1;  // sliding window (BackwardProblem::window_left / window_right)
  std::string str() const {
    return "Sq=" + std::to_string(Sq) + " Skv=" + std::to_string(Skv) + " Hq=" + std::to_string(Hq) +
           " Hkv=" + std::to_string(Hkv) + " D=" + std::to_string(D) + (causal ? " causal" : "") +
           window_str(wl, wr) + " sharp=" + std::to_string(sharpness);
  }
  float scale() const { return sharpness / std::sqrt(static_cast<float>(D)); }
  std::int64_t group() const { return Hq / Hkv; }
  std::int64_t first_key(std::int64_t i) const { return first_visible_key(i, Sq, Skv, wl); }
  std::int64_t last_key(std::int64_t i) const { return last_visible_key(i, Sq, Skv, causal, wr); }
  Shape with(const Mask& m) const {
    Shape t = *this;
    t.causal = m.causal;
    t.wl = m.window.left;
    t.wr = m.window.right;
    return t;
  }
};

std::size_t sz(std::int64_t n) { return static_cast<std::size_t>(std::max<std::int64_t>(1, n)); }

struct Case {
  Shape s;
  DType dt;
  Tensor3 q, k, v, dout;
  std::vector<float> lse, delta;  // [Sq][Hq]
};

Case make_case(const Shape& s, DType dt, std::uint64_t seed = 5) {
  Case c{s, dt, make(seed, 0, s.Sq, s.Hq, s.D, dt), make(seed, 1, s.Skv, s.Hkv, s.D, dt),
         make(seed, 2, s.Skv, s.Hkv, s.D, dt), make(seed, 3, s.Sq, s.Hq, s.D, dt), {}, {}};
  std::vector<double> out(sz(s.Sq * s.Hq * s.D)), lse(sz(s.Sq * s.Hq));
  reference_attention(c.q.f.data(), c.k.f.data(), c.v.f.data(), s.Sq, s.Skv, s.Hq, s.Hkv, s.D,
                      s.scale(), s.causal, out.data(), lse.data(), s.wl, s.wr);
  c.lse.resize(sz(s.Sq * s.Hq));
  c.delta.resize(sz(s.Sq * s.Hq));
  for (std::int64_t i = 0; i < s.Sq * s.Hq; ++i) {
    double d = 0;
    for (std::int64_t e = 0; e < s.D; ++e)
      d += static_cast<double>(c.dout.f[i * s.D + e]) * out[i * s.D + e];
    c.lse[i] = static_cast<float>(lse[i]);
    c.delta[i] = static_cast<float>(d);
  }
  return c;
}

// ---- running a kernel --------------------------------------------------------------------------

struct Options {
  std::vector<std::int64_t> q_cuts, kv_cuts;  // segment lengths (empty: one segment)
  int threads = 1;
  std::int64_t head_begin = 0, head_count = -1;  // q heads computed (-1: all)
  std::int64_t row_begin = 0, row_end = -1;      // query rows of the call (-1: all)
  bool head_major_padded = false;  // [H][S][D + 3] storage (and padded lse/delta/dq) instead of dense
  const std::vector<float>* dk_carry = nullptr;
  const std::vector<float>* dv_carry = nullptr;
  bool ordered_dq = true;
  // Write dk/dv partials into these caller buffers (heads partial_head_stride floats apart, 0:
  // dense) instead of fresh dense ones; Result.dk/dv then stay empty. A carry may point into them.
  std::vector<float>* dk_into = nullptr;
  std::vector<float>* dv_into = nullptr;
  std::int64_t partial_head_stride = 0;
};

struct Result {
  std::vector<std::byte> dq_raw;  // [Sq][Hq][D] in the dtype (rows/heads not computed: 0x5a)
  std::vector<float> dq;          // the same as float
  std::vector<float> dk, dv;      // [heads computed][Skv][D]
};

Result run(const BackwardKernel& kernel, const Case& c, const Options& o) {
  const Shape& s = c.s;
  const DType dt = c.dt;
  const std::size_t es = dt == DType::bf16 ? 2 : 4;
  const std::int64_t h0 = o.head_begin, nh = o.head_count < 0 ? s.Hq : o.head_count;
  const std::int64_t kv0 = h0 / s.group();
  const std::int64_t rb = o.row_begin, re = o.row_end < 0 ? s.Sq : o.row_end;
  const bool hm = o.head_major_padded;
  const Stored q = store(c.q, dt, hm), k = store(c.k, dt, hm), v = store(c.v, dt, hm),
               g = store(c.dout, dt, hm);
  // lse and delta: head stride 1; padded token stride (NaN padding) in the strided layout.
  const std::int64_t sts = hm ? s.Hq + 2 : s.Hq;
  std::vector<float> lse(sz(s.Sq * sts), std::nanf("")), delta(sz(s.Sq * sts), std::nanf(""));
  for (std::int64_t i = 0; i < s.Sq; ++i)
    for (std::int64_t h = 0; h < s.Hq; ++h) {
      lse[i * sts + h] = c.lse[i * s.Hq + h];
      delta[i * sts + h] = c.delta[i * s.Hq + h];
    }
  // dq: dense [Sq][Hq][D], or head-major [Hq][Sq][D + 3].
  const std::int64_t dq_ts = hm ? s.D + 3 : s.Hq * s.D, dq_hs = hm ? s.Sq * (s.D + 3) : s.D;
  std::vector<std::byte> dq(sz(s.Sq * s.Hq * (s.D + 3)) * es, std::byte{0x5a});
  std::vector<float> dk(sz(nh * s.Skv * s.D), std::nanf("")), dv(sz(nh * s.Skv * s.D), std::nanf(""));

  std::vector<TokenSegment> qs, gs, ks, vs;
  std::vector<StatSegment> ls, ds;
  std::vector<OutSegment> os;
  const auto* qb = static_cast<const std::byte*>(q.base(dt));
  const auto* gb = static_cast<const std::byte*>(g.base(dt));
  const auto* kb = static_cast<const std::byte*>(k.base(dt));
  const auto* vb = static_cast<const std::byte*>(v.base(dt));
  std::int64_t at = rb;
  for (std::int64_t n : cuts_or_whole(o.q_cuts, re - rb)) {
    qs.push_back({qb + (at * q.ts + h0 * q.hs) * es, n, q.ts, q.hs});
    gs.push_back({gb + (at * g.ts + h0 * g.hs) * es, n, g.ts, g.hs});
    ls.push_back({lse.data() + at * sts + h0, sts});
    ds.push_back({delta.data() + at * sts + h0, sts});
    os.push_back({dq.data() + (at * dq_ts + h0 * dq_hs) * es, dq_ts, dq_hs, nullptr, 0});
    at += n;
  }
  EXPECT_EQ(at, re) << "q cuts must cover the rows";
  at = 0;
  for (std::int64_t n : cuts_or_whole(o.kv_cuts, s.Skv)) {
    ks.push_back({kb + (at * k.ts + kv0 * k.hs) * es, n, k.ts, k.hs});
    vs.push_back({vb + (at * v.ts + kv0 * v.hs) * es, n, v.ts, v.hs});
    at += n;
  }
  BackwardProblem p;
  p.dtype = dt;
  p.head_dim = s.D;
  p.q_heads = nh;
  p.q_head_begin = h0;
  p.kv_head_begin = kv0;
  p.group = s.group();
  p.q = qs;
  p.dout = gs;
  p.lse = ls;
  p.delta = ds;
  p.dq = os;
  p.k = ks;
  p.v = vs;
  p.q_first = rb;
  p.q_total = s.Sq;
  p.kv_total = s.Skv;
  p.scale = s.scale();
  p.causal = s.causal;
  p.window_left = s.wl;
  p.window_right = s.wr;
  p.threads = o.threads;
  p.dk_partial = o.dk_into ? o.dk_into->data() : dk.data();
  p.dv_partial = o.dv_into ? o.dv_into->data() : dv.data();
  p.partial_head_stride = o.partial_head_stride;
  p.dk_carry = o.dk_carry ? o.dk_carry->data() : nullptr;
  p.dv_carry = o.dv_carry ? o.dv_carry->data() : nullptr;
  p.ordered_dq = o.ordered_dq;
  const std::size_t bytes = std::max<std::size_t>(64, (kernel.scratch_bytes(p) + 63) / 64 * 64);
  std::unique_ptr<void, decltype(&std::free)> scratch(std::aligned_alloc(64, bytes), &std::free);
  std::memset(scratch.get(), 0xcd, bytes);  // garbage, as a reused workspace would hold
  p.scratch = scratch.get();
  kernel.run(p);

  Result r;
  r.dq_raw.assign(sz(s.Sq * s.Hq * s.D) * es, std::byte{0x5a});
  r.dq.assign(sz(s.Sq * s.Hq * s.D), 0.0f);
  for (std::int64_t i = 0; i < s.Sq; ++i)
    for (std::int64_t h = 0; h < s.Hq; ++h) {
      const std::byte* src = dq.data() + (i * dq_ts + h * dq_hs) * es;
      std::byte* dst = r.dq_raw.data() + ((i * s.Hq + h) * s.D) * es;
      std::memcpy(dst, src, static_cast<std::size_t>(s.D) * es);
      for (std::int64_t d = 0; d < s.D; ++d) {
        float x;
        if (dt == DType::bf16) {
          std::uint16_t b;
          std::memcpy(&b, dst + 2 * d, 2);
          x = uaa::f32_from_bf16(b);
        } else {
          std::memcpy(&x, dst + 4 * d, 4);
        }
        r.dq[(i * s.Hq + h) * s.D + d] = x;
      }
    }
  if (!o.dk_into) r.dk = std::move(dk);
  if (!o.dv_into) r.dv = std::move(dv);
  return r;
}

// ---- the plain fp32 implementation and the reference -----------------------------------------

struct Plain {
  std::vector<float> dq;      // [Sq][Hq][D], bf16-rounded for bf16
  std::vector<float> dk, dv;  // [Hq][Skv][D] per q head
  // Per element: Σ over the terms of its sum of |term| (float64), see the file comment.
  std::vector<double> mag_dq, mag_dk, mag_dv;  // dq [Sq][Hq][D]; dk, dv [Skv][Hkv][D]
};

Plain plain(const Case& c) {
  const Shape& s = c.s;
  const std::int64_t D = s.D, G = s.group();
  const float scale = s.scale();
  Plain pl;
  pl.dq.assign(sz(s.Sq * s.Hq * D), 0.0f);
  pl.dk.assign(sz(s.Hq * s.Skv * D), 0.0f);
  pl.dv.assign(sz(s.Hq * s.Skv * D), 0.0f);
  pl.mag_dq.assign(sz(s.Sq * s.Hq * D), 0.0);
  pl.mag_dk.assign(sz(s.Skv * s.Hkv * D), 0.0);
  pl.mag_dv.assign(sz(s.Skv * s.Hkv * D), 0.0);
  std::vector<float> acc(static_cast<std::size_t>(D));
  for (std::int64_t h = 0; h < s.Hq; ++h)
    for (std::int64_t i = 0; i < s.Sq; ++i) {
      const std::int64_t first = s.first_key(i), last = s.last_key(i);
      const float* q = &c.q.f[(i * s.Hq + h) * D];
      const float* g = &c.dout.f[(i * s.Hq + h) * D];
      const float lse = c.lse[i * s.Hq + h], delta = c.delta[i * s.Hq + h];
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (std::int64_t j = first; j <= last; ++j) {
        const std::int64_t kv = j * s.Hkv + h / G;
        const float* k = &c.k.f[kv * D];
        const float* v = &c.v.f[kv * D];
        float sc = 0, dp = 0;
        for (std::int64_t e = 0; e < D; ++e) sc += q[e] * k[e];
        for (std::int64_t e = 0; e < D; ++e) dp += g[e] * v[e];
        const float p = std::exp(sc * scale - lse);
        const float ds = p * (dp - delta) * scale;
        const double m = std::abs(static_cast<double>(p)) * (std::abs(dp) + std::abs(delta)) * scale;
        float* dk = &pl.dk[(h * s.Skv + j) * D];
        float* dv = &pl.dv[(h * s.Skv + j) * D];
        for (std::int64_t e = 0; e < D; ++e) {
          acc[e] += ds * k[e];
          dk[e] += ds * q[e];
          dv[e] += p * g[e];
          pl.mag_dq[(i * s.Hq + h) * D + e] += m * std::abs(k[e]);
          pl.mag_dk[kv * D + e] += m * std::abs(q[e]);
          pl.mag_dv[kv * D + e] += std::abs(static_cast<double>(p) * g[e]);
        }
      }
      for (std::int64_t e = 0; e < D; ++e)
        pl.dq[(i * s.Hq + h) * D + e] = c.dt == DType::bf16 ? round_bf16(acc[e]) : acc[e];
    }
  return pl;
}

struct Reference {
  std::vector<double> dq, dk, dv;  // dq [Sq][Hq][D]; dk, dv [Skv][Hkv][D]
  Plain pl;
};

Reference reference(const Case& c) {
  const Shape& s = c.s;
  Reference r;
  r.dq.resize(sz(s.Sq * s.Hq * s.D));
  r.dk.resize(sz(s.Skv * s.Hkv * s.D));
  r.dv.resize(sz(s.Skv * s.Hkv * s.D));
  reference_attention_backward(c.q.f.data(), c.k.f.data(), c.v.f.data(), c.dout.f.data(), s.Sq, s.Skv,
                               s.Hq, s.Hkv, s.D, s.scale(), s.causal, r.dq.data(), r.dk.data(),
                               r.dv.data(), s.wl, s.wr);
  r.pl = plain(c);
  return r;
}

// Per-q-head partials [Hq][Skv][D] summed over each GQA group in float64: [Skv][Hkv][D].
std::vector<double> group_sum(const Shape& s, const std::vector<float>& partial) {
  std::vector<double> out(sz(s.Skv * s.Hkv * s.D), 0.0);
  for (std::int64_t h = 0; h < s.Hq; ++h)
    for (std::int64_t j = 0; j < s.Skv; ++j)
      for (std::int64_t d = 0; d < s.D; ++d)
        out[(j * s.Hkv + h / s.group()) * s.D + d] += partial[(h * s.Skv + j) * s.D + d];
  return out;
}

template <class T>
double max_err(const std::vector<T>& x, const std::vector<double>& ref, std::size_t n) {
  double e = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double d = std::abs(static_cast<double>(x[i]) - ref[i]);
    if (!(d <= e)) e = d;  // NaN propagates
  }
  return e;
}

// max over e of (|x[e] − ref[e]| − u·mag[e]) (u = 0: max_err), and max over e of |x − ref| / (u·mag).
template <class T>
std::pair<double, double> excess_over(const std::vector<T>& x, const std::vector<double>& ref,
                                      const std::vector<double>& mag, double u, std::size_t n) {
  double e = 0, of = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double d = std::abs(static_cast<double>(x[i]) - ref[i]);
    const double m = u * mag[i];
    if (!(d - m <= e)) e = d - m;  // NaN propagates
    if (m > 0) of = std::max(of, d / m);
  }
  return {e, of};
}

// Kernels that round P and dS to bf16 for dV, dK and dQ (the file comment, "bf16 products").
bool rounds_p_and_ds(const BackwardKernel& k, DType dt) {
  return dt == DType::bf16 && std::strcmp(k.name(), "flash_avx512bf16") == 0;
}

double max_abs(const std::vector<double>& v, std::size_t n) {
  double m = 0;
  for (std::size_t i = 0; i < n; ++i) m = std::max(m, std::abs(v[i]));
  return m;
}

void expect_close(const BackwardKernel& k, const Case& c, const Reference& ref, const Result& r) {
  const Shape& s = c.s;
  const std::size_t nq = static_cast<std::size_t>(s.Sq * s.Hq * s.D);
  const std::size_t nkv = static_cast<std::size_t>(s.Skv * s.Hkv * s.D);
  const double eps = std::ldexp(1.0, -24);
  const std::string what = std::string(k.name()) + " " + dtype_name(c.dt) + " " + s.str();
  struct Out {
    const char* name;
    double err, plain, tol, excess, of_bound, ref_max;
  };
  const double u = rounds_p_and_ds(k, c.dt) ? std::ldexp(1.0, -8) : 0.0;
  std::vector<Out> outs;
  {
    const double e = max_err(r.dq, ref.dq, nq), ep = max_err(ref.pl.dq, ref.dq, nq);
    double tol = 2 * ep + 2 * eps * max_abs(ref.pl.mag_dq, nq);
    if (c.dt == DType::bf16) tol += std::ldexp(1.0, -8) * max_abs(ref.dq, nq);
    const auto [x, of] = excess_over(r.dq, ref.dq, ref.pl.mag_dq, u, nq);
    outs.push_back({"dq", e, ep, tol, x, of, max_abs(ref.dq, nq)});
  }
  const std::vector<double> kdk = group_sum(s, r.dk), kdv = group_sum(s, r.dv);
  const std::vector<double> pdk = group_sum(s, ref.pl.dk), pdv = group_sum(s, ref.pl.dv);
  {
    const double e = max_err(kdk, ref.dk, nkv), ep = max_err(pdk, ref.dk, nkv);
    const auto [x, of] = excess_over(kdk, ref.dk, ref.pl.mag_dk, u, nkv);
    outs.push_back({"dk", e, ep, 2 * ep + 2 * eps * max_abs(ref.pl.mag_dk, nkv), x, of, max_abs(ref.dk, nkv)});
  }
  {
    const double e = max_err(kdv, ref.dv, nkv), ep = max_err(pdv, ref.dv, nkv);
    const auto [x, of] = excess_over(kdv, ref.dv, ref.pl.mag_dv, u, nkv);
    outs.push_back({"dv", e, ep, 2 * ep + 2 * eps * max_abs(ref.pl.mag_dv, nkv), x, of, max_abs(ref.dv, nkv)});
  }
  if (std::getenv("UAA_TEST_VERBOSE")) {
    std::printf("%s:", what.c_str());
    for (const Out& o : outs) {
      std::printf("  %s %.3g (max|ref| %.3g, plain %.3g, tol %.3g", o.name, o.err, o.ref_max, o.plain, o.tol);
      if (u > 0) std::printf(", excess %.3g, of bound %.3g", o.excess, o.of_bound);
      std::printf(")");
    }
    std::printf("\n");
  }
  for (const Out& o : outs)
    EXPECT_LE(o.excess, o.tol) << what << " " << o.name << " (error " << o.err << ", plain " << o.plain << ")";
  // Rows without a visible key have dq exactly zero.
  for (std::int64_t i = 0; i < s.Sq; ++i)
    if (s.first_key(i) > s.last_key(i))
      for (std::int64_t j = 0; j < s.Hq * s.D; ++j)
        if (r.dq[static_cast<std::size_t>(i * s.Hq * s.D + j)] != 0.0f) {
          ADD_FAILURE() << what << ": row " << i << " sees no key but has a nonzero dq";
          return;
        }
}

std::vector<const BackwardKernel*> variants() {
  auto s = flash_backward_kernels_supported();
  return {s.begin(), s.end()};
}

const DType kDtypes[] = {DType::f32, DType::bf16};

void check_against_reference(const std::vector<Shape>& shapes) {
  for (const Shape& s : shapes)
    for (DType dt : kDtypes) {
      const Case c = make_case(s, dt);
      const Reference ref = reference(c);
      for (const BackwardKernel* k : variants()) {
        const int threads = (s.Sq * s.Skv * s.Hq > 100000) ? 2 : 1;
        Options o;
        o.threads = threads;
        expect_close(*k, c, ref, run(*k, c, o));
      }
    }
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}
bool same_bits(const Result& a, const Result& b) {
  return a.dq_raw == b.dq_raw && same_bits(a.dk, b.dk) && same_bits(a.dv, b.dv);
}

// ---- the tests ---------------------------------------------------------------------------------

TEST(FlashBackward, VariantsPairWithTheForward) {
  const auto v = variants();
  ASSERT_FALSE(v.empty());
  ASSERT_EQ(v.size(), flash_kernels_supported().size());
  for (std::size_t i = 0; i < v.size(); ++i) {
    EXPECT_STREQ(v[i]->name(), flash_kernels_supported()[i]->name());
    EXPECT_EQ(v[i], &backward_kernel_for(*flash_kernels_supported()[i]));
    EXPECT_TRUE(v[i]->supports(DType::f32));
    EXPECT_TRUE(v[i]->supports(DType::bf16));
  }
  EXPECT_STREQ(v.back()->name(), "flash_portable");
  EXPECT_STREQ(backward_kernel_for(reference_kernel()).name(), "flash_portable");
  EXPECT_STREQ(backward_kernel_for(tiled_f32_kernel()).name(), "flash_portable");
}

// Self attention at the tile edges (47, 48, 49 rows; 63, 65 keys), GQA group 2.
TEST(FlashBackward, SelfAttentionLengths) {
  std::vector<Shape> shapes;
  for (std::int64_t S : {1, 47, 48, 49, 63, 65, 130, 200})
    for (bool causal : {false, true}) shapes.push_back({S, S, 2, 1, 64, causal, 2.0f});
  check_against_reference(shapes);
}

// Sq != Skv; causal with Sq > Skv leaves rows that see no key (dq 0, no contribution).
TEST(FlashBackward, CrossLengths) {
  std::vector<Shape> shapes;
  for (auto [sq, skv] : {std::pair<std::int64_t, std::int64_t>{47, 130}, {130, 47}, {200, 63},
                         {1, 200}, {200, 1}, {49, 65}, {65, 49}})
    for (bool causal : {false, true}) shapes.push_back({sq, skv, 2, 2, 80, causal, 2.0f});
  check_against_reference(shapes);
}

// Head dims 64, 128 and 80 (not a multiple of 16) × GQA groups 1, 2, 4 and MQA.
TEST(FlashBackward, HeadDimsAndGroups) {
  std::vector<Shape> shapes;
  for (std::int64_t D : {64, 128, 80})
    for (auto [hq, hkv] : {std::pair<std::int64_t, std::int64_t>{2, 2}, {4, 2}, {8, 2}, {3, 1}})
      shapes.push_back({97, 130, hq, hkv, D, (hq + D / 16) % 2 == 0, 2.0f});
  shapes.push_back({61, 70, 2, 1, 17, true, 2.0f});  // odd: the bf16 pairs are padded
  check_against_reference(shapes);
}

// A gentle and a peaky softmax (large dS cancellation and P near 0/1).
TEST(FlashBackward, GentleAndSharpSoftmax) {
  check_against_reference({{130, 130, 1, 1, 64, false, 0.25f}, {130, 130, 1, 1, 64, true, 12.0f}});
}

// Enough key tiles that the dQ tickets order several threads.
TEST(FlashBackward, LongerSequence) {
  check_against_reference({{700, 700, 1, 1, 32, true, 2.0f}, {500, 600, 2, 1, 32, false, 2.0f}});
}

// Sliding windows (kWindows, with and without causal), Sq = Skv, Sq < Skv and Sq > Skv (leading
// rows that see no key: dq 0, no contribution); GQA group 2.
TEST(FlashBackward, SlidingWindow) {
  std::vector<Shape> shapes;
  for (auto [sq, skv] : {std::pair<std::int64_t, std::int64_t>{130, 130}, {97, 260}, {260, 97}})
    for (const Mask& m : masks_with_windows())
      if (m.window.left >= 0 || m.window.right >= 0)
        shapes.push_back(Shape{sq, skv, 2, 1, 48, false, 2.0f}.with(m));
  check_against_reference(shapes);
}

// (a) threads 1, 2, 3 give the same bits (dq's key order is kept across threads; with a window the
// dQ tickets start at each query tile's first key tile).
TEST(FlashBackward, ThreadCountsBitwiseEqual) {
  for (const BackwardKernel* k : variants())
    for (DType dt : kDtypes)
      for (const Mask& m : masks_with_windows()) {
        const Shape s = Shape{400, 450, 3, 3, 64, false, 2.0f}.with(m);
        const Case c = make_case(s, dt);
        Options o;
        const Result one = run(*k, c, o);
        for (int t : {2, 3}) {
          o.threads = t;
          EXPECT_TRUE(same_bits(one, run(*k, c, o)))
              << k->name() << " " << dtype_name(dt) << " threads " << t << " " << s.str();
        }
      }
}

// (b) random segmentations of the query rows (and of the keys), empty segments included.
TEST(FlashBackward, SegmentsBitwiseEqualToOneSegment) {
  test::Rng rng(17);
  for (const BackwardKernel* k : variants())
    for (DType dt : kDtypes)
      for (const Mask& m : masks_with_windows()) {
        const Shape s = Shape{233, 201, 2, 1, 64, false, 2.0f}.with(m);
        const Case c = make_case(s, dt);
        const Result whole = run(*k, c, {});
        for (int trial = 0; trial < 3; ++trial) {
          Options o;
          o.threads = 1 + trial % 2;
          for (std::int64_t left = s.Sq; left > 0;) {
            const std::int64_t n = std::min(left, rng.uniform(0, 100));
            o.q_cuts.push_back(n);
            left -= n;
          }
          o.q_cuts.push_back(0);
          for (std::int64_t left = s.Skv; left > 0;) {
            const std::int64_t n = std::min(left, rng.uniform(0, 90));
            o.kv_cuts.push_back(n);
            left -= n;
          }
          EXPECT_TRUE(same_bits(whole, run(*k, c, o)))
              << k->name() << " " << dtype_name(dt) << " " << s.str() << " trial " << trial;
        }
      }
}

// (c) heads [0, H) in one call equal one call per head (and a range of heads inside a group).
TEST(FlashBackward, HeadSplitBitwiseEqual) {
  for (const BackwardKernel* k : variants())
    for (DType dt : kDtypes)
      for (const Mask& m : masks_with_windows()) {
        if (!m.causal && m.window.left < 0 && m.window.right < 0) continue;
        const Shape s = Shape{150, 140, 6, 2, 64, true, 2.0f}.with(m);
        const Case c = make_case(s, dt);
        const Result all = run(*k, c, {});
        const std::size_t es = dt == DType::bf16 ? 2 : 4;
        const std::size_t part = static_cast<std::size_t>(s.Skv * s.D);
        std::vector<std::pair<std::int64_t, std::int64_t>> splits;
        for (std::int64_t h = 0; h < s.Hq; ++h) splits.push_back({h, 1});
        splits.push_back({1, 3});
        splits.push_back({4, 2});
        for (auto [h0, nh] : splits) {
          Options o;
          o.head_begin = h0;
          o.head_count = nh;
          const Result r = run(*k, c, o);
          const std::string what = std::string(k->name()) + " " + dtype_name(dt) + " " + s.str() +
                                   " heads [" + std::to_string(h0) + ", " + std::to_string(h0 + nh) + ")";
          for (std::int64_t i = 0; i < s.Sq; ++i) {
            const std::size_t off = static_cast<std::size_t>((i * s.Hq + h0) * s.D) * es;
            ASSERT_EQ(0, std::memcmp(all.dq_raw.data() + off, r.dq_raw.data() + off, nh * s.D * es))
                << what << " dq row " << i;
          }
          EXPECT_EQ(0, std::memcmp(all.dk.data() + h0 * part, r.dk.data(), nh * part * 4)) << what << " dk";
          EXPECT_EQ(0, std::memcmp(all.dv.data() + h0 * part, r.dv.data(), nh * part * 4)) << what << " dv";
        }
      }
}

// (d) rows [0, m) then [m, n) with the first call's partials as carry give the one-call partials
// bitwise (m a multiple of kQueryRowGranule), and the same dq rows; also a three-way chain. Causal
// with Sq > Skv: the first rows see no key; keys no row of a call sees keep the carry (or 0). With
// a window a row may reach its first key tile after tiles it sees nothing of, and a key tile may be
// seen by the first rows of a query tile only.
void check_row_split_with_carry(const BackwardKernel& k, DType dt, const Shape& s) {
  const Case c = make_case(s, dt);
  const Result whole = run(k, c, {});
  const std::size_t part = static_cast<std::size_t>(s.Skv * s.D);
  for (std::vector<std::int64_t> cuts : {std::vector<std::int64_t>{0, 48, s.Sq},
                                         std::vector<std::int64_t>{0, 96, s.Sq},
                                         std::vector<std::int64_t>{0, 48, 144, s.Sq}})
    for (std::int64_t h = 0; h < s.Hq; ++h) {  // carry is local head 0's: one head per call
      const std::string what = std::string(k.name()) + " " + dtype_name(dt) + " " + s.str() + " head " +
                               std::to_string(h) + " cuts at " + std::to_string(cuts[1]);
      std::vector<float> dk_carry, dv_carry;
      for (std::size_t piece = 0; piece + 1 < cuts.size(); ++piece) {
        Options o;
        o.head_begin = h;
        o.head_count = 1;
        o.row_begin = cuts[piece];
        o.row_end = cuts[piece + 1];
        o.threads = 1 + static_cast<int>(piece % 2);
        if (piece > 0) {
          o.dk_carry = &dk_carry;
          o.dv_carry = &dv_carry;
        }
        const Result r = run(k, c, o);
        // dq rows of this piece, head h.
        const std::size_t es = dt == DType::bf16 ? 2 : 4;
        for (std::int64_t i = o.row_begin; i < o.row_end; ++i) {
          const std::size_t off = static_cast<std::size_t>((i * s.Hq + h) * s.D) * es;
          ASSERT_EQ(0, std::memcmp(whole.dq_raw.data() + off, r.dq_raw.data() + off, s.D * es))
              << what << " dq row " << i;
        }
        // Keys no row of the first piece sees: partial exactly +0.
        if (piece == 0)
          for (std::int64_t j = 0; j < s.Skv; ++j) {
            bool seen = false;
            for (std::int64_t i = o.row_begin; i < o.row_end; ++i)
              seen |= s.first_key(i) <= j && j <= s.last_key(i);
            if (seen) continue;
            for (std::int64_t e = j * s.D; e < (j + 1) * s.D; ++e)
              ASSERT_TRUE(r.dk[e] == 0.0f && !std::signbit(r.dk[e]) && r.dv[e] == 0.0f &&
                          !std::signbit(r.dv[e]))
                  << what << " unseen key " << j;
          }
        dk_carry = r.dk;
        dv_carry = r.dv;
      }
      EXPECT_EQ(0, std::memcmp(whole.dk.data() + h * part, dk_carry.data(), part * 4)) << what << " dk";
      EXPECT_EQ(0, std::memcmp(whole.dv.data() + h * part, dv_carry.data(), part * 4)) << what << " dv";
    }
}

TEST(FlashBackward, RowSplitWithCarryBitwiseEqual) {
  for (const BackwardKernel* k : variants())
    for (DType dt : kDtypes)
      for (const Shape& s : {Shape{200, 130, 2, 1, 80, true, 2.0f}, Shape{200, 230, 2, 2, 64, false, 2.0f},
                             Shape{250, 250, 1, 1, 64, true, 2.0f}})
        for (const Mask& m : masks_with_windows()) check_row_split_with_carry(*k, dt, s.with(m));
}

// The same where the bf16 products' pairs meet odd counts: an odd last query tile (199 rows: its
// last row pairs with a zero row), causal offsets that make the first row seeing a key tile sit at
// an odd offset in its query tile (Skv = 130: rows 69 and 133; it pairs with a row that sees none),
// odd visible key counts (key pairs ending in a zero dS), and head dims 48 and 17 (3 zmm of Dp; an
// odd head dim).
TEST(FlashBackward, RowSplitWithCarryOddPairsBitwiseEqual) {
  for (const BackwardKernel* k : variants())
    for (DType dt : kDtypes)
      for (const Shape& s : {Shape{199, 130, 1, 1, 48, true, 2.0f}, Shape{199, 131, 2, 1, 17, true, 2.0f},
                             Shape{151, 97, 1, 1, 17, false, 2.0f}}) {
        check_row_split_with_carry(*k, dt, s);
        // Windows with odd edges: rows whose first visible key is odd (a dQ key pair starting with
        // a masked key), rows seeing a key tile only through its first keys.
        for (Window w : {Window{1, 0}, Window{5, 3}, Window{63, 64}, Window{-1, 7}})
          check_row_split_with_carry(*k, dt, s.with({s.causal, w}));
      }
}

// A row range that starts inside a query tile (plans start at multiples of 48, but the kernel tiles
// from global row 0 whatever q_first is): dq rows are those of one call; the partials of the two
// calls add up to the one call's.
TEST(FlashBackward, UnalignedRowRange) {
  for (const BackwardKernel* k : variants())
    for (DType dt : kDtypes)
      for (Window w : {Window{-1, -1}, Window{5, 3}, Window{63, 64}}) {
        const Shape s = Shape{150, 140, 1, 1, 64, true, 2.0f}.with({true, w});
        const Case c = make_case(s, dt);
        const Result whole = run(*k, c, {});
        Options o1, o2;
        o1.row_end = o2.row_begin = 20;
        o2.q_cuts = {7, 0, 123};
        o2.threads = 2;
        const Result a = run(*k, c, o1), b = run(*k, c, o2);
        const std::size_t es = dt == DType::bf16 ? 2 : 4, row = static_cast<std::size_t>(s.Hq * s.D) * es;
        EXPECT_EQ(0, std::memcmp(whole.dq_raw.data(), a.dq_raw.data(), 20 * row)) << k->name();
        EXPECT_EQ(0, std::memcmp(whole.dq_raw.data() + 20 * row, b.dq_raw.data() + 20 * row, 130 * row))
            << k->name();
        double e = 0, m = 0;
        for (std::size_t i = 0; i < whole.dk.size(); ++i) {
          e = std::max(e, std::abs(static_cast<double>(a.dk[i]) + b.dk[i] - whole.dk[i]));
          e = std::max(e, std::abs(static_cast<double>(a.dv[i]) + b.dv[i] - whole.dv[i]));
          m = std::max(
              {m, std::abs(static_cast<double>(whole.dk[i])), std::abs(static_cast<double>(whole.dv[i]))});
        }
        EXPECT_LE(e, 1e-5 * m) << k->name() << " " << dtype_name(dt);
      }
}

// (e) head-major storage with padded rows (NaN padding), padded lse/delta and a strided dq.
TEST(FlashBackward, StridedLayoutsBitwiseEqual) {
  for (const BackwardKernel* k : variants())
    for (DType dt : kDtypes) {
      const Shape s{130, 140, 2, 2, 40, true, 2.0f};
      const Case c = make_case(s, dt);
      Options o;
      o.head_major_padded = true;
      o.q_cuts = {50, 0, 80};
      o.kv_cuts = {1, 139};
      EXPECT_TRUE(same_bits(run(*k, c, {}), run(*k, c, o))) << k->name() << " " << dtype_name(dt);
    }
}

// partial_head_stride: partials written into a larger per-head block (a document's keys inside a
// longer sequence's block) have the dense bits, the floats between heads stay untouched; a carry
// read in place from that block (local head 0) continues the chain as from a dense carry.
TEST(FlashBackward, PartialHeadStride) {
  for (const BackwardKernel* k : variants())
    for (DType dt : kDtypes)
      for (const Mask& m : {Mask{true}, Mask{false, {5, 3}}, Mask{true, {63, 64}}}) {
        const Shape s = Shape{150, 140, 4, 2, 40, false, 2.0f}.with(m);
        const Case c = make_case(s, dt);
        const std::int64_t part = s.Skv * s.D, stride = part + 77, nh = s.Hq;
        const std::string what = std::string(k->name()) + " " + dtype_name(dt) + " " + s.str();
        const float sentinel = -1234.5f;
        // All heads, all rows.
        const Result dense = run(*k, c, {});
        std::vector<float> dk(static_cast<std::size_t>(nh * stride), sentinel), dv = dk;
        Options o;
        o.dk_into = &dk;
        o.dv_into = &dv;
        o.partial_head_stride = stride;
        o.threads = 2;
        const Result r = run(*k, c, o);
        EXPECT_EQ(dense.dq_raw, r.dq_raw) << what << " dq";
        for (std::int64_t h = 0; h < nh; ++h) {
          EXPECT_EQ(0, std::memcmp(dense.dk.data() + h * part, dk.data() + h * stride, part * 4))
              << what << " dk head " << h;
          EXPECT_EQ(0, std::memcmp(dense.dv.data() + h * part, dv.data() + h * stride, part * 4))
              << what << " dv head " << h;
          for (std::int64_t e = part; e < stride; ++e)
            ASSERT_TRUE(dk[h * stride + e] == sentinel && dv[h * stride + e] == sentinel)
                << what << " gap, head " << h;
        }
        // Head 1 alone, rows [0, 96) then [96, Sq) continuing in place from the block.
        std::vector<float> dk1(static_cast<std::size_t>(stride + 5), sentinel), dv1 = dk1;
        for (auto [rb, re] : {std::pair<std::int64_t, std::int64_t>{0, 96}, {96, s.Sq}}) {
          Options p1 = o;
          p1.dk_into = &dk1;
          p1.dv_into = &dv1;
          p1.head_begin = 1;
          p1.head_count = 1;
          p1.row_begin = rb;
          p1.row_end = re;
          if (rb > 0) {
            p1.dk_carry = &dk1;
            p1.dv_carry = &dv1;
          }
          run(*k, c, p1);
        }
        EXPECT_EQ(0, std::memcmp(dense.dk.data() + part, dk1.data(), part * 4)) << what << " chained dk";
        EXPECT_EQ(0, std::memcmp(dense.dv.data() + part, dv1.data(), part * 4)) << what << " chained dv";
        for (std::int64_t e = part; e < stride + 5; ++e)
          ASSERT_TRUE(dk1[e] == sentinel && dv1[e] == sentinel) << what << " chained gap";
        // No rows: carry (head 0) or zero, at the stride.
        std::vector<float> dk0(static_cast<std::size_t>(2 * stride), sentinel), dv0 = dk0;
        Options p0 = o;
        p0.dk_into = &dk0;
        p0.dv_into = &dv0;
        p0.head_begin = 2;
        p0.head_count = 2;
        p0.row_begin = p0.row_end = 48;
        p0.dk_carry = &dense.dk;
        p0.dv_carry = &dense.dv;
        run(*k, c, p0);
        EXPECT_EQ(0, std::memcmp(dense.dk.data(), dk0.data(), part * 4)) << what << " no rows, carry";
        for (std::int64_t e = 0; e < stride; ++e) {
          ASSERT_TRUE(e < part || (dk0[e] == sentinel && dv0[e] == sentinel)) << what << " no rows, gap";
          ASSERT_TRUE(e >= part || dk0[stride + e] == 0.0f) << what << " no rows, head 1";
          ASSERT_TRUE(e < part || dk0[stride + e] == sentinel) << what << " no rows, tail";
        }
      }
}

// No keys: dq is zero. No rows: the partials are the carry (head 0) or zero.
TEST(FlashBackward, EmptyKeysAndEmptyRows) {
  for (const BackwardKernel* k : variants()) {
    {
      const Case c = make_case({5, 0, 2, 1, 8, false, 1.0f}, DType::f32);
      const Result r = run(*k, c, {});
      for (float x : r.dq) EXPECT_EQ(x, 0.0f) << k->name();
    }
    {
      const Case c = make_case({96, 70, 2, 1, 8, true, 1.0f}, DType::f32);
      std::vector<float> carry(70 * 8);
      for (std::size_t i = 0; i < carry.size(); ++i) carry[i] = 0.5f + static_cast<float>(i);
      Options o;
      o.row_begin = o.row_end = 48;
      o.dk_carry = o.dv_carry = &carry;
      const Result r = run(*k, c, o);
      for (std::size_t i = 0; i < carry.size(); ++i) {
        ASSERT_EQ(r.dk[i], carry[i]) << k->name();
        ASSERT_EQ(r.dv[i], carry[i]) << k->name();
        ASSERT_EQ(r.dk[carry.size() + i], 0.0f) << k->name();
        ASSERT_EQ(r.dv[carry.size() + i], 0.0f) << k->name();
      }
    }
  }
}

// ordered_dq = false (benchmarks): dk/dv are unchanged; dq is close, and bitwise with one thread.
TEST(FlashBackward, UnorderedDqIsClose) {
  for (const BackwardKernel* k : variants()) {
    const Shape s{300, 300, 2, 1, 64, false, 2.0f};
    const Case c = make_case(s, DType::f32);
    const Result ordered = run(*k, c, {});
    Options o;
    o.ordered_dq = false;
    EXPECT_TRUE(same_bits(ordered, run(*k, c, o))) << k->name();
    o.threads = 2;
    const Result r = run(*k, c, o);
    EXPECT_TRUE(same_bits(ordered.dk, r.dk) && same_bits(ordered.dv, r.dv)) << k->name();
    double e = 0, m = 0;
    for (std::size_t i = 0; i < r.dq.size(); ++i) {
      e = std::max(e, static_cast<double>(std::abs(r.dq[i] - ordered.dq[i])));
      m = std::max(m, static_cast<double>(std::abs(ordered.dq[i])));
    }
    EXPECT_LE(e, 1e-5 * m) << k->name();
  }
}

}  // namespace
}  // namespace uaa::detail
