#include "plan/cost_model.h"

#include <algorithm>

namespace uaa::detail {
namespace {

// uaa (compile_uaa_forward): rank r sends peer j, of each of j's pieces, the rows r holds, and its
// k/v tokens of j's kv heads; it returns to peer j the output (and lse) rows of its own pieces that j
// holds. Summed over all peers this is closed-form, because the pieces of all ranks tile every
// (head, row) pair exactly once:
//   own(r)    = (head, row) pairs of r's pieces whose row r holds itself (they never travel)
//   mine(r)   = (head, row) pairs of r's pieces
//   q sent    = (Hq * |tokens(r)| - own(r)) x row      q received = (mine(r) - own(r)) x row
//   kv sent   = 2 Skv(r) (sum_j nkv(j) - nkv(r)) x row  kv received = 2 nkv(r) (Skv - Skv(r)) x row
//   out sent  = (mine(r) - own(r)) x (row + lse)     out received = (Hq |tokens(r)| - own(r)) x (row + lse)
void uaa_costs(const Geometry& g, const std::vector<RankWork>& work, CostEstimate& c) {
  const int P = static_cast<int>(g.q_lens.size());
  const std::vector<std::int64_t> q_start = prefix_sums(g.q_lens);
  std::int64_t kv_total = 0, kv_heads_sum = 0;
  for (std::int64_t x : g.kv_lens) kv_total += x;
  for (const RankWork& w : work) kv_heads_sum += w.kv_heads.size();
  const std::int64_t row = g.head_dim * g.elem_bytes;
  const std::int64_t out_row = row + (g.with_lse ? static_cast<std::int64_t>(sizeof(float)) : 0);
  const double per_pair = 4.0 * static_cast<double>(g.head_dim);
  const RowWork row_work(work_input(g));  // visible pairs inside documents and windows
  for (int r = 0; r < P; ++r) {
    const RankWork& w = work[r];
    const RowRange tokens{q_start[r], q_start[r + 1]};
    std::int64_t own = 0, mine = 0;
    RankCost& rc = c.ranks[r];
    for (int i = 0; i < w.pieces; ++i) {
      const WorkPiece& p = w.piece[i];
      own += rows_held(p, tokens).size() * p.heads.size();
      mine += p.rows.size() * p.heads.size();
      rc.flops += per_pair * static_cast<double>(p.heads.size()) *
                  static_cast<double>(row_work.pairs(p.rows.begin, p.rows.size()));
    }
    const std::int64_t held = g.q_heads * tokens.size();  // (head, row) pairs of r's tokens
    const std::int64_t nkv = w.kv_heads.size();
    rc.sent = (held - own) * row + 2 * g.kv_lens[r] * (kv_heads_sum - nkv) * row +
              (mine - own) * out_row;
    rc.received = (mine - own) * row + 2 * nkv * (kv_total - g.kv_lens[r]) * row +
                  (held - own) * out_row;
  }
}

// ulysses / ulysses_pad (compile_padded_forward): every rank sends every rank, itself included, a
// block of [Q: q_rows x hq | K: kv_rows x hkv | V: same] and gets back [O: q_rows x hq | lse].
void padded_costs(const Geometry& g, CostEstimate& c) {
  const auto P = static_cast<std::int64_t>(g.q_lens.size());
  auto padded_rows = [&](const std::vector<std::int64_t>& lens, std::int64_t* total) {
    std::int64_t longest = 0;
    *total = 0;
    for (std::int64_t x : lens) {
      *total += x;
      longest = std::max(longest, x);
    }
    return std::max((*total + P - 1) / P, longest);
  };
  std::int64_t q_total = 0, kv_total = 0;
  const std::int64_t q_rows = padded_rows(g.q_lens, &q_total);
  const std::int64_t kv_rows = padded_rows(g.kv_lens, &kv_total);
  const std::int64_t hq = (g.q_heads + P - 1) / P, group = g.q_heads / g.kv_heads;
  std::int64_t hkv = 0;  // kv heads per rank: the most any rank's hq query heads read
  for (std::int64_t r = 0; r < P; ++r) {
    const std::int64_t first = r * hq, last = first + hq - 1;
    hkv = std::max(hkv, last / group - first / group + 1);
  }
  const std::int64_t row = g.head_dim * g.elem_bytes;
  const std::int64_t lse_row = g.with_lse ? static_cast<std::int64_t>(sizeof(float)) : 0;
  const std::int64_t block = (q_rows * hq + 2 * kv_rows * hkv) * row + q_rows * hq * (row + lse_row);
  const double pad_rows = static_cast<double>(P * q_rows - q_total);
  const double flops = 4.0 * static_cast<double>(g.head_dim) * static_cast<double>(hq) *
                       (visible_pairs(0, q_total, q_total, kv_total, g.causal) +
                        pad_rows * static_cast<double>(kv_total));
  for (RankCost& rc : c.ranks) {
    rc.flops = flops;
    rc.sent = rc.received = (P - 1) * block;
    rc.self = block;
  }
  if (q_total > 0)
    c.pad_fraction = 1.0 - static_cast<double>(q_total) * static_cast<double>(g.q_heads) /
                               (static_cast<double>(P * q_rows) * static_cast<double>(P * hq));
}

// allgather_kv (compile_allgather_kv_forward): rank r sends its K and V (all kv heads) to every
// peer and attends its own query rows, all heads; nothing goes back.
void allgather_costs(const Geometry& g, CostEstimate& c) {
  const auto P = static_cast<std::int64_t>(g.q_lens.size());
  std::int64_t q_total = 0, kv_total = 0;
  for (std::int64_t x : g.q_lens) q_total += x;
  for (std::int64_t x : g.kv_lens) kv_total += x;
  const std::int64_t kv_row = 2 * g.kv_heads * g.head_dim * g.elem_bytes;  // K and V of one token
  const double per_row_head = 4.0 * static_cast<double>(g.head_dim) * static_cast<double>(g.q_heads);
  std::int64_t first = 0;
  for (std::int64_t r = 0; r < P; ++r) {
    RankCost& rc = c.ranks[static_cast<std::size_t>(r)];
    rc.flops = per_row_head * visible_pairs(first, g.q_lens[r], q_total, kv_total, g.causal);
    rc.sent = (P - 1) * g.kv_lens[r] * kv_row;
    rc.received = (kv_total - g.kv_lens[r]) * kv_row;
    first += g.q_lens[r];
  }
}

}  // namespace

double visible_pairs(std::int64_t first, std::int64_t n, std::int64_t q_total,
                     std::int64_t kv_total, bool causal) {
  return static_cast<double>(visible_key_pairs(first, n, q_total, kv_total, causal));
}

CostEstimate estimate_cost(const Geometry& g, Strategy strategy) {
  if (strategy != Strategy::uaa) return estimate_cost(g, strategy, {});
  return estimate_cost(g, strategy, split_work(work_input(g)));
}

CostEstimate estimate_cost(const Geometry& g, Strategy strategy, const std::vector<RankWork>& work) {
  CostEstimate c;
  const int P = static_cast<int>(g.q_lens.size());
  c.ranks.resize(static_cast<std::size_t>(P));
  if (P == 0) return c;
  switch (strategy) {
    case Strategy::uaa:
      uaa_costs(g, work, c);
      break;
    case Strategy::ulysses:
    case Strategy::ulysses_pad:
      padded_costs(g, c);
      break;
    case Strategy::allgather_kv:
      allgather_costs(g, c);
      break;
  }
  for (const RankCost& rc : c.ranks) {
    c.max_flops = std::max(c.max_flops, rc.flops);
    c.mean_flops += rc.flops / P;
    c.max_sent = std::max(c.max_sent, rc.sent);
    c.max_received = std::max(c.max_received, rc.received);
    c.max_moved = std::max(c.max_moved, rc.moved());
  }
  c.imbalance = c.mean_flops > 0 ? c.max_flops / c.mean_flops : 1.0;
  return c;
}

double modelled_compute_ms(const CostEstimate& c, const CostRates& r) {
  return r.flops_per_s > 0 ? 1e3 * c.max_flops / r.flops_per_s : 0;
}
double modelled_exchange_ms(const CostEstimate& c, const CostRates& r) {
  return r.bytes_per_s > 0 ? 1e3 * static_cast<double>(c.max_moved) / r.bytes_per_s : 0;
}
double modelled_ms(const CostEstimate& c, const CostRates& r) {
  return modelled_compute_ms(c, r) + modelled_exchange_ms(c, r);
}
double modelled_rank_ms(const RankCost& rc, const CostRates& r) {
  return (r.flops_per_s > 0 ? 1e3 * rc.flops / r.flops_per_s : 0) +
         (r.bytes_per_s > 0 ? 1e3 * static_cast<double>(rc.moved()) / r.bytes_per_s : 0);
}

int busiest_rank(const CostEstimate& c, const CostRates& rates) {
  int best = 0;
  double best_ms = -1;
  for (std::size_t r = 0; r < c.ranks.size(); ++r) {
    const double ms = modelled_rank_ms(c.ranks[r], rates);
    if (ms > best_ms) {
      best_ms = ms;
      best = static_cast<int>(r);
    }
  }
  return best;
}

}  // namespace uaa::detail
