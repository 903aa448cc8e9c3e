// ulysses and ulysses_pad: the equal-count Ulysses that the Python libraries run. Every rank's shard
// is padded to the same number of tokens and the query heads to a multiple of the rank count; every
// block, the rank's own included, goes through both exchanges (what all_to_all with equal splits
// does). The padded rows and heads are zero data: they travel, padded query rows and heads are
// computed, and the unpack drops them. Padded key rows are excluded by handing the kernel the real
// key rows only (segment token counts) instead of masking them: that spares ulysses_pad at most
// (P-1)/S of the attention work, in its favour. With nothing to pad this is plain Ulysses.
#include <algorithm>
#include <cstring>

#include "core/steps.h"
#include "kernels/kernel.h"

namespace uaa::detail {
namespace {

// Writes one [rows][heads][D] part of a block: the tokens of `src` for padded heads
// [h0, h0 + heads), real heads copied, padded heads and rows past src.tokens zeroed.
void pack_part(const ConstTensor& src, std::int64_t real_heads, std::int64_t h0,
               std::int64_t heads, std::int64_t rows, std::size_t es, std::byte* dst) {
  const std::int64_t row = src.head_dim * static_cast<std::int64_t>(es);
  const std::int64_t token_bytes = heads * row;
  const std::int64_t n = std::clamp<std::int64_t>(real_heads - h0, 0, heads);
  copy_heads_in(src, h0, n, es, dst, token_bytes);
  if (n < heads)
    for (std::int64_t t = 0; t < src.tokens; ++t)
      std::memset(dst + t * token_bytes + n * row, 0, static_cast<std::size_t>((heads - n) * row));
  std::memset(dst + src.tokens * token_bytes, 0,
              static_cast<std::size_t>((rows - src.tokens) * token_bytes));
}

}  // namespace

void run_padded(Communicator& xc, const PlanData& plan, const AttentionArgs& args,
                Workspace::Buffers& B, bool sync, StepTimes& times) {
  const PaddedLayout& L = plan.padded;
  const AttentionShape& s = plan.shape;
  const int me = L.rank, P = L.ranks;
  const std::size_t es = dtype_size(s.dtype);
  const std::int64_t row = s.head_dim * static_cast<std::int64_t>(es);
  const std::int64_t hq = L.q_heads_per_rank, hkv = L.kv_heads_per_rank;
  const QkvBlock& blk = L.qkv_block;
  B.reserve(B.qkv_send, L.qkv_send.total);
  B.reserve(B.qkv_recv, L.qkv_recv.total);
  B.reserve(B.out_send, L.out_send.total);
  B.reserve(B.out_recv, L.out_recv.total);

  auto t0 = Clock::now();
  for (int j = 0; j < P; ++j) {
    std::byte* block = B.qkv_send.data() + L.qkv_send.displs[j];
    pack_part(args.q, s.q_heads, j * hq, hq, L.q_rows, es, block + blk.q[0]);
    pack_part(args.k, s.kv_heads, L.kv_head_begin[j], hkv, L.kv_rows, es, block + blk.k);
    pack_part(args.v, s.kv_heads, L.kv_head_begin[j], hkv, L.kv_rows, es, block + blk.v);
  }
  times.pack = ms_since(t0);

  sync_point(xc, sync, B, times.wait);
  t0 = Clock::now();
  xc.alltoallv(B.qkv_send.data(), L.qkv_send.counts, L.qkv_send.displs, B.qkv_recv.data(),
               L.qkv_recv.counts, L.qkv_recv.displs, L.qkv_max_total);
  times.exchange_qkv = ms_since(t0);

  // Attention on my (padded) heads: the real rows of every block, then the padded query rows.
  t0 = Clock::now();
  B.qseg.resize(P);
  B.kseg.resize(P);
  B.vseg.resize(P);
  B.oseg.resize(P);
  std::int64_t q_total = 0, kv_total = 0, pad_rows = 0;
  for (int j = 0; j < P; ++j) {
    const std::byte* block = B.qkv_recv.data() + L.qkv_recv.displs[j];
    std::byte* oblock = B.out_send.data() + L.out_send.displs[j];
    float* lse = s.return_lse ? reinterpret_cast<float*>(oblock + L.out_block.lse[0]) : nullptr;
    B.qseg[j] = {block + blk.q[0], plan.q_lens[j], hq * s.head_dim, s.head_dim};
    B.kseg[j] = {block + blk.k, plan.kv_lens[j], hkv * s.head_dim, s.head_dim};
    B.vseg[j] = {block + blk.v, plan.kv_lens[j], hkv * s.head_dim, s.head_dim};
    B.oseg[j] = {oblock, hq * s.head_dim, s.head_dim, lse, hq};
    q_total += plan.q_lens[j];
    kv_total += plan.kv_lens[j];
    pad_rows += L.q_rows - plan.q_lens[j];
  }
  KernelProblem kp = kernel_problem(s, B, hq, me * hq, L.kv_head_begin[me], q_total, kv_total);
  run_kernel(kp, B);
  if (pad_rows > 0) {
    // The padded query rows: computed over all real keys (no causal mask: their output is dropped).
    B.pad_qseg.resize(P);
    B.pad_oseg.resize(P);
    for (int j = 0; j < P; ++j) {
      const std::int64_t r0 = plan.q_lens[j];
      const TokenSegment& q = B.qseg[j];
      const OutSegment& o = B.oseg[j];
      B.pad_qseg[j] = {static_cast<const std::byte*>(q.data) + r0 * hq * row, L.q_rows - r0,
                       q.token_stride, q.head_stride};
      B.pad_oseg[j] = {static_cast<std::byte*>(o.data) + r0 * hq * row, o.token_stride,
                       o.head_stride, o.lse ? o.lse + r0 * hq : nullptr, hq};
    }
    kp.q = B.pad_qseg;
    kp.out = B.pad_oseg;
    kp.q_total = pad_rows;
    kp.causal = false;
    run_kernel(kp, B);
  }
  times.attention = ms_since(t0);

  sync_point(xc, sync, B, times.wait);
  t0 = Clock::now();
  xc.alltoallv(B.out_send.data(), L.out_send.counts, L.out_send.displs, B.out_recv.data(),
               L.out_recv.counts, L.out_recv.displs, L.out_max_total);
  times.exchange_out = ms_since(t0);

  // Unpack: my real rows of every block, real heads only.
  t0 = Clock::now();
  const std::int64_t lse_ts = lse_token_stride(args, s);
  for (int j = 0; j < P; ++j) {
    const std::int64_t h0 = j * hq, n = std::clamp<std::int64_t>(s.q_heads - h0, 0, hq);
    if (n == 0) continue;
    const std::byte* block = B.out_recv.data() + L.out_recv.displs[j];
    copy_heads_out(block, hq * row, args.out, h0, n, es);
    if (args.lse) {
      const auto* lse = reinterpret_cast<const float*>(block + L.out_block.lse[0]);
      for (std::int64_t t = 0; t < args.out.tokens; ++t)
        std::memcpy(args.lse + t * lse_ts + h0, lse + t * hq, static_cast<std::size_t>(n) * sizeof(float));
    }
  }
  times.unpack = ms_since(t0);
}

}  // namespace uaa::detail
