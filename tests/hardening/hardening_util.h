// Small helpers for the hardening tests: one rank's buffers for a forward() call of a plan, filled
// with a formula of (global token, head, dim) so that any rank can rebuild any other rank's data.
#pragma once

#include <mpi.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "uaa/attention.h"
#include "uaa/plan.h"

namespace uaa::test {

inline float input_value(int which, std::int64_t token, std::int64_t head, std::int64_t d) {
  const double x = static_cast<double>(which * 7919 + token * 131 + head * 17 + d);
  return static_cast<float>(std::sin(x * 0.37) * 0.5);
}

struct RankCall {
  std::vector<float> q, k, v, out;
  AttentionArgs args;

  // Buffers for this rank's tokens of `plan` (fp32, contiguous).
  explicit RankCall(const Plan& plan) {
    const AttentionShape& s = plan.shape();
    const std::int64_t Hq = s.q_heads, Hkv = s.kv_heads, D = s.head_dim;
    const std::int64_t nq = plan.q_tokens(), nkv = plan.kv_tokens();
    std::int64_t q0 = 0, kv0 = 0;
    for (int r = 0; r < plan.rank(); ++r) {
      q0 += plan.q_lens()[r];
      kv0 += plan.kv_lens()[r];
    }
    q.resize(nq * Hq * D);
    k.resize(nkv * Hkv * D);
    v.resize(nkv * Hkv * D);
    out.assign(nq * Hq * D, -7.0f);
    for (std::int64_t t = 0; t < nq; ++t)
      for (std::int64_t h = 0; h < Hq; ++h)
        for (std::int64_t d = 0; d < D; ++d) q[(t * Hq + h) * D + d] = input_value(0, q0 + t, h, d);
    for (std::int64_t t = 0; t < nkv; ++t)
      for (std::int64_t h = 0; h < Hkv; ++h)
        for (std::int64_t d = 0; d < D; ++d) {
          k[(t * Hkv + h) * D + d] = input_value(1, kv0 + t, h, d);
          v[(t * Hkv + h) * D + d] = input_value(2, kv0 + t, h, d);
        }
    args.q = contiguous(q.data(), nq, Hq, D);
    args.k = contiguous(k.data(), nkv, Hkv, D);
    args.v = contiguous(v.data(), nkv, Hkv, D);
    args.out = {out.data(), nq, Hq, D, Hq * D, D, DType::f32};
  }
};

// A small uneven problem: rank r holds 3 + 2r tokens, 6 q heads over 2 kv heads, head dim 8.
inline AttentionShape small_shape() {
  AttentionShape s;
  s.q_heads = 6;
  s.kv_heads = 2;
  s.head_dim = 8;
  return s;
}
inline std::vector<std::int64_t> small_lens(int ranks) {
  std::vector<std::int64_t> lens(ranks);
  for (int r = 0; r < ranks; ++r) lens[r] = 3 + 2 * r;
  return lens;
}

// The deadline the hardening tests give their communicators: UAA_HARDENING_TIMEOUT seconds (set it
// to 0 to check that the tests hang without deadlines), else 2 s.
inline double test_deadline() {
  const char* env = std::getenv("UAA_HARDENING_TIMEOUT");
  return env && *env ? std::atof(env) : 2.0;
}

using SteadyClock = std::chrono::steady_clock;
inline double seconds_since(SteadyClock::time_point t0) {
  return std::chrono::duration<double>(SteadyClock::now() - t0).count();
}

}  // namespace uaa::test
