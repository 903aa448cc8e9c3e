// Pure layout math of a plan: head partition, per-peer byte counts and displacements of both
// exchanges. No MPI, no I/O: unit-tested on its own (tests/unit/layout_test.cpp).
//
// The q/k/v exchange block that rank r sends to peer j (j != r) is
//   [Q: Sq[r] x nq(j) x D | K: Skv[r] x nkv(j) x D | V: same as K]
// with each part starting on a 64-byte boundary inside the block. Received blocks are ordered by
// source rank, i.e. by global token position. The output block that rank r sends to peer j is
//   [O: Sq[j] x nq(r) x D | lse: Sq[j] x nq(r) floats (only with return_lse)]
// The rank's own block never travels: the kernel reads the caller's input and writes the caller's
// output for it directly, so self counts are zero.
#pragma once

#include <cstdint>
#include <vector>

namespace uaa::detail {

inline constexpr std::int64_t kBlockAlign = 64;

inline std::int64_t align_up(std::int64_t n, std::int64_t a) { return (n + a - 1) / a * a; }

struct HeadRange {
  std::int64_t begin = 0, end = 0;
  std::int64_t size() const { return end - begin; }
};

// Query heads of `rank`: contiguous, sizes differ by at most one, lower ranks get the extra heads.
HeadRange q_heads_of(std::int64_t q_heads, int ranks, int rank);
// Key/value heads that `rank`'s query heads read (empty when it owns no query heads).
HeadRange kv_heads_of(std::int64_t q_heads, std::int64_t kv_heads, int ranks, int rank);

// Offsets of the parts inside one q/k/v block, in bytes from the block start.
struct QkvBlock {
  std::int64_t q = 0, k = 0, v = 0, bytes = 0;
};
QkvBlock qkv_block(std::int64_t q_tokens, std::int64_t kv_tokens, std::int64_t q_heads,
                   std::int64_t kv_heads, std::int64_t row_bytes);

// Offsets inside one output block, in bytes from the block start.
struct OutBlock {
  std::int64_t lse = 0, bytes = 0;  // O starts at 0
};
OutBlock out_block(std::int64_t tokens, std::int64_t heads, std::int64_t row_bytes, bool with_lse);

// One side (send or receive) of one exchange: bytes per peer and where each peer's block starts.
struct ExchangeSide {
  std::vector<std::int64_t> counts, displs;
  std::int64_t total = 0;  // buffer bytes needed
};

struct LayoutInput {
  std::vector<std::int64_t> q_lens, kv_lens;  // one per rank
  std::int64_t q_heads = 0, kv_heads = 0, head_dim = 0, elem_bytes = 0;
  bool with_lse = false;
  int rank = 0;
};

struct Layout {
  int ranks = 0, rank = 0;
  std::vector<std::int64_t> q_start, kv_start;  // global offset of each rank's tokens (size ranks+1)
  std::vector<HeadRange> q_heads, kv_heads;     // per rank
  ExchangeSide qkv_send, qkv_recv, out_send, out_recv;
  std::vector<QkvBlock> qkv_send_block, qkv_recv_block;  // per peer
  std::vector<OutBlock> out_send_block, out_recv_block;  // per peer
  // Largest send or receive buffer of *any* rank in each exchange: the same number on every rank,
  // handed to Communicator::alltoallv (see there).
  std::int64_t qkv_max_total = 0, out_max_total = 0;
};

// Precondition: the input was validated (non-negative lengths, heads dividing, sizes matching).
Layout compute_layout(const LayoutInput& in);

// Buffer totals of one rank without building its whole layout (O(ranks), no allocation).
struct ExchangeTotals {
  std::int64_t qkv_send = 0, qkv_recv = 0, out_send = 0, out_recv = 0;
};
ExchangeTotals exchange_totals(const LayoutInput& in, int rank);

}  // namespace uaa::detail
