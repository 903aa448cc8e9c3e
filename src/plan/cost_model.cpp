#include "plan/cost_model.h"

#include <algorithm>

#include "plan/strategy_layout.h"

namespace uaa::detail {
namespace {

std::int64_t peers(const ExchangeSide& side, int me) {
  std::int64_t n = 0;
  for (std::size_t j = 0; j < side.counts.size(); ++j)
    if (static_cast<int>(j) != me) n += side.counts[j];
  return n;
}

}  // namespace

double visible_pairs(std::int64_t first, std::int64_t n, std::int64_t q_total,
                     std::int64_t kv_total, bool causal) {
  return static_cast<double>(visible_key_pairs(first, n, q_total, kv_total, causal));
}

CostEstimate estimate_cost(const LayoutInput& in_all, Strategy strategy, bool causal) {
  CostEstimate c;
  const int P = static_cast<int>(in_all.q_lens.size());
  std::int64_t q_total = 0, kv_total = 0;
  for (std::int64_t x : in_all.q_lens) q_total += x;
  for (std::int64_t x : in_all.kv_lens) kv_total += x;
  const double per_pair = 4.0 * static_cast<double>(in_all.head_dim);
  const double all_pairs = visible_pairs(0, q_total, q_total, kv_total, causal);
  c.ranks.resize(P);
  std::int64_t first = 0;
  for (int r = 0; r < P; ++r) {
    LayoutInput in = in_all;
    in.rank = r;
    in.causal = causal;
    RankCost& rc = c.ranks[r];
    switch (strategy) {
      case Strategy::uaa: {
        const Layout L = compute_layout(in);
        const RankWork& w = L.work[r];
        for (int i = 0; i < w.pieces; ++i)
          rc.flops += per_pair * static_cast<double>(w.piece[i].heads.size()) *
                      visible_pairs(w.piece[i].rows.begin, w.piece[i].rows.size(), q_total,
                                    kv_total, causal);
        rc.sent = peers(L.qkv_send, r) + peers(L.out_send, r);
        rc.received = peers(L.qkv_recv, r) + peers(L.out_recv, r);
        break;
      }
      case Strategy::ulysses:
      case Strategy::ulysses_pad: {
        const PaddedLayout L = compute_padded_layout(in);
        const double pad_rows = static_cast<double>(L.pad_q_tokens);
        rc.flops = per_pair * static_cast<double>(L.q_heads_per_rank) *
                   (all_pairs + pad_rows * static_cast<double>(kv_total));
        rc.sent = peers(L.qkv_send, r) + peers(L.out_send, r);
        rc.received = peers(L.qkv_recv, r) + peers(L.out_recv, r);
        rc.self = L.qkv_send.counts[r] + L.out_send.counts[r];
        if (r == 0 && q_total > 0)
          c.pad_fraction = 1.0 - static_cast<double>(q_total) * static_cast<double>(in.q_heads) /
                                     (static_cast<double>(P * L.q_rows) *
                                      static_cast<double>(L.padded_q_heads));
        break;
      }
      case Strategy::allgather_kv: {
        const GatherLayout L = compute_gather_layout(in);
        rc.flops = per_pair * static_cast<double>(in.q_heads) *
                   visible_pairs(first, in.q_lens[r], q_total, kv_total, causal);
        rc.sent = peers(L.send, r);
        rc.received = peers(L.recv, r);
        break;
      }
    }
    first += in_all.q_lens[r];
    c.max_flops = std::max(c.max_flops, rc.flops);
    c.mean_flops += rc.flops / P;
    c.max_sent = std::max(c.max_sent, rc.sent);
    c.max_received = std::max(c.max_received, rc.received);
    c.max_moved = std::max(c.max_moved, rc.sent + rc.received + 2 * rc.self);
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

}  // namespace uaa::detail
