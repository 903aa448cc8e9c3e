#include "plan/layout.h"

#include <algorithm>

#include "kernels/kernel.h"

namespace uaa::detail {
namespace {

using Wide = __int128;  // work sums: heads x rows x keys can pass 2^63 before the division by P

// Work of global query rows [0, n): the sum over rows of (keys the row sees + 1). The +1 keeps
// rows that see no key from being free (they still write a row) and every weight positive.
Wide row_work_prefix(std::int64_t n, const WorkInput& in) {
  if (n <= 0) return 0;
  return n + visible_key_pairs(0, n, in.q_total, in.kv_total, in.causal);
}

struct Cut {
  std::int64_t head = 0, row = 0;
};

}  // namespace

Wide visible_key_pairs(std::int64_t first, std::int64_t n, std::int64_t q_total,
                       std::int64_t kv_total, bool causal) {
  if (n <= 0 || kv_total <= 0) return 0;
  if (!causal) return static_cast<Wide>(n) * kv_total;
  // Row i sees clamp(i + c, 0, kv_total) keys: a clipped arithmetic series.
  const std::int64_t c = kv_total - q_total + 1;
  const std::int64_t lo = std::max(first, 1 - c);               // first row that sees any key
  const std::int64_t hi = std::min(first + n, kv_total - c);    // rows below see fewer than all
  Wide pairs = 0;
  if (hi > lo) pairs += static_cast<Wide>(lo + c + hi - 1 + c) * (hi - lo) / 2;
  const std::int64_t full = std::max(first, kv_total - c);      // rows from here see all keys
  if (first + n > full) pairs += static_cast<Wide>(first + n - full) * kv_total;
  return pairs;
}

WorkInput work_input(const std::vector<std::int64_t>& q_lens, const std::vector<std::int64_t>& kv_lens,
                     std::int64_t q_heads, std::int64_t kv_heads, bool causal) {
  WorkInput w;
  w.q_heads = q_heads;
  w.kv_heads = kv_heads;
  for (std::int64_t x : q_lens) w.q_total += x;
  for (std::int64_t x : kv_lens) w.kv_total += x;
  w.causal = causal;
  w.ranks = static_cast<int>(q_lens.size());
  return w;
}

std::vector<RankWork> split_work(const WorkInput& in) {
  const int P = in.ranks;
  const std::int64_t H = in.q_heads, S = in.q_total, g = kQueryRowGranule;
  std::vector<Cut> cut(P + 1);
  if (S > 0 && H > 0) {
    cut[P] = {H, 0};
    const Wide per_head = row_work_prefix(S, in), total = per_head * H;
    const std::int64_t granules = (S + g - 1) / g;
    for (int r = 1; r < P; ++r) {
      const Wide target = total * r / P;
      const auto h = static_cast<std::int64_t>(target / per_head);
      const Wide rest = target - per_head * h;
      if (h >= H) {
        cut[r] = {H, 0};
        continue;
      }
      // The first granule boundary at or past the target: exact head boundaries stay exact.
      std::int64_t lo = 0, hi = granules;
      while (lo < hi) {
        const std::int64_t mid = lo + (hi - lo) / 2;
        if (row_work_prefix(std::min(mid * g, S), in) >= rest) hi = mid;
        else lo = mid + 1;
      }
      const std::int64_t row = std::min(lo * g, S);
      cut[r] = row == S ? Cut{h + 1, 0} : Cut{h, row};
    }
  }
  std::vector<RankWork> work(P);
  const std::int64_t group = in.kv_heads > 0 ? H / in.kv_heads : 1;
  for (int r = 0; r < P; ++r) {
    RankWork& w = work[r];
    const Cut a = cut[r], b = cut[r + 1];
    w.first_head = a.head;
    w.first_row = a.row;
    w.end_head = b.head;
    w.end_row = b.row;
    auto add = [&](std::int64_t h0, std::int64_t h1, std::int64_t r0, std::int64_t r1) {
      w.piece[w.pieces++] = WorkPiece{{h0, h1}, {r0, r1}};
    };
    if (a.head == b.head) {
      if (b.row > a.row) add(a.head, a.head + 1, a.row, b.row);
    } else {
      std::int64_t whole = a.head;
      if (a.row > 0) add(a.head, ++whole, a.row, S);
      if (b.head > whole) add(whole, b.head, 0, S);
      if (b.row > 0) add(b.head, b.head + 1, 0, b.row);
    }
    if (w.pieces > 0) {
      w.q_heads = {w.piece[0].heads.begin, w.piece[w.pieces - 1].heads.end};
      w.kv_heads = {w.q_heads.begin / group, (w.q_heads.end - 1) / group + 1};
    }
  }
  return work;
}

}  // namespace uaa::detail
