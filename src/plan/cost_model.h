// A cost model of one forward() call per strategy, for scales beyond the machine at hand (`uaa plan`)
// and to check the benchmark against. Pure: the same layout code the plans use, no MPI.
//
// Per rank: attention FLOPs (4 * D per visible (query, key) pair per head, causal pairs counted
// exactly; padded query rows and heads count, padded key rows do not, as ulysses_pad runs them),
// bytes sent to and received from other ranks, and bytes that go through the exchange to the rank
// itself (ulysses, ulysses_pad). Modelled time = max over ranks of FLOPs / compute rate
// + max over ranks of (sent + received + 2 * self) bytes / data-movement rate, the rates being what
// the benchmark measured (uaa's attention FLOP/s and its pack + exchanges + unpack bytes/s) or given.
#pragma once

#include <cstdint>
#include <vector>

#include "plan/layout.h"
#include "uaa/plan.h"

namespace uaa::detail {

struct RankCost {
  double flops = 0;
  std::int64_t sent = 0, received = 0, self = 0;  // bytes
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

// `in.rank` is ignored; every rank is modelled.
CostEstimate estimate_cost(const LayoutInput& in, Strategy strategy, bool causal);
double modelled_ms(const CostEstimate& c, const CostRates& rates);
double modelled_compute_ms(const CostEstimate& c, const CostRates& rates);
double modelled_exchange_ms(const CostEstimate& c, const CostRates& rates);

// Visible (query, key) pairs for global query rows [first, first + n) (causal convention of plan.h).
double visible_pairs(std::int64_t first, std::int64_t n, std::int64_t q_total,
                     std::int64_t kv_total, bool causal);

}  // namespace uaa::detail
