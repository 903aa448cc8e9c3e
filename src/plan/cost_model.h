// A cost model of one forward() call per strategy, for scales beyond the machine at hand (`uaa plan`)
// and to check the benchmark against. Pure: the work split the plans use (split_work), no MPI, and
// no program or plan per rank.
//
// Per rank: attention FLOPs (4 * D per visible (query, key) pair per head, causal pairs counted
// exactly; padded query rows and heads count, padded key rows do not, as ulysses_pad runs them),
// bytes sent to and received from other ranks, and bytes that go through the exchange to the rank
// itself (ulysses, ulysses_pad). The bytes are those of the rank's compiled program
// (src/program/program.h: Program::bytes_sent() / bytes_received(), i.e. Plan::bytes_sent() /
// bytes_received()), counted in closed form: O(1) per rank from the split and prefix sums of the
// lengths, so all P ranks cost O(P log S) (the split) + O(P), not the O(P^2) of building every
// rank's program. Modelled time = max over ranks of FLOPs / compute rate + max over ranks of
// (sent + received + 2 * self) bytes / data-movement rate, the rates being what the benchmark
// measured (uaa's attention FLOP/s and its pack + exchanges + unpack bytes/s) or given.
#pragma once

#include <cstdint>
#include <vector>

#include "plan/layout.h"
#include "program/program.h"
#include "uaa/plan.h"

namespace uaa::detail {

struct RankCost {
  double flops = 0;
  std::int64_t sent = 0, received = 0, self = 0;  // bytes
  std::int64_t moved() const { return sent + received + 2 * self; }
};

struct CostEstimate {
  std::vector<RankCost> ranks;
  double max_flops = 0, mean_flops = 0;
  double imbalance = 1;  // max / mean FLOPs over ranks (1 when no rank works)
  std::int64_t max_sent = 0, max_received = 0;
  std::int64_t max_moved = 0;  // max over ranks of sent + received + 2 * self
  // ulysses_pad: share of padding in its (tokens x heads) work grid, 1 - S*H / (P*Sp*Hp); else 0.
  double pad_fraction = 0;
};

struct CostRates {
  double flops_per_s = 0;  // attention compute of one rank
  double bytes_per_s = 0;  // data movement (pack + exchanges + unpack) per byte sent + received
};

// Every rank of `g` (one entry per rank in g.q_lens). O(P log S) time, O(P) memory.
CostEstimate estimate_cost(const Geometry& g, Strategy strategy);
// The same when the uaa split is at hand already (work: split_work of g, one entry per rank).
CostEstimate estimate_cost(const Geometry& g, Strategy strategy, const std::vector<RankWork>& work);

double modelled_ms(const CostEstimate& c, const CostRates& rates);
double modelled_compute_ms(const CostEstimate& c, const CostRates& rates);
double modelled_exchange_ms(const CostEstimate& c, const CostRates& rates);
// One rank's modelled time (its FLOPs / compute rate + its moved bytes / data-movement rate).
double modelled_rank_ms(const RankCost& rank, const CostRates& rates);
// The rank with the largest modelled time (the lowest such rank; 0 when there are none).
int busiest_rank(const CostEstimate& c, const CostRates& rates);

// Visible (query, key) pairs for global query rows [first, first + n) (causal convention of plan.h).
double visible_pairs(std::int64_t first, std::int64_t n, std::int64_t q_total,
                     std::int64_t kv_total, bool causal);

}  // namespace uaa::detail
