// Pure work-split math of a plan: which (query head, query row) pairs each rank computes. No MPI,
// no I/O: unit-tested on its own (tests/unit/layout_test.cpp). What moves where is compiled from this
// into programs (src/program/).
//
// Work split. The (query head, global query row) pairs, head-major, are cut into P contiguous ranges
// of about equal attention work (a row's work: the keys it sees in its document, plus one). Cuts fall
// on document starts and on multiples of kQueryRowGranule rows from a document's start, so when the heads divide by P every rank gets whole heads (plain Ulysses);
// otherwise a head's rows may be shared by two ranks (30 heads on 4 ranks: 7.5 heads each, not
// 8/8/7/7). A rank's range is at most three pieces: the tail rows of its first head, whole heads,
// the head rows of its last head. It receives the key/value heads its pieces read (a shared head's
// keys and values go to both ranks sharing it). Building the split costs O(P log S).
#pragma once

#include <array>
#include <cstdint>
#include <vector>

namespace uaa::detail {

struct HeadRange {
  std::int64_t begin = 0, end = 0;
  std::int64_t size() const { return end - begin; }
};

// Prefix sums: lens.size() + 1 entries, from 0 (rank or document starts from lengths).
inline std::vector<std::int64_t> prefix_sums(const std::vector<std::int64_t>& lens) {
  std::vector<std::int64_t> start(lens.size() + 1, 0);
  for (std::size_t j = 0; j < lens.size(); ++j) start[j + 1] = start[j] + lens[j];
  return start;
}

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
  std::int64_t window_left = -1, window_right = -1;  // plan.h's window (-1: no bound)
  // Document starts (prefix sums, documents + 1 entries, first 0, last the total) of the queries
  // and keys of one sequence; empty: one document.
  std::vector<std::int64_t> q_doc_start, kv_doc_start;
};

// (query, key) pairs that global query rows [first, first + n) may attend under plan.h's causal
// convention (all kv_total keys each when not causal). Exact: sums of heads x rows x keys can pass
// 2^63. The split weighs rows by it; the cost model counts FLOPs with it.
__int128 visible_key_pairs(std::int64_t first, std::int64_t n, std::int64_t q_total,
                           std::int64_t kv_total, bool causal);
// The same inside one document with a sliding window (plan.h: -1 is no bound on that side).
__int128 visible_key_pairs(std::int64_t first, std::int64_t n, std::int64_t q_total,
                           std::int64_t kv_total, bool causal, std::int64_t window_left,
                           std::int64_t window_right);

// The attention work along the query rows of one head (every head of a plan has the same rows):
// per row, the keys it sees inside its document plus one. Also where a head's rows may be cut:
// at a document start or a multiple of kQueryRowGranule rows from one (the kernels' query tiles
// are counted from each document's start, so such cuts keep every tile whole).
class RowWork {
 public:
  explicit RowWork(const WorkInput& in);
  std::int64_t rows() const { return q_start_.back(); }
  __int128 pairs(std::int64_t first, std::int64_t n) const {  // visible pairs of rows [first, +n)
    return n <= 0 ? 0 : pairs_prefix(first + n) - pairs_prefix(first);
  }
  __int128 prefix(std::int64_t n) const { return n + pairs_prefix(n); }  // work of rows [0, n)
  // The smallest cut c in [lo, hi] with prefix(c) >= target (hi if none); lo and hi must be cuts.
  std::int64_t cut(__int128 target, std::int64_t lo, std::int64_t hi) const;
  std::int64_t documents() const { return static_cast<std::int64_t>(q_start_.size()) - 1; }

 private:
  __int128 pairs_prefix(std::int64_t n) const;
  std::vector<std::int64_t> q_start_, kv_start_;
  std::vector<__int128> cum_;  // visible pairs of documents [0, d)
  bool causal_;
  std::int64_t left_, right_;
};

// The split described above, one entry per rank. Precondition: validated shape.
std::vector<RankWork> split_work(const WorkInput& in);

// Rows of `p` held by the rank whose tokens are [tokens.begin, tokens.end) (maybe empty).
inline RowRange rows_held(const WorkPiece& p, RowRange tokens) {
  return {p.rows.begin > tokens.begin ? p.rows.begin : tokens.begin,
          p.rows.end < tokens.end ? p.rows.end : tokens.end};
}

// The split's input from every rank's lengths and the shape (one document, no window).
WorkInput work_input(const std::vector<std::int64_t>& q_lens, const std::vector<std::int64_t>& kv_lens,
                     std::int64_t q_heads, std::int64_t kv_heads, bool causal);

}  // namespace uaa::detail
