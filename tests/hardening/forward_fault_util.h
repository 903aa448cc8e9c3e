// Helpers for tests/hardening/forward_fault_test.cpp: one rank's buffers for a forward() call
// (deterministic data from tests/common/test_data.h, f32 or bf16, out filled with a sentinel), a
// timed capture of a call's outcome, and a float64 reference of the rows a rank owns.
#pragma once

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common/test_data.h"
#include "kernels/kernel.h"
#include "mpi/mpi_test_util.h"
#include "uaa/attention.h"
#include "uaa/bf16.h"
#include "uaa/mpi.h"
#include "uaa/plan.h"

namespace uaa::test {

using SteadyClock = std::chrono::steady_clock;
inline double seconds_since(SteadyClock::time_point t0) {
  return std::chrono::duration<double>(SteadyClock::now() - t0).count();
}

struct Timed {
  Outcome outcome;
  double seconds = 0;
};

template <typename F>
Timed timed_capture(F&& fn) {
  Timed t;
  const auto t0 = SteadyClock::now();
  t.outcome = capture(fn);
  t.seconds = seconds_since(t0);
  return t;
}

inline std::shared_ptr<Communicator> comm_with_deadline(double seconds) {
  MpiOptions o;
  o.timeout_seconds = seconds;
  return make_mpi_communicator(MPI_COMM_WORLD, o);
}

// The sentinel every out element holds before a call (a distinctive quiet NaN).
constexpr std::uint32_t kOutSentinel32 = 0x7fc0dead;
constexpr std::uint16_t kOutSentinel16 = 0x7fd5;

inline std::int64_t first_token(const std::vector<std::int64_t>& lens, int rank) {
  std::int64_t n = 0;
  for (int r = 0; r < rank; ++r) n += lens[static_cast<std::size_t>(r)];
  return n;
}

// One rank's contiguous q, k, v (values from `seed`) and out (the sentinel) for `plan`.
struct Shard {
  DType dtype = DType::f32;
  std::int64_t nq = 0, nkv = 0, hq = 0, hkv = 0, dim = 0;
  std::vector<float> q, k, v, out;                  // f32 storage
  std::vector<std::uint16_t> q16, k16, v16, out16;  // bf16 storage
  AttentionArgs args;

  Shard(const Plan& plan, std::uint64_t seed) {
    const AttentionShape& s = plan.shape();
    dtype = s.dtype;
    nq = plan.q_tokens();
    nkv = plan.kv_tokens();
    hq = s.q_heads;
    hkv = s.kv_heads;
    dim = s.head_dim;
    const std::int64_t q0 = first_token(plan.q_lens(), plan.rank());
    const std::int64_t kv0 = first_token(plan.kv_lens(), plan.rank());
    q = make_tensor(seed, 0, q0, nq, hq, dim);
    k = make_tensor(seed, 1, kv0, nkv, hkv, dim);
    v = make_tensor(seed, 2, kv0, nkv, hkv, dim);
    if (dtype == DType::bf16) {
      auto to16 = [](const std::vector<float>& f) {
        std::vector<std::uint16_t> b(f.size());
        for (std::size_t i = 0; i < f.size(); ++i) b[i] = bf16_from_f32(f[i]);
        return b;
      };
      q16 = to16(q);
      k16 = to16(k);
      v16 = to16(v);
      out16.assign(static_cast<std::size_t>(nq * hq * dim), kOutSentinel16);
      args.q = contiguous(q16.data(), nq, hq, dim, dtype);
      args.k = contiguous(k16.data(), nkv, hkv, dim, dtype);
      args.v = contiguous(v16.data(), nkv, hkv, dim, dtype);
      args.out = contiguous(static_cast<void*>(out16.data()), nq, hq, dim, dtype);
    } else {
      out.resize(static_cast<std::size_t>(nq * hq * dim));
      reset_out();
      args.q = contiguous(q.data(), nq, hq, dim);
      args.k = contiguous(k.data(), nkv, hkv, dim);
      args.v = contiguous(v.data(), nkv, hkv, dim);
      args.out = contiguous(static_cast<void*>(out.data()), nq, hq, dim);
    }
  }
  Shard(const Shard&) = delete;
  Shard& operator=(const Shard&) = delete;

  void reset_out() {
    if (dtype == DType::bf16) {
      std::fill(out16.begin(), out16.end(), kOutSentinel16);
      return;
    }
    for (float& f : out) std::memcpy(&f, &kOutSentinel32, sizeof f);
  }
  // True if every out element still holds the sentinel.
  bool out_untouched() const {
    if (dtype == DType::bf16) {
      for (std::uint16_t b : out16)
        if (b != kOutSentinel16) return false;
      return true;
    }
    for (const float& f : out) {
      std::uint32_t u;
      std::memcpy(&u, &f, sizeof u);
      if (u != kOutSentinel32) return false;
    }
    return true;
  }
};

// Largest |got - reference| over this rank's rows of the whole problem (f32 only), by the float64
// reference of src/kernels (detail::reference_attention) run on the whole problem.
inline double max_error_vs_reference(const Plan& plan, std::uint64_t seed,
                                     const std::vector<float>& got) {
  const AttentionShape& s = plan.shape();
  const std::int64_t Sq = plan.q_total(), Skv = plan.kv_total();
  const std::vector<float> q = make_tensor(seed, 0, 0, Sq, s.q_heads, s.head_dim);
  const std::vector<float> k = make_tensor(seed, 1, 0, Skv, s.kv_heads, s.head_dim);
  const std::vector<float> v = make_tensor(seed, 2, 0, Skv, s.kv_heads, s.head_dim);
  std::vector<double> want(static_cast<std::size_t>(Sq * s.q_heads * s.head_dim));
  detail::reference_attention(q.data(), k.data(), v.data(), Sq, Skv, s.q_heads, s.kv_heads,
                              s.head_dim, s.scale, s.causal, want.data(), nullptr);
  const std::int64_t row = s.q_heads * s.head_dim;
  const std::int64_t first = first_token(plan.q_lens(), plan.rank()) * row;
  double worst = 0;
  if (static_cast<std::int64_t>(got.size()) != plan.q_tokens() * row) return INFINITY;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double e =
        std::fabs(static_cast<double>(got[i]) - want[static_cast<std::size_t>(first) + i]);
    if (std::isnan(e)) return INFINITY;
    worst = std::max(worst, e);
  }
  return worst;
}

}  // namespace uaa::test
