// Pure layout math of a plan: the split of attention work over ranks, per-peer byte counts and
// displacements of both exchanges. No MPI, no I/O: unit-tested on its own (tests/unit/layout_test.cpp).
//
// Work split. The (query head, global query row) pairs, head-major, are cut into P contiguous ranges
// of about equal attention work (a row's work: the keys it sees, plus one). Cuts fall on multiples of
// kQueryRowGranule rows, so when the heads divide by P every rank gets whole heads (plain Ulysses);
// otherwise a head's rows may be shared by two ranks (30 heads on 4 ranks: 7.5 heads each, not
// 8/8/7/7). A rank's range is at most three pieces: the tail rows of its first head, whole heads,
// the head rows of its last head. It receives the key/value heads its pieces read (a shared head's
// keys and values go to both ranks sharing it).
//
// The q/k/v exchange block that rank r sends to peer j (j != r) is
//   [Q piece 0 | Q piece 1 | Q piece 2 | K: Skv[r] x nkv(j) x D | V: same as K]
// where Q piece i holds r's tokens that fall in the rows of j's piece i, [rows][piece heads][D];
// each part starts on a 64-byte boundary. Received blocks are ordered by source rank, i.e. by global
// token position. The output block that rank r sends to peer j is
//   [O piece 0 | O piece 1 | O piece 2 | lse piece 0 | lse piece 1 | lse piece 2]
// over j's tokens in r's pieces (lse only with return_lse). The rank's own block never travels: the
// kernel reads the caller's input and writes the caller's output for it directly.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

namespace uaa::detail {

inline constexpr std::int64_t kBlockAlign = 64;

inline std::int64_t align_up(std::int64_t n, std::int64_t a) { return (n + a - 1) / a * a; }

struct HeadRange {
  std::int64_t begin = 0, end = 0;
  std::int64_t size() const { return end - begin; }
};

// Global query rows [begin, end).
struct RowRange {
  std::int64_t begin = 0, end = 0;
  std::int64_t size() const { return end > begin ? end - begin : 0; }
};

// Query heads `heads` over global query rows `rows`.
struct WorkPiece {
  HeadRange heads;
  RowRange rows;
};

inline constexpr int kMaxPieces = 3;

// One rank's share of the attention work.
struct RankWork {
  // [(first_head, first_row), (end_head, end_row)) in head-major (head, row) order.
  std::int64_t first_head = 0, first_row = 0, end_head = 0, end_row = 0;
  int pieces = 0;
  std::array<WorkPiece, kMaxPieces> piece{};
  HeadRange q_heads;   // heads of which this rank computes some rows
  HeadRange kv_heads;  // key/value heads its pieces read (received whole)
};

struct WorkInput {
  std::int64_t q_heads = 0, kv_heads = 0, q_total = 0, kv_total = 0;
  bool causal = false;
  int ranks = 1;
};

// (query, key) pairs that global query rows [first, first + n) may attend under plan.h's causal
// convention (all kv_total keys each when not causal). Exact: sums of heads x rows x keys can pass
// 2^63. The split weighs rows by it; the cost model counts FLOPs with it.
__int128 visible_key_pairs(std::int64_t first, std::int64_t n, std::int64_t q_total,
                           std::int64_t kv_total, bool causal);

// The split described above, one entry per rank. Precondition: validated shape.
std::vector<RankWork> split_work(const WorkInput& in);

// Rows of `p` held by the rank whose tokens are [tokens.begin, tokens.end) (maybe empty).
inline RowRange rows_held(const WorkPiece& p, RowRange tokens) {
  return {p.rows.begin > tokens.begin ? p.rows.begin : tokens.begin,
          p.rows.end < tokens.end ? p.rows.end : tokens.end};
}

// One piece: `q_heads` heads over rows [0, rows), reading `kv_heads` key/value heads (the blocks of
// the comparison strategies, which split whole heads; no piece when q_heads is 0).
RankWork uniform_work(std::int64_t q_heads, std::int64_t rows, std::int64_t kv_heads);

// Offsets of the parts inside one q/k/v block, in bytes from the block start.
struct QkvBlock {
  std::array<std::int64_t, kMaxPieces> q{};
  std::int64_t k = 0, v = 0, bytes = 0;
};
// The block a rank holding query tokens `tokens` and `kv_tokens` keys sends to a rank doing `work`.
QkvBlock qkv_block(RowRange tokens, std::int64_t kv_tokens, const RankWork& work,
                   std::int64_t row_bytes);

// Offsets inside one output block, in bytes from the block start.
struct OutBlock {
  std::array<std::int64_t, kMaxPieces> o{}, lse{};
  std::int64_t bytes = 0;
};
// The block a rank doing `work` returns to the rank holding query tokens `tokens`.
OutBlock out_block(RowRange tokens, const RankWork& work, std::int64_t row_bytes, bool with_lse);

// One side (send or receive) of one exchange: bytes per peer and where each peer's block starts.
struct ExchangeSide {
  std::vector<std::int64_t> counts, displs;
  std::int64_t total = 0;  // buffer bytes needed
};

struct LayoutInput {
  std::vector<std::int64_t> q_lens, kv_lens;  // one per rank
  std::int64_t q_heads = 0, kv_heads = 0, head_dim = 0, elem_bytes = 0;
  bool with_lse = false;
  bool causal = false;  // weighs rows by the keys they see in the work split
  int rank = 0;
};

struct Layout {
  int ranks = 0, rank = 0;
  std::vector<std::int64_t> q_start, kv_start;  // global offset of each rank's tokens (size ranks+1)
  std::vector<RankWork> work;                   // per rank
  RowRange q_tokens(int r) const { return {q_start[r], q_start[r + 1]}; }
  ExchangeSide qkv_send, qkv_recv, out_send, out_recv;
  std::vector<QkvBlock> qkv_send_block, qkv_recv_block;  // per peer
  std::vector<OutBlock> out_send_block, out_recv_block;  // per peer
  // Where the block peer j returns to this rank starts in j's out_send buffer (for transports that
  // read peers' memory instead of sending messages).
  std::vector<std::int64_t> out_displ_at_peer;
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
ExchangeTotals exchange_totals(const LayoutInput& in, const std::vector<std::int64_t>& q_start,
                               const std::vector<RankWork>& work, int rank);

WorkInput work_input(const LayoutInput& in);

}  // namespace uaa::detail
