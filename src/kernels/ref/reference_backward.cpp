// Float64 reference backward: the oracle the backward kernels are checked against.
//
// Per (q head, query row): recompute scores, softmax P and O in double (as reference_attention),
// then dP = dO·Vᵀ, delta = Σ_d dO∘O, dS = P∘(dP − delta)·scale, dQ = dS·K, and accumulate
// dK += dSᵀ·Q, dV += Pᵀ·dO into the kv head of the GQA group. Rows that see no key give dq = 0 and
// contribute nothing.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/kernel.h"

namespace uaa::detail {

void reference_attention_backward(const float* q, const float* k, const float* v,
                                  const float* dout, std::int64_t Sq, std::int64_t Skv,
                                  std::int64_t Hq, std::int64_t Hkv, std::int64_t D, float scale,
                                  bool causal, double* dq, double* dk, double* dv,
                                  std::int64_t window_left, std::int64_t window_right) {
  std::fill(dq, dq + Sq * Hq * D, 0.0);
  std::fill(dk, dk + Skv * Hkv * D, 0.0);
  std::fill(dv, dv + Skv * Hkv * D, 0.0);
  if (Hq <= 0 || Hkv <= 0 || D <= 0) return;
  const std::int64_t group = Hq / Hkv;
  const double sc = scale;
  std::vector<double> p, dp, o(D);
  for (std::int64_t h = 0; h < Hq; ++h) {
    const std::int64_t kvh = h / group;
    for (std::int64_t i = 0; i < Sq; ++i) {
      // Keys [j0, j0 + n): the row's visible keys; index j below is relative to j0.
      const std::int64_t j0 = first_visible_key(i, Sq, Skv, window_left);
      const std::int64_t n = last_visible_key(i, Sq, Skv, causal, window_right) - j0 + 1;
      if (n <= 0) continue;
      auto krow = [&](std::int64_t j) { return k + ((j0 + j) * Hkv + kvh) * D; };
      auto vrow = [&](std::int64_t j) { return v + ((j0 + j) * Hkv + kvh) * D; };
      const float* qr = q + (i * Hq + h) * D;
      const float* gr = dout + (i * Hq + h) * D;
      p.resize(n);
      dp.resize(n);
      // Scores and softmax.
      double m = -std::numeric_limits<double>::infinity();
      for (std::int64_t j = 0; j < n; ++j) {
        const float* kr = krow(j);
        double s = 0.0;
        for (std::int64_t d = 0; d < D; ++d) s += static_cast<double>(qr[d]) * kr[d];
        p[j] = s * sc;
        m = std::max(m, p[j]);
      }
      double l = 0.0;
      for (std::int64_t j = 0; j < n; ++j) {
        p[j] = std::exp(p[j] - m);
        l += p[j];
      }
      for (std::int64_t j = 0; j < n; ++j) p[j] /= l;
      // O and delta.
      std::fill(o.begin(), o.end(), 0.0);
      for (std::int64_t j = 0; j < n; ++j) {
        const float* vr = vrow(j);
        for (std::int64_t d = 0; d < D; ++d) o[d] += p[j] * vr[d];
      }
      double delta = 0.0;
      for (std::int64_t d = 0; d < D; ++d) delta += static_cast<double>(gr[d]) * o[d];
      // dP, dS (in place in dp), dV.
      for (std::int64_t j = 0; j < n; ++j) {
        const float* vr = vrow(j);
        double s = 0.0;
        for (std::int64_t d = 0; d < D; ++d) s += static_cast<double>(gr[d]) * vr[d];
        dp[j] = p[j] * (s - delta) * sc;
        double* dvr = dv + ((j0 + j) * Hkv + kvh) * D;
        for (std::int64_t d = 0; d < D; ++d) dvr[d] += p[j] * gr[d];
      }
      // dQ = dS·K, dK += dSᵀ·Q.
      double* dqr = dq + (i * Hq + h) * D;
      for (std::int64_t j = 0; j < n; ++j) {
        const float* kr = krow(j);
        double* dkr = dk + ((j0 + j) * Hkv + kvh) * D;
        for (std::int64_t d = 0; d < D; ++d) {
          dqr[d] += dp[j] * kr[d];
          dkr[d] += dp[j] * qr[d];
        }
      }
    }
  }
}

}  // namespace uaa::detail
