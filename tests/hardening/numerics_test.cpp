// Numerics at the edges (FAILURE_MODEL.md §4), on every kernel and every flash ISA variant this CPU
// runs, fp32 and bf16, and through forward() on 1..P ranks:
//   - NaN/Inf in K or V at keys a row cannot see (causal diagonal tiles, the zero-padded tail) leave
//     that row bitwise as with finite values there: no contamination of other rows or heads;
//   - a row that sees a NaN in V is NaN in that dim (a NaN score: the whole row, and its lse);
//     a row that sees an Inf in V is non-finite in that dim;
//   - rows with no visible key (causal with Skv < Sq, zero keys) are zeros with lse = -inf;
//   - a score that overflows fp32 (|q|,|k| ~ 1e30) makes that row NaN and no other;
//   - tiny magnitudes (1e-30) give finite, accurate results.
// Without the non-finite tile flags in flash_impl.h, the contamination cases fail on every flash
// variant (0 · Inf = NaN in the P·V of a diagonal tile).
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "hardening/hardening_util.h"
#include "kernels/kernel.h"
#include "uaa/bf16.h"
#include "uaa/error.h"
#include "uaa/mpi.h"
#include "uaa/threads.h"

namespace uaa::test {
namespace {

using detail::AttentionKernel;
using detail::KernelProblem;
using detail::OutSegment;
using detail::TokenSegment;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();


// One whole-sequence problem, contiguous [tokens][heads][D] fp32 data (converted for bf16 runs).
struct Case {
  std::int64_t Sq = 150, Skv = 150, Hq = 4, Hkv = 2, D = 40;
  bool causal = true;
  std::vector<float> q, k, v;
  void fill() {
    q.resize(Sq * Hq * D);
    k.resize(Skv * Hkv * D);
    v.resize(Skv * Hkv * D);
    for (std::int64_t t = 0; t < Sq; ++t)
      for (std::int64_t h = 0; h < Hq; ++h)
        for (std::int64_t d = 0; d < D; ++d) q[(t * Hq + h) * D + d] = input_value(0, t, h, d);
    for (std::int64_t t = 0; t < Skv; ++t)
      for (std::int64_t h = 0; h < Hkv; ++h)
        for (std::int64_t d = 0; d < D; ++d) {
          k[(t * Hkv + h) * D + d] = input_value(1, t, h, d);
          v[(t * Hkv + h) * D + d] = input_value(2, t, h, d);
        }
  }
  float& K(std::int64_t t, std::int64_t h, std::int64_t d) { return k[(t * Hkv + h) * D + d]; }
  float& Vv(std::int64_t t, std::int64_t h, std::int64_t d) { return v[(t * Hkv + h) * D + d]; }
  float& Q(std::int64_t t, std::int64_t h, std::int64_t d) { return q[(t * Hq + h) * D + d]; }
};

struct Result {
  std::vector<float> out, lse;  // [Sq][Hq][D], [Sq][Hq]
  float o(std::int64_t t, std::int64_t h, std::int64_t d, std::int64_t Hq, std::int64_t D) const {
    return out[(t * Hq + h) * D + d];
  }
};

Result run_kernel(const AttentionKernel& kernel, const Case& c, DType dtype) {
  const std::size_t es = dtype == DType::bf16 ? 2 : 4;
  auto convert = [&](const std::vector<float>& x) {
    std::vector<unsigned char> b(x.size() * es);
    for (std::size_t i = 0; i < x.size(); ++i) {
      if (dtype == DType::bf16) {
        const std::uint16_t h = uaa::bf16_from_f32(x[i]);
        std::memcpy(b.data() + i * 2, &h, 2);
      } else {
        std::memcpy(b.data() + i * 4, &x[i], 4);
      }
    }
    return b;
  };
  const auto q = convert(c.q), k = convert(c.k), v = convert(c.v);
  std::vector<unsigned char> out(c.Sq * c.Hq * c.D * es + 1, 0xcd);
  Result r;
  r.lse.assign(c.Sq * c.Hq, 12345.0f);
  const TokenSegment qs{q.data(), c.Sq, c.Hq * c.D, c.D};
  const TokenSegment ks{k.data(), c.Skv, c.Hkv * c.D, c.D};
  const TokenSegment vs{v.data(), c.Skv, c.Hkv * c.D, c.D};
  const OutSegment os{out.data(), c.Hq * c.D, c.D, r.lse.data(), c.Hq};
  KernelProblem p;
  p.dtype = dtype;
  p.head_dim = c.D;
  p.q_heads = c.Hq;
  p.group = c.Hq / c.Hkv;
  p.q = {&qs, 1};
  p.k = {&ks, 1};
  p.v = {&vs, 1};
  p.out = {&os, 1};
  p.q_total = c.Sq;
  p.kv_total = c.Skv;
  p.scale = 1.0f / std::sqrt(static_cast<float>(c.D));
  p.causal = c.causal;
  p.threads = uaa::num_threads();  // as forward() would run it on this rank
  const std::size_t bytes = (kernel.scratch_bytes(p) + 63) / 64 * 64 + 64;
  std::unique_ptr<void, decltype(&std::free)> scratch(std::aligned_alloc(64, bytes), &std::free);
  std::memset(scratch.get(), 0xcd, bytes);
  p.scratch = scratch.get();
  kernel.run(p);
  r.out.resize(c.Sq * c.Hq * c.D);
  for (std::size_t i = 0; i < r.out.size(); ++i) {
    if (dtype == DType::bf16) {
      std::uint16_t h;
      std::memcpy(&h, out.data() + i * 2, 2);
      r.out[i] = uaa::f32_from_bf16(h);
    } else {
      std::memcpy(&r.out[i], out.data() + i * 4, 4);
    }
  }
  return r;
}

struct KernelCase {
  const AttentionKernel* kernel;
  DType dtype;
  std::string name() const { return std::string(kernel->name()) + "/" + dtype_name(dtype); }
};

std::vector<KernelCase> all_kernels() {
  std::vector<KernelCase> v;
  std::vector<const AttentionKernel*> ks = {&detail::reference_kernel(), &detail::tiled_f32_kernel()};
  for (const AttentionKernel* k : detail::flash_kernels_supported()) ks.push_back(k);
  for (const AttentionKernel* k : ks)
    for (DType d : {DType::f32, DType::bf16})
      if (k->supports(d)) v.push_back({k, d});
  return v;
}

std::int64_t last_key(const Case& c, std::int64_t i) {
  return detail::last_visible_key(i, c.Sq, c.Skv, c.causal);
}

// Row (t, h) of `a` equals that of `b` (== per element: NaN fails, -0 == +0), and so does lse.
::testing::AssertionResult same_row(const Result& a, const Result& b, const Case& c, std::int64_t t,
                                    std::int64_t h) {
  for (std::int64_t d = 0; d < c.D; ++d)
    if (!(a.o(t, h, d, c.Hq, c.D) == b.o(t, h, d, c.Hq, c.D)))
      return ::testing::AssertionFailure()
             << "row " << t << " head " << h << " dim " << d << ": " << a.o(t, h, d, c.Hq, c.D)
             << " vs clean " << b.o(t, h, d, c.Hq, c.D);
  const float la = a.lse[t * c.Hq + h], lb = b.lse[t * c.Hq + h];
  if (!(la == lb))
    return ::testing::AssertionFailure() << "row " << t << " head " << h << ": lse " << la
                                         << " vs clean " << lb;
  return ::testing::AssertionSuccess();
}

bool row_all(const Result& r, const Case& c, std::int64_t t, std::int64_t h, bool (*pred)(float)) {
  for (std::int64_t d = 0; d < c.D; ++d)
    if (!pred(r.o(t, h, d, c.Hq, c.D))) return false;
  return true;
}
bool is_nan(float x) { return std::isnan(x); }
bool is_zero(float x) { return x == 0.0f; }

class Numerics : public ::testing::TestWithParam<KernelCase> {};

// NaN and Inf in V (and NaN in K) at keys inside diagonal tiles: rows before them are untouched.
TEST_P(Numerics, NonFiniteValuesDoNotContaminateRowsThatCannotSeeThem) {
  const KernelCase kc = GetParam();
  for (std::int64_t Skv : {150, 128, 97}) {  // the bad keys sit in a partial tile when Skv = 97
    Case clean;
    clean.Skv = Skv;
    clean.Sq = 150;
    clean.fill();
    Case dirty = clean;
    const std::int64_t nan_key = 90, inf_key = 70, knan_key = 93;  // kv head 0: NaN; 1: Inf
    for (std::int64_t d = 0; d < clean.D; d += 3) dirty.Vv(nan_key, 0, d) = kNaN;
    dirty.Vv(inf_key, 1, 5) = kInf;
    dirty.Vv(inf_key + 1, 1, 6) = -kInf;
    dirty.K(knan_key, 0, 2) = kNaN;
    const Result a = run_kernel(*kc.kernel, dirty, kc.dtype);
    const Result b = run_kernel(*kc.kernel, clean, kc.dtype);
    for (std::int64_t t = 0; t < clean.Sq; ++t)
      for (std::int64_t h = 0; h < clean.Hq; ++h) {
        const std::int64_t bad = h / 2 == 0 ? nan_key : inf_key;
        const std::int64_t last = last_key(clean, t);
        if (last < bad) {
          ASSERT_TRUE(same_row(a, b, clean, t, h)) << kc.name() << " Skv " << Skv;
          if (last < 0) {
            ASSERT_TRUE(row_all(a, clean, t, h, is_zero)) << kc.name() << " row " << t;
            ASSERT_EQ(a.lse[t * clean.Hq + h], -kInf) << kc.name() << " row " << t;
          }
        } else if (h / 2 == 0) {
          // V NaN in dims 0, 3, 6, ...: those output dims are NaN; a NaN score: the whole row.
          ASSERT_TRUE(std::isnan(a.o(t, h, 0, clean.Hq, clean.D))) << kc.name() << " row " << t;
          if (last >= knan_key) {
            ASSERT_TRUE(row_all(a, clean, t, h, is_nan)) << kc.name() << " row " << t;
            ASSERT_TRUE(std::isnan(a.lse[t * clean.Hq + h])) << kc.name();
          }
        } else {
          ASSERT_FALSE(std::isfinite(a.o(t, h, 5, clean.Hq, clean.D))) << kc.name() << " row " << t;
        }
      }
  }
}

// Non-causal: every row sees every key; a NaN in one kv head leaves the other kv head's rows alone.
TEST_P(Numerics, NonFiniteValuesStayInTheirHead) {
  const KernelCase kc = GetParam();
  Case clean;
  clean.causal = false;
  clean.Skv = 100;
  clean.fill();
  Case dirty = clean;
  dirty.Vv(99, 0, 0) = kNaN;  // in the zero-padded last tile
  dirty.K(3, 0, 0) = kInf;
  const Result a = run_kernel(*kc.kernel, dirty, kc.dtype);
  const Result b = run_kernel(*kc.kernel, clean, kc.dtype);
  for (std::int64_t t = 0; t < clean.Sq; ++t)
    for (std::int64_t h = 0; h < clean.Hq; ++h) {
      if (h / 2 == 0)
        ASSERT_TRUE(std::isnan(a.o(t, h, 0, clean.Hq, clean.D))) << kc.name() << " row " << t;
      else
        ASSERT_TRUE(same_row(a, b, clean, t, h)) << kc.name();
    }
}

// Rows with no visible key: causal with Skv < Sq, and zero keys at all.
TEST_P(Numerics, RowsWithoutKeysAreZeroWithLseMinusInfinity) {
  const KernelCase kc = GetParam();
  for (std::int64_t Skv : {0, 40}) {
    Case c;
    c.Sq = 100;
    c.Skv = Skv;
    c.causal = Skv > 0;
    c.fill();
    const Result r = run_kernel(*kc.kernel, c, kc.dtype);
    for (std::int64_t t = 0; t < c.Sq; ++t)
      for (std::int64_t h = 0; h < c.Hq; ++h) {
        if (last_key(c, t) >= 0) {
          ASSERT_TRUE(row_all(r, c, t, h, [](float x) { return std::isfinite(x); })) << kc.name();
          continue;
        }
        ASSERT_TRUE(row_all(r, c, t, h, is_zero)) << kc.name() << " Skv " << Skv << " row " << t;
        ASSERT_EQ(r.lse[t * c.Hq + h], -kInf) << kc.name();
      }
  }
}

// |q|, |k| ~ 1e30: a score that overflows fp32 makes its row NaN (the float64 reference keeps it
// finite); every other row and head is as without the huge values, or finite where it sees them.
TEST_P(Numerics, HugeMagnitudesOnlyAffectTheirRow) {
  const KernelCase kc = GetParam();
  Case clean;
  clean.fill();
  Case dirty = clean;
  const std::int64_t row = 120, key = 10;
  for (std::int64_t d = 0; d < clean.D; ++d) {
    dirty.Q(row, 0, d) = 1e30f;
    dirty.K(key, 0, d) = 1e30f;
  }
  const Result a = run_kernel(*kc.kernel, dirty, kc.dtype);
  const Result b = run_kernel(*kc.kernel, clean, kc.dtype);
  const bool f64 = std::string(kc.kernel->name()).rfind("reference", 0) == 0;
  for (std::int64_t t = 0; t < clean.Sq; ++t)
    for (std::int64_t h = 0; h < clean.Hq; ++h) {
      if (t == row && h == 0) {
        if (!f64) {
          ASSERT_TRUE(row_all(a, clean, t, h, is_nan)) << kc.name();
        }
      } else if (h / 2 == 1 || last_key(clean, t) < key) {
        ASSERT_TRUE(same_row(a, b, clean, t, h)) << kc.name();
      } else {
        ASSERT_TRUE(row_all(a, clean, t, h, [](float x) { return std::isfinite(x); }))
            << kc.name() << " row " << t << " head " << h;
      }
    }
}

// 1e-30 everywhere: scores underflow to 0 (uniform softmax), outputs ~1e-30, finite and accurate.
TEST_P(Numerics, TinyMagnitudesStayAccurate) {
  const KernelCase kc = GetParam();
  Case c;
  c.fill();
  for (auto* x : {&c.q, &c.k, &c.v})
    for (float& e : *x) e *= 1e-30f;
  const Result r = run_kernel(*kc.kernel, c, kc.dtype);
  const Result ref = run_kernel(detail::reference_kernel(), c, DType::f32);
  const double tol = kc.dtype == DType::bf16 ? 1e-32 : 1e-35;  // |out| ~ 1e-30
  for (std::size_t i = 0; i < r.out.size(); ++i) {
    ASSERT_TRUE(std::isfinite(r.out[i])) << kc.name();
    ASSERT_NEAR(r.out[i], ref.out[i], tol) << kc.name() << " element " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(EveryKernel, Numerics, ::testing::ValuesIn(all_kernels()),
                         [](const auto& info) {
                           std::string n = info.param.name();
                           for (char& ch : n)
                             if (ch == '/') ch = '_';
                           return n;
                         });

// Through forward() on every rank: NaN/Inf in V at keys of other ranks' tokens, causal. Rows that
// cannot see them are bitwise those of a clean run, and the whole output is bitwise the 1-rank run.
TEST(NumericsForward, NoContaminationAcrossRanksAndExactVsOneRank) {
  int me = 0, P = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &me);
  MPI_Comm_size(MPI_COMM_WORLD, &P);
  AttentionShape s = small_shape();
  s.causal = true;
  std::vector<std::int64_t> lens(P);
  for (int r = 0; r < P; ++r) lens[r] = 200 / P + (r == 0 ? 200 % P : 0);
  const std::int64_t nan_key = 83, inf_key = 140;  // kv head 0 / kv head 1
  auto poison = [&](RankCall& call, std::int64_t kv0, std::int64_t nkv) {
    const std::int64_t Hkv = s.kv_heads, D = s.head_dim;
    if (nan_key >= kv0 && nan_key < kv0 + nkv) call.v[((nan_key - kv0) * Hkv + 0) * D + 1] = kNaN;
    if (inf_key >= kv0 && inf_key < kv0 + nkv) call.v[((inf_key - kv0) * Hkv + 1) * D + 2] = kInf;
  };
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  const Plan plan = Plan::from_lengths(*comm, s, lens, lens);
  std::int64_t t0 = 0;
  for (int r = 0; r < me; ++r) t0 += lens[r];
  RankCall clean(plan), dirty(plan);
  poison(dirty, t0, lens[me]);
  Workspace ws;
  forward(plan, clean.args, ws);
  forward(plan, dirty.args, ws);
  // The whole problem on this rank alone.
  auto solo = make_mpi_communicator(MPI_COMM_SELF);
  const Plan whole = Plan::from_lengths(*solo, s, {200}, {200});
  RankCall all(whole);
  poison(all, 0, 200);
  Workspace ws1;
  forward(whole, all.args, ws1);
  const std::int64_t Hq = s.q_heads, D = s.head_dim, g = s.q_heads / s.kv_heads;
  for (std::int64_t t = 0; t < lens[me]; ++t)
    for (std::int64_t h = 0; h < Hq; ++h) {
      const std::int64_t i = t0 + t, bad = h / g == 0 ? nan_key : inf_key;
      for (std::int64_t d = 0; d < D; ++d) {
        const float x = dirty.out[(t * Hq + h) * D + d];
        const float y = all.out[((t0 + t) * Hq + h) * D + d];
        ASSERT_EQ(std::memcmp(&x, &y, 4), 0) << "rank " << me << " row " << i << " head " << h;
        if (i < bad) {
          ASSERT_EQ(x, clean.out[(t * Hq + h) * D + d]) << "row " << i << " head " << h;
        } else if (h / g == 0 && d == 1) {
          ASSERT_TRUE(std::isnan(x)) << "row " << i;
        }
      }
    }
}

}  // namespace
}  // namespace uaa::test
