// Pieces shared by the strategies of forward() (internal): strided row copies, phase timing, the
// bench-only synchronization point, and the entry points of the non-default strategies.
//
// Every strategy runs after forward() has validated the arguments and completed the handshake, so
// it may write the caller's output: no rank raises an argument error past that point.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "core/workspace.h"
#include "kernels/kernel.h"
#include "plan/plan_data.h"
#include "uaa/attention.h"
#include "uaa/communicator.h"

namespace uaa::detail {

// Elements between tokens in the caller's lse array (AttentionArgs: 0 means q_heads).
inline std::int64_t lse_token_stride(const AttentionArgs& a, const AttentionShape& s) {
  return a.lse_token_stride == 0 ? s.q_heads : a.lse_token_stride;
}

using Clock = std::chrono::steady_clock;
inline double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// Copies tokens [t0, t1) x heads [h0, h0 + n) of `src` to dst[t - t0][h][:], where dst rows of one
// token are contiguous and tokens are `dst_token_bytes` apart.
inline void copy_heads_in(const ConstTensor& src, std::int64_t t0, std::int64_t t1, std::int64_t h0,
                          std::int64_t n, std::size_t es, std::byte* dst,
                          std::int64_t dst_token_bytes) {
  if (n <= 0) return;
  const std::size_t row = static_cast<std::size_t>(src.head_dim) * es;
  const auto* base = static_cast<const std::byte*>(src.data);
  for (std::int64_t t = t0; t < t1; ++t, dst += dst_token_bytes) {
    const std::byte* tok = base + (t * src.token_stride + h0 * src.head_stride) * es;
    if (src.head_stride == src.head_dim) {
      std::memcpy(dst, tok, row * n);
    } else {
      for (std::int64_t h = 0; h < n; ++h)
        std::memcpy(dst + h * row, tok + h * src.head_stride * es, row);
    }
  }
}

// All tokens of `src`.
inline void copy_heads_in(const ConstTensor& src, std::int64_t h0, std::int64_t n, std::size_t es,
                          std::byte* dst, std::int64_t dst_token_bytes) {
  copy_heads_in(src, 0, src.tokens, h0, n, es, dst, dst_token_bytes);
}

// Inverse of copy_heads_in, into tokens [t0, t1) of the caller's output.
inline void copy_heads_out(const std::byte* src, std::int64_t src_token_bytes, const Tensor& dst,
                           std::int64_t t0, std::int64_t t1, std::int64_t h0, std::int64_t n,
                           std::size_t es) {
  if (n <= 0) return;
  const std::size_t row = static_cast<std::size_t>(dst.head_dim) * es;
  auto* base = static_cast<std::byte*>(dst.data);
  for (std::int64_t t = t0; t < t1; ++t, src += src_token_bytes) {
    std::byte* tok = base + (t * dst.token_stride + h0 * dst.head_stride) * es;
    if (dst.head_stride == dst.head_dim) {
      std::memcpy(tok, src, row * n);
    } else {
      for (std::int64_t h = 0; h < n; ++h)
        std::memcpy(tok + h * dst.head_stride * es, src + h * row, row);
    }
  }
}

// All tokens of `dst`.
inline void copy_heads_out(const std::byte* src, std::int64_t src_token_bytes, const Tensor& dst,
                           std::int64_t h0, std::int64_t n, std::size_t es) {
  copy_heads_out(src, src_token_bytes, dst, 0, dst.tokens, h0, n, es);
}

// Per-phase times of one strategy step, in milliseconds.
// The kernel problem for `q_heads` query heads starting at global head `q_head_begin` over the
// workspace's segment lists (qseg/kseg/vseg/oseg), with the shape's dtype, scale and mask.
inline KernelProblem kernel_problem(const AttentionShape& s, Workspace::Buffers& B,
                                    std::int64_t q_heads, std::int64_t q_head_begin,
                                    std::int64_t kv_head_begin, std::int64_t q_total,
                                    std::int64_t kv_total) {
  KernelProblem kp;
  kp.dtype = s.dtype;
  kp.head_dim = s.head_dim;
  kp.q_heads = q_heads;
  kp.q_head_begin = q_head_begin;
  kp.kv_head_begin = kv_head_begin;
  kp.group = s.q_heads / s.kv_heads;
  kp.q = B.qseg;
  kp.k = B.kseg;
  kp.v = B.vseg;
  kp.out = B.oseg;
  kp.q_total = q_total;
  kp.kv_total = kv_total;
  kp.scale = s.scale;
  kp.causal = s.causal;
  return kp;
}

// Runs this process's kernel on kp with scratch from the workspace (grown once, then reused).
inline void run_kernel(KernelProblem& kp, Workspace::Buffers& B) {
  const AttentionKernel& kernel = select_kernel();
  B.reserve(B.scratch, static_cast<std::int64_t>(kernel.scratch_bytes(kp)));
  kp.scratch = B.scratch.data();
  kernel.run(kp);
}

struct StepTimes {
  double pack = 0, exchange_qkv = 0, attention = 0, exchange_out = 0, unpack = 0, wait = 0;
};

// Waits for every rank: a one-byte all-gather (under the transport's deadline).
inline void barrier(Communicator& xc, Workspace::Buffers& B) {
  B.reserve(B.sync, xc.size());
  const std::byte one{1};
  xc.allgather(&one, 1, B.sync.data());
}

// With `enabled` (benchmarks only: PhaseTimes::sync_exchanges), a barrier whose wait is added to
// `wait_ms`, so the exchange that follows measures data movement rather than the skew of the phase
// before it.
inline void sync_point(Communicator& xc, bool enabled, Workspace::Buffers& B, double& wait_ms) {
  if (!enabled) return;
  const auto t0 = Clock::now();
  barrier(xc, B);
  wait_ms += ms_since(t0);
}

// ulysses and ulysses_pad (strategy_padded.cpp), allgather_kv (strategy_allgather.cpp).
void run_padded(Communicator& xc, const PlanData& plan, const AttentionArgs& args,
                Workspace::Buffers& B, bool sync, StepTimes& times);
void run_allgather_kv(Communicator& xc, const PlanData& plan, const AttentionArgs& args,
                      Workspace::Buffers& B, bool sync, StepTimes& times);

}  // namespace uaa::detail
