#include "plan/layout.h"

#include <algorithm>

#include "kernels/kernel.h"

namespace uaa::detail {
namespace {

using Wide = __int128;  // work sums: heads x rows x keys can pass 2^63 before the division by P

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

Wide visible_key_pairs(std::int64_t first, std::int64_t n, std::int64_t q_total,
                       std::int64_t kv_total, bool causal, std::int64_t window_left,
                       std::int64_t window_right) {
  if (n <= 0 || kv_total <= 0) return 0;
  if (window_left < 0 && (window_right < 0 || causal))
    return visible_key_pairs(first, n, q_total, kv_total, causal);
  // Row i sees keys [max(i' - L, 0), min(i' + R, kv_total - 1)], i' = i + c: the count is a
  // piecewise linear function of i whose pieces end where a bound meets 0 or kv_total - 1.
  const std::int64_t unbounded = q_total + kv_total + 1;  // reaches every key from every row
  const std::int64_t L = window_left < 0 ? unbounded : window_left;
  const std::int64_t R = causal ? 0 : window_right < 0 ? unbounded : window_right;
  const std::int64_t c = kv_total - q_total, last = kv_total - 1;
  auto count = [&](std::int64_t i) -> Wide {
    const std::int64_t hi = std::min(i + c + R, last), lo = std::max(i + c - L, std::int64_t{0});
    return hi >= lo ? hi - lo + 1 : 0;
  };
  std::int64_t cuts[] = {first, first + n, last - R - c, L - c, -R - c, kv_total + L - c};
  for (std::int64_t& x : cuts) x = std::clamp(x, first, first + n);
  std::sort(std::begin(cuts), std::end(cuts));
  Wide pairs = 0;
  for (int k = 0; k + 1 < 6; ++k) {  // linear on each [cuts[k], cuts[k + 1]): a trapezoid
    const std::int64_t a = cuts[k], b = cuts[k + 1];
    if (b > a) pairs += (count(a) + count(b - 1)) * (b - a) / 2;
  }
  return pairs;
}

RowWork::RowWork(const WorkInput& in)
    : q_start_(in.q_doc_start), kv_start_(in.kv_doc_start), causal_(in.causal),
      left_(in.window_left), right_(in.window_right) {
  if (q_start_.empty()) {
    q_start_ = {0, in.q_total};
    kv_start_ = {0, in.kv_total};
  }
  cum_.assign(q_start_.size(), 0);
  for (std::size_t d = 0; d + 1 < q_start_.size(); ++d) {
    const std::int64_t nq = q_start_[d + 1] - q_start_[d], nk = kv_start_[d + 1] - kv_start_[d];
    cum_[d + 1] = cum_[d] + visible_key_pairs(0, nq, nq, nk, causal_, left_, right_);
  }
}

Wide RowWork::pairs_prefix(std::int64_t n) const {
  if (n <= 0) return 0;
  // The last document starting at or before n (n inside it, or n its end).
  const auto it = std::upper_bound(q_start_.begin(), q_start_.end() - 1, n);
  const std::size_t d = static_cast<std::size_t>(it - q_start_.begin()) - 1;
  const std::int64_t nq = q_start_[d + 1] - q_start_[d], nk = kv_start_[d + 1] - kv_start_[d];
  return cum_[d] + visible_key_pairs(0, std::min(n - q_start_[d], nq), nq, nk, causal_, left_, right_);
}

std::int64_t RowWork::cut(Wide target, std::int64_t lo, std::int64_t hi) const {
  if (prefix(lo) >= target) return lo;
  // The first document whose end reaches the target, then the first granule inside it.
  const std::size_t docs = q_start_.size() - 1;
  std::size_t a = 0, b = docs;
  while (a < b) {
    const std::size_t mid = (a + b) / 2;
    if (prefix(q_start_[mid + 1]) >= target) b = mid;
    else a = mid + 1;
  }
  if (a == docs) return hi;
  const std::int64_t start = q_start_[a], len = q_start_[a + 1] - start, g = kQueryRowGranule;
  std::int64_t k0 = 0, k1 = (len + g - 1) / g;
  while (k0 < k1) {
    const std::int64_t mid = (k0 + k1) / 2;
    if (prefix(start + std::min(mid * g, len)) >= target) k1 = mid;
    else k0 = mid + 1;
  }
  return std::clamp(start + std::min(k0 * g, len), lo, hi);
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
  const std::int64_t H = in.q_heads, S = in.q_total;
  std::vector<Cut> cut(P + 1);
  if (S > 0 && H > 0) {
    const RowWork rows(in);
    cut[P] = {H, 0};
    const Wide per_head = rows.prefix(S), total = per_head * H;
    for (int r = 1; r < P; ++r) {
      const Wide target = total * r / P;
      const auto h = static_cast<std::int64_t>(target / per_head);
      const Wide rest = target - per_head * h;
      if (h >= H) {
        cut[r] = {H, 0};
        continue;
      }
      // The first allowed cut at or past the target: exact head boundaries stay exact.
      const std::int64_t row = rows.cut(rest, 0, S);
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
