// The float64 reference backward (reference_attention_backward), checked independently:
//  - against central finite differences of a float64 forward written here (on double inputs), for
//    every entry of q, k and v, with the loss L = Σ dout∘out (so ∂L/∂x is what the backward returns);
//  - its forward part against reference_attention: the softmax rows it uses (read back through dV
//    with one-hot dout) rebuild reference_attention's out and lse.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "common/test_data.h"
#include "kernels/kernel.h"

namespace uaa::detail {
namespace {

struct Shape {
  std::int64_t Sq, Skv, Hq, Hkv, D;
  bool causal;
  std::int64_t wl = -1, wr = -1;  // sliding window, -1 unbounded
  std::string str() const {
    return "Sq=" + std::to_string(Sq) + " Skv=" + std::to_string(Skv) + " Hq=" + std::to_string(Hq) +
           " Hkv=" + std::to_string(Hkv) + " D=" + std::to_string(D) + (causal ? " causal" : "") +
           (wl >= 0 || wr >= 0 ? " window=(" + std::to_string(wl) + "," + std::to_string(wr) + ")" : "");
  }
  float scale() const { return 1.5f / std::sqrt(static_cast<float>(D)); }
  // Key j visible to row i (own code, from the definition in kernel.h): i' = i + Skv - Sq.
  bool visible(std::int64_t i, std::int64_t j) const {
    const std::int64_t a = i + Skv - Sq;
    return (!causal || j <= a) && (wl < 0 || j >= a - wl) && (wr < 0 || j <= a + wr);
  }
  bool sees_any(std::int64_t i) const {
    for (std::int64_t j = 0; j < Skv; ++j)
      if (visible(i, j)) return true;
    return false;
  }
};

// The shapes: causal and not, GQA 4/2, MQA 3/1, plain MHA, Sq < Skv, Sq > Skv (causal: leading rows
// that see no key), single key / single row, D from 3 to 8; sliding windows (a single key, left or
// right only, with and without causal, rows that see no key).
const Shape kShapes[] = {
    {5, 5, 2, 2, 4, false}, {5, 5, 2, 2, 4, true},  {4, 7, 4, 2, 5, false}, {4, 7, 4, 2, 5, true},
    {7, 4, 4, 2, 3, true},  {7, 4, 4, 2, 6, false}, {6, 3, 3, 1, 8, true},  {3, 6, 3, 1, 7, false},
    {5, 5, 3, 1, 3, true},  {1, 4, 4, 2, 4, true},  {4, 1, 3, 1, 5, true},  {6, 6, 4, 2, 8, true},
    {6, 6, 2, 1, 4, false, 1, 2}, {6, 6, 2, 1, 4, true, 2, -1}, {4, 7, 2, 2, 5, false, -1, 1},
    {7, 4, 2, 1, 3, false, 0, 0}, {7, 4, 2, 1, 3, true, 1, 5},  {5, 8, 2, 1, 4, false, 2, 2},
};

struct Data {
  std::vector<float> q, k, v, dout;
};

Data make_data(const Shape& s, std::uint64_t seed) {
  Data d{test::make_tensor(seed, 0, 0, s.Sq, s.Hq, s.D), test::make_tensor(seed, 1, 0, s.Skv, s.Hkv, s.D),
         test::make_tensor(seed, 2, 0, s.Skv, s.Hkv, s.D), test::make_tensor(seed, 3, 0, s.Sq, s.Hq, s.D)};
  for (float& x : d.q) x *= 2.0f;  // peakier softmax (exact in fp32)
  return d;
}

// A plain float64 forward on double inputs (own code: log-sum-exp without the shared helper),
// out [Sq][Hq][D], lse [Sq][Hq] (-inf for rows that see no key, out 0 there).
void forward64(const Shape& s, const std::vector<double>& q, const std::vector<double>& k,
               const std::vector<double>& v, std::vector<double>& out, std::vector<double>& lse) {
  const std::int64_t g = s.Hq / s.Hkv;
  const double scale = s.scale();
  out.assign(static_cast<std::size_t>(s.Sq * s.Hq * s.D), 0.0);
  lse.assign(static_cast<std::size_t>(s.Sq * s.Hq), -std::numeric_limits<double>::infinity());
  std::vector<double> sc(static_cast<std::size_t>(s.Skv));
  for (std::int64_t i = 0; i < s.Sq; ++i) {
    if (!s.sees_any(i)) continue;
    for (std::int64_t h = 0; h < s.Hq; ++h) {
      const std::int64_t kh = h / g;
      double m = -std::numeric_limits<double>::infinity();
      for (std::int64_t j = 0; j < s.Skv; ++j) {
        if (!s.visible(i, j)) continue;
        double dot = 0;
        for (std::int64_t d = 0; d < s.D; ++d) dot += q[(i * s.Hq + h) * s.D + d] * k[(j * s.Hkv + kh) * s.D + d];
        sc[j] = dot * scale;
        m = std::max(m, sc[j]);
      }
      double l = 0;
      for (std::int64_t j = 0; j < s.Skv; ++j)
        if (s.visible(i, j)) l += std::exp(sc[j] - m);
      const double ls = m + std::log(l);
      lse[i * s.Hq + h] = ls;
      for (std::int64_t j = 0; j < s.Skv; ++j) {
        if (!s.visible(i, j)) continue;
        const double p = std::exp(sc[j] - ls);
        for (std::int64_t d = 0; d < s.D; ++d) out[(i * s.Hq + h) * s.D + d] += p * v[(j * s.Hkv + kh) * s.D + d];
      }
    }
  }
}

double loss(const Shape& s, const std::vector<double>& q, const std::vector<double>& k,
            const std::vector<double>& v, const std::vector<double>& dout) {
  std::vector<double> out, lse;
  forward64(s, q, k, v, out, lse);
  double L = 0;
  for (std::size_t i = 0; i < out.size(); ++i) L += dout[i] * out[i];
  return L;
}

std::vector<double> to_double(const std::vector<float>& f) { return {f.begin(), f.end()}; }

// Max |fd - grad| / max |grad| over one tensor, fd by central differences of x's every entry.
double fd_error(const Shape& s, std::vector<double>& x, const std::vector<double>& grad,
                const std::vector<double>& q, const std::vector<double>& k, const std::vector<double>& v,
                const std::vector<double>& dout) {
  const double h = 1e-5;
  double err = 0, ref = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double x0 = x[i];
    x[i] = x0 + h;
    const double lp = loss(s, q, k, v, dout);
    x[i] = x0 - h;
    const double lm = loss(s, q, k, v, dout);
    x[i] = x0;
    const double fd = (lp - lm) / (2 * h);
    err = std::max(err, std::abs(fd - grad[i]));
    ref = std::max(ref, std::abs(grad[i]));
  }
  return ref > 0 ? err / ref : err;
}

TEST(ReferenceBackward, MatchesFiniteDifferences) {
  for (const Shape& s : kShapes) {
    SCOPED_TRACE(s.str());
    const Data in = make_data(s, 11);
    std::vector<double> dq(in.q.size()), dk(in.k.size()), dv(in.v.size());
    reference_attention_backward(in.q.data(), in.k.data(), in.v.data(), in.dout.data(), s.Sq, s.Skv,
                                 s.Hq, s.Hkv, s.D, s.scale(), s.causal, dq.data(), dk.data(), dv.data(),
                                 s.wl, s.wr);
    std::vector<double> q = to_double(in.q), k = to_double(in.k), v = to_double(in.v);
    const std::vector<double> dout = to_double(in.dout);
    for (double g : dq) ASSERT_TRUE(std::isfinite(g));
    EXPECT_LT(fd_error(s, q, dq, q, k, v, dout), 1e-6) << "dq";
    EXPECT_LT(fd_error(s, k, dk, q, k, v, dout), 1e-6) << "dk";
    EXPECT_LT(fd_error(s, v, dv, q, k, v, dout), 1e-6) << "dv";
    // Rows that see no key: exactly zero dq.
    for (std::int64_t i = 0; i < s.Sq; ++i) {
      if (s.sees_any(i)) continue;
      for (std::int64_t e = 0; e < s.Hq * s.D; ++e) EXPECT_EQ(dq[i * s.Hq * s.D + e], 0.0) << "row " << i;
    }
  }
}

TEST(ReferenceBackward, NotTriviallySmall) {
  // The FD check is relative to the largest gradient: make sure every gradient is far from zero.
  const Shape s{6, 6, 4, 2, 8, true};
  const Data in = make_data(s, 11);
  std::vector<double> dq(in.q.size()), dk(in.k.size()), dv(in.v.size());
  reference_attention_backward(in.q.data(), in.k.data(), in.v.data(), in.dout.data(), s.Sq, s.Skv,
                               s.Hq, s.Hkv, s.D, s.scale(), s.causal, dq.data(), dk.data(), dv.data());
  auto maxabs = [](const std::vector<double>& x) {
    double m = 0;
    for (double e : x) m = std::max(m, std::abs(e));
    return m;
  };
  EXPECT_GT(maxabs(dq), 1e-2);
  EXPECT_GT(maxabs(dk), 1e-2);
  EXPECT_GT(maxabs(dv), 1e-2);
}

TEST(ReferenceBackward, ForwardPartMatchesReferenceAttention) {
  for (const Shape& s : kShapes) {
    SCOPED_TRACE(s.str());
    const Data in = make_data(s, 23);
    std::vector<double> out(in.q.size()), lse(static_cast<std::size_t>(s.Sq * s.Hq));
    reference_attention(in.q.data(), in.k.data(), in.v.data(), s.Sq, s.Skv, s.Hq, s.Hkv, s.D, s.scale(),
                        s.causal, out.data(), lse.data(), s.wl, s.wr);
    // The test's own forward is the same function (so the FD check differentiates the forward the
    // library computes).
    std::vector<double> out64, lse64;
    forward64(s, to_double(in.q), to_double(in.k), to_double(in.v), out64, lse64);
    for (std::size_t e = 0; e < out.size(); ++e) EXPECT_NEAR(out64[e], out[e], 1e-12);
    for (std::size_t e = 0; e < lse.size(); ++e) {
      if (std::isinf(lse[e])) {
        EXPECT_TRUE(std::isinf(lse64[e]));
      } else {
        EXPECT_NEAR(lse64[e], lse[e], 1e-12);
      }
    }
    // The backward's own softmax: with dout one-hot at (row i, head h, dim 0), dV[j][h/g][0] is
    // P[i][j] of that head. Rebuild out[i][h] = Σ_j P[i][j] v[j] and lse from P = exp(s - lse).
    const std::int64_t g = s.Hq / s.Hkv;
    std::vector<float> onehot(in.q.size());
    std::vector<double> dq(in.q.size()), dk(in.k.size()), dv(in.v.size());
    for (std::int64_t i = 0; i < s.Sq; ++i) {
      for (std::int64_t h = 0; h < s.Hq; ++h) {
        std::fill(onehot.begin(), onehot.end(), 0.0f);
        onehot[(i * s.Hq + h) * s.D] = 1.0f;
        reference_attention_backward(in.q.data(), in.k.data(), in.v.data(), onehot.data(), s.Sq, s.Skv,
                                     s.Hq, s.Hkv, s.D, s.scale(), s.causal, dq.data(), dk.data(),
                                     dv.data(), s.wl, s.wr);
        const std::int64_t kh = h / g;
        double psum = 0;
        for (std::int64_t j = 0; j < s.Skv; ++j) {
          const double p = dv[(j * s.Hkv + kh) * s.D];
          psum += p;
          if (!s.visible(i, j)) {
            EXPECT_EQ(p, 0.0) << "invisible key " << j << " row " << i;
            continue;
          }
          double dot = 0;
          for (std::int64_t d = 0; d < s.D; ++d)
            dot += static_cast<double>(in.q[(i * s.Hq + h) * s.D + d]) * in.k[(j * s.Hkv + kh) * s.D + d];
          EXPECT_NEAR(p, std::exp(dot * s.scale() - lse[i * s.Hq + h]), 1e-13) << "row " << i << " key " << j;
        }
        if (!s.sees_any(i)) {
          EXPECT_EQ(psum, 0.0);
          continue;
        }
        EXPECT_NEAR(psum, 1.0, 1e-13);
        for (std::int64_t d = 0; d < s.D; ++d) {
          double o = 0;
          for (std::int64_t j = 0; j < s.Skv; ++j) o += dv[(j * s.Hkv + kh) * s.D] * in.v[(j * s.Hkv + kh) * s.D + d];
          EXPECT_NEAR(o, out[(i * s.Hq + h) * s.D + d], 1e-13) << "row " << i << " head " << h;
        }
      }
    }
  }
}

}  // namespace
}  // namespace uaa::detail
