// allgather_kv: every rank keeps its queries (all heads), gathers every rank's keys and values (all
// heads) and attends its own query rows over the whole sequence; no output exchange (Megatron's
// "all_gather" context parallelism). The gather is an uneven exchange in which a rank sends the same
// block to every peer; its own K/V are read in place. Bitwise equal to uaa: the kernel sees the same
// rows at the same global key positions.
#include <algorithm>

#include "core/steps.h"
#include "kernels/kernel.h"

namespace uaa::detail {

void run_allgather_kv(Communicator& xc, const PlanData& plan, const AttentionArgs& args,
                      Workspace::Buffers& B, bool sync, StepTimes& times) {
  const GatherLayout& L = plan.gather;
  const AttentionShape& s = plan.shape;
  const int me = L.rank, P = L.ranks;
  const std::size_t es = dtype_size(s.dtype);
  const std::int64_t kv_token_bytes = s.kv_heads * s.head_dim * static_cast<std::int64_t>(es);
  B.reserve(B.qkv_send, L.send.total);
  B.reserve(B.qkv_recv, L.recv.total);

  auto t0 = Clock::now();
  copy_heads_in(args.k, 0, s.kv_heads, es, B.qkv_send.data() + L.send_block.k, kv_token_bytes);
  copy_heads_in(args.v, 0, s.kv_heads, es, B.qkv_send.data() + L.send_block.v, kv_token_bytes);
  times.pack = ms_since(t0);

  sync_point(xc, sync, B, times.wait);
  t0 = Clock::now();
  xc.alltoallv(B.qkv_send.data(), L.send.counts, L.send.displs, B.qkv_recv.data(), L.recv.counts,
               L.recv.displs, L.max_total);
  times.exchange_qkv = ms_since(t0);

  // The kernel places query rows by the token counts of the segments before them, and this rank
  // has only its own rows. So it gets one query segment (its rows at local positions 0..n) and the
  // keys cut where the causal horizon of its last row ends: with q_total = n and that kv_total, the
  // kernel's rule j <= i_local + kv_total - q_total is exactly j <= i + (Skv - Sq) for global row
  // i = first + i_local. Keys keep their global positions (they start at 0), and the cut keys are
  // masked for all of this rank's rows anyway, so the result is bitwise that of uaa.
  t0 = Clock::now();
  std::int64_t q_total = 0, kv_total = 0, first = 0;
  for (int j = 0; j < P; ++j) {
    if (j < me) first += plan.q_lens[j];
    q_total += plan.q_lens[j];
    kv_total += plan.kv_lens[j];
  }
  const std::int64_t n = plan.q_lens[me];
  const std::int64_t keys =
      s.causal ? std::clamp<std::int64_t>(first + n + kv_total - q_total, 0, kv_total) : kv_total;
  const std::int64_t lse_ts = lse_token_stride(args, s);
  B.qseg.assign(1, {args.q.data, n, args.q.token_stride, args.q.head_stride});
  B.oseg.assign(1, {args.out.data, args.out.token_stride, args.out.head_stride, args.lse, lse_ts});
  B.kseg.clear();
  B.vseg.clear();
  std::int64_t at = 0;
  for (int j = 0; j < P && at < keys; ++j) {
    const std::int64_t take = std::min(plan.kv_lens[j], keys - at);
    at += take;
    if (j == me) {
      B.kseg.push_back({args.k.data, take, args.k.token_stride, args.k.head_stride});
      B.vseg.push_back({args.v.data, take, args.v.token_stride, args.v.head_stride});
    } else {
      const std::byte* block = B.qkv_recv.data() + L.recv.displs[j];
      B.kseg.push_back({block + L.recv_block[j].k, take, s.kv_heads * s.head_dim, s.head_dim});
      B.vseg.push_back({block + L.recv_block[j].v, take, s.kv_heads * s.head_dim, s.head_dim});
    }
  }
  if (n > 0) {
    KernelProblem kp = kernel_problem(s, B, s.q_heads, 0, 0, n, keys);
    run_kernel(kp, B);
  }
  times.attention = ms_since(t0);
}

}  // namespace uaa::detail
