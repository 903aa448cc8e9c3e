// `uaa plan`: the cost model (src/plan/cost_model.h) of every strategy at any rank count, without
// MPI: per-rank FLOPs, bytes sent and received, load imbalance and a modelled time from rates that
// `uaa bench` measured (or given: --compute-gflops, --exchange-gbps).
#include <cstdio>
#include <string>

#include "commands.h"
#include "plan/cost_model.h"
#include "plan/strategy_layout.h"
#include "sweep.h"

namespace uaa::cli {
namespace {

// Measured on the 2-core development machine, 2 ranks x 1 thread, fp32 (docs/PERFORMANCE.md):
// uaa's attention FLOP/s per rank and its data-movement bytes (sent + received) per second.
constexpr double kDefaultGflops = 93.6;
constexpr double kDefaultGbps = 4.6;

}  // namespace

int plan_main(int argc, char** argv) {
  using namespace uaa::bench;
  try {
    const SweepOptions o = parse_sweep(argc, argv, true);
    if (o.help) {
      std::fputs(kPlanUsage, stdout);
      return 0;
    }
    const detail::CostRates rates{(o.compute_gflops > 0 ? o.compute_gflops : kDefaultGflops) * 1e9,
                                  (o.exchange_gbps > 0 ? o.exchange_gbps : kDefaultGbps) * 1e9};
    if (!o.json)
      std::printf("# %s heads %lld/%lld x %lld %s%s; rates %.1f GFLOP/s per rank, %.2f GB/s data "
                  "movement per rank\n",
                  o.preset.empty() ? "custom" : o.preset.c_str(), static_cast<long long>(o.heads),
                  static_cast<long long>(o.kv_heads), static_cast<long long>(o.head_dim),
                  dtype_name(o.dtype), o.causal ? " causal" : "", rates.flops_per_s / 1e9,
                  rates.bytes_per_s / 1e9);
    for (std::int64_t P : o.ranks_list) {
      if (!o.json)
        std::printf("%5s %-13s %7s %11s %12s %12s %9s %8s %10s %10s %10s %8s\n", "ranks", "strategy",
                    "seq", "GFLOP/rank", "MB sent", "MB recv", "imbalance", "pad", "compute_ms",
                    "xchg_ms", "model_ms", "vs_uaa");
      for (const auto& lens : sweep_lengths(o, static_cast<int>(P))) {
        std::int64_t seq = 0;
        for (std::int64_t x : lens) seq += x;
        detail::LayoutInput in;
        in.q_lens = lens;
        in.kv_lens = lens;
        in.q_heads = o.heads;
        in.kv_heads = o.kv_heads;
        in.head_dim = o.head_dim;
        in.elem_bytes = static_cast<std::int64_t>(dtype_size(o.dtype));
        double uaa_ms = 0;
        for (Strategy st : o.strategies) {
          if (st == Strategy::uaa) uaa_ms = detail::modelled_ms(detail::estimate_cost(in, st, o.causal), rates);
        }
        for (Strategy st : o.strategies) {
          if (st == Strategy::ulysses && !detail::ulysses_problem(lens, lens, o.heads).empty()) {
            if (o.json)
              std::printf("{\"ranks\": %lld, \"strategy\": \"ulysses\", \"seq\": %lld, \"error\": "
                          "\"does not divide\"}\n",
                          static_cast<long long>(P), static_cast<long long>(seq));
            else
              std::printf("%5lld %-13s %7lld  (cannot run: %s)\n", static_cast<long long>(P),
                          "ulysses", static_cast<long long>(seq),
                          (seq % P ? "total does not divide" : "heads do not divide"));
            continue;
          }
          const detail::CostEstimate c = detail::estimate_cost(in, st, o.causal);
          const double ms = detail::modelled_ms(c, rates);
          const double cms = detail::modelled_compute_ms(c, rates), xms = detail::modelled_exchange_ms(c, rates);
          if (o.json) {
            std::printf("{\"ranks\": %lld, \"strategy\": \"%s\", \"seq\": %lld, \"max_flops\": %.6g, "
                        "\"max_bytes_sent\": %lld, \"max_bytes_received\": %lld, \"imbalance\": %.6g, "
                        "\"pad_fraction\": %.6g, \"compute_ms\": %.6g, \"exchange_ms\": %.6g, "
                        "\"model_ms\": %.6g, \"vs_uaa\": %.6g}\n",
                        static_cast<long long>(P), strategy_name(st), static_cast<long long>(seq),
                        c.max_flops, static_cast<long long>(c.max_sent),
                        static_cast<long long>(c.max_received), c.imbalance, c.pad_fraction, cms,
                        xms, ms, uaa_ms > 0 ? ms / uaa_ms : 0.0);
          } else {
            std::printf("%5lld %-13s %7lld %11.2f %12.2f %12.2f %9.3f %8.3f %10.2f %10.2f %10.2f %8.3f\n",
                        static_cast<long long>(P), strategy_name(st), static_cast<long long>(seq),
                        c.max_flops / 1e9, static_cast<double>(c.max_sent) / 1e6,
                        static_cast<double>(c.max_received) / 1e6, c.imbalance, c.pad_fraction,
                        cms, xms, ms, uaa_ms > 0 ? ms / uaa_ms : 0.0);
          }
        }
      }
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "uaa plan: %s\n", e.what());
    return 2;
  }
}

}  // namespace uaa::cli
