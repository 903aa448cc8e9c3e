// Pure layout math of the comparison strategies (uaa's own is in layout.h): the equal-count blocks of
// plain and padded Ulysses, and the all-gather of keys and values. No MPI, no I/O: unit-tested in
// tests/unit/strategy_layout_test.cpp.
//
// ulysses / ulysses_pad. Every rank's shard is padded to `q_rows` (key/value: `kv_rows`) tokens and
// the query heads to P * q_heads_per_rank; rank r computes the padded query heads
// [r * q_heads_per_rank, (r+1) * q_heads_per_rank) and holds the padded key/value heads
// [kv_head_begin[r], + kv_heads_per_rank) (heads past the real ones are zero data). The block that
// every rank sends to every rank, itself included, is
//   [Q: q_rows x q_heads_per_rank x D | K: kv_rows x kv_heads_per_rank x D | V: same as K]
// real tokens first, then zero rows; the output block is [O: q_rows x q_heads_per_rank x D | lse].
// With no padding (every shard holds total/P tokens, heads divide by P) this is plain Ulysses.
//
// allgather_kv. Rank r sends [K: Skv[r] x Hkv x D | V: same] (one block, the same for every peer)
// and receives every peer's; nothing goes back. Self counts are zero (its own K/V are read in place).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "plan/layout.h"

namespace uaa::detail {

struct PaddedLayout {
  int ranks = 0, rank = 0;
  std::int64_t q_rows = 0, kv_rows = 0;  // tokens per block after padding
  std::int64_t q_heads_per_rank = 0, kv_heads_per_rank = 0;
  std::int64_t padded_q_heads = 0;       // ranks * q_heads_per_rank
  std::vector<std::int64_t> kv_head_begin;  // per rank, first padded kv head it holds
  QkvBlock qkv_block;                    // the same for every pair of ranks
  OutBlock out_block;
  ExchangeSide qkv_send, qkv_recv, out_send, out_recv;  // equal counts, self included
  std::int64_t qkv_max_total = 0, out_max_total = 0;
  std::int64_t pad_q_tokens = 0, pad_kv_tokens = 0;  // padding rows over all ranks
};

// Precondition: validated input (as compute_layout). Pure.
PaddedLayout compute_padded_layout(const LayoutInput& in);

struct GatherLayout {
  int ranks = 0, rank = 0;
  QkvBlock send_block;                    // this rank's K/V block (q part empty)
  std::vector<QkvBlock> recv_block;       // per peer
  ExchangeSide send, recv;                // send displs all 0: one block to every peer
  std::int64_t max_total = 0;
};

GatherLayout compute_gather_layout(const LayoutInput& in);

// Why `ulysses` cannot run this layout ("" if it can): the totals must divide by the rank count,
// every rank must hold total/P tokens, and q_heads must divide by the rank count.
std::string ulysses_problem(const std::vector<std::int64_t>& q_lens,
                            const std::vector<std::int64_t>& kv_lens, std::int64_t q_heads);

}  // namespace uaa::detail
