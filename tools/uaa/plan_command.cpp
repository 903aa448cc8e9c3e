// `uaa plan`: the cost model (src/plan/cost_model.h) of every strategy at any rank count, without
// MPI: per-rank FLOPs, bytes sent and received, load imbalance and a modelled time from rates that
// `uaa bench` measured (or given: --compute-gflops, --exchange-gbps). Packed documents (--docs,
// --kv-docs, --preset docs-longtail), batches (--batch) and windows (--window) are modelled for the
// uaa strategy through the same geometry a plan builds (visible pairs inside documents).
//
// Cost: O(P log S) per (rank count, sequence, strategy): one work split and a closed-form count per
// rank, never a plan or a program per rank. --program R compiles rank R's program only (O(P)).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "commands.h"
#include "plan/cost_model.h"
#include "program/program.h"
#include "sweep.h"

namespace uaa::cli {
namespace {

// Measured on the 2-core development machine, 2 ranks x 1 thread, fp32 (docs/PERFORMANCE.md):
// uaa's attention FLOP/s per rank and its data-movement bytes (sent + received) per second.
constexpr double kDefaultGflops = 93.6;
constexpr double kDefaultGbps = 4.6;

// --per-rank prints one line per rank up to this many ranks, else a summary over the ranks.
constexpr std::int64_t kRankLinesUpTo = 32;

constexpr const char* kPlanExtraUsage = R"(Per rank (options of `uaa plan` only):
  --per-rank             under every row, each rank's GFLOP, MB sent/received and modelled ms when
                         there are at most 32 ranks, else a summary: min / median / max over the
                         ranks and the busiest rank (largest modelled time). With --json: the
                         summary fields on every row, and one object per rank up to 32 ranks.
  --all-ranks            --per-rank with one line (or object) per rank at any rank count.
  --program R            rank R's compiled forward program of every row (src/program/program.h).
Cost: O(P log S) per row (the work split plus a closed-form count per rank).
)";

// Options of `uaa plan` that `uaa bench` does not share; taken out before parse_sweep.
struct PlanExtras {
  bool per_rank = false, all_ranks = false;
  long long program_rank = -1;
};

PlanExtras take_extras(int argc, char** argv, std::vector<char*>& rest) {
  PlanExtras x;
  for (int i = 0; i < argc; ++i) {
    if (i > 0 && std::strcmp(argv[i], "--per-rank") == 0) {
      x.per_rank = true;
    } else if (i > 0 && std::strcmp(argv[i], "--all-ranks") == 0) {
      x.per_rank = x.all_ranks = true;
    } else if (i > 0 && std::strcmp(argv[i], "--program") == 0) {
      if (i + 1 >= argc) throw bench::SweepError("--program needs a value");
      const std::string v = argv[++i];
      char* end = nullptr;
      x.program_rank = std::strtoll(v.c_str(), &end, 10);
      if (v.empty() || *end || x.program_rank < 0)
        throw bench::SweepError("--program: '" + v + "' is not an integer >= 0");
    } else {
      rest.push_back(argv[i]);
    }
  }
  return x;
}

// Why plain ulysses cannot run these lengths ("" if it can): as Plan::create checks it.
const char* ulysses_cannot(const std::vector<std::int64_t>& lens, std::int64_t heads) {
  const auto P = static_cast<std::int64_t>(lens.size());
  std::int64_t total = 0;
  for (std::int64_t x : lens) total += x;
  if (total % P) return "total does not divide";
  for (std::int64_t x : lens)
    if (x != total / P) return "lengths are uneven";
  if (heads % P) return "heads do not divide";
  return "";
}

struct Spread {
  double min = 0, median = 0, max = 0;
};

template <typename Get>
Spread spread(const std::vector<detail::RankCost>& ranks, Get get) {
  std::vector<double> v(ranks.size());
  for (std::size_t r = 0; r < ranks.size(); ++r) v[r] = get(ranks[r]);
  Spread s;
  if (v.empty()) return s;
  const auto mid = v.begin() + static_cast<std::ptrdiff_t>(v.size() / 2);
  std::nth_element(v.begin(), mid, v.end());
  s.median = *mid;
  if (v.size() % 2 == 0) s.median = (s.median + *std::max_element(v.begin(), mid)) / 2;
  const auto [lo, hi] = std::minmax_element(v.begin(), v.end());
  s.min = *lo;
  s.max = *hi;
  return s;
}

double flops_of(const detail::RankCost& r) { return r.flops; }
double sent_of(const detail::RankCost& r) { return static_cast<double>(r.sent); }
double received_of(const detail::RankCost& r) { return static_cast<double>(r.received); }

// work/mean: the rank's FLOPs over the mean over ranks (the largest is the row's imbalance).
void print_rank_lines(const detail::CostEstimate& c, const detail::CostRates& rates) {
  std::printf("      %7s %11s %9s %12s %12s %10s\n", "rank", "GFLOP", "work/mean", "MB sent",
              "MB recv", "model_ms");
  for (std::size_t r = 0; r < c.ranks.size(); ++r) {
    const detail::RankCost& rc = c.ranks[r];
    std::printf("      %7zu %11.2f %9.4f %12.2f %12.2f %10.2f\n", r, rc.flops / 1e9,
                c.mean_flops > 0 ? rc.flops / c.mean_flops : 1.0, static_cast<double>(rc.sent) / 1e6,
                static_cast<double>(rc.received) / 1e6, detail::modelled_rank_ms(rc, rates));
  }
}

void print_summary(const detail::CostEstimate& c, const detail::CostRates& rates) {
  const Spread f = spread(c.ranks, flops_of), s = spread(c.ranks, sent_of),
               rv = spread(c.ranks, received_of);
  const int busy = detail::busiest_rank(c, rates);
  const detail::RankCost& b = c.ranks[static_cast<std::size_t>(busy)];
  std::printf("      over %zu ranks %9s %12s %12s   busiest: rank %d\n", c.ranks.size(), "min",
              "median", "max", busy);
  std::printf("      %-16s %9.3f %12.3f %12.3f   %.3f\n", "GFLOP", f.min / 1e9, f.median / 1e9,
              f.max / 1e9, b.flops / 1e9);
  std::printf("      %-16s %9.3f %12.3f %12.3f   %.3f\n", "MB sent", s.min / 1e6, s.median / 1e6,
              s.max / 1e6, static_cast<double>(b.sent) / 1e6);
  std::printf("      %-16s %9.3f %12.3f %12.3f   %.3f\n", "MB recv", rv.min / 1e6, rv.median / 1e6,
              rv.max / 1e6, static_cast<double>(b.received) / 1e6);
  std::printf("      %-16s %9s %12s %12s   %.3f\n", "model_ms", "", "", "",
              detail::modelled_rank_ms(b, rates));
}

std::string json_summary(const detail::CostEstimate& c, const detail::CostRates& rates) {
  const Spread f = spread(c.ranks, flops_of), s = spread(c.ranks, sent_of),
               rv = spread(c.ranks, received_of);
  char buf[512];
  std::snprintf(buf, sizeof buf,
                ", \"busiest_rank\": %d, \"min_flops\": %.6g, \"median_flops\": %.6g, "
                "\"min_bytes_sent\": %.17g, \"median_bytes_sent\": %.17g, "
                "\"min_bytes_received\": %.17g, \"median_bytes_received\": %.17g",
                detail::busiest_rank(c, rates), f.min, f.median, s.min, s.median, rv.min, rv.median);
  return buf;
}

void print_rank_json(long long P, Strategy st, long long seq, const detail::CostEstimate& c,
                     const detail::CostRates& rates) {
  for (std::size_t r = 0; r < c.ranks.size(); ++r) {
    const detail::RankCost& rc = c.ranks[r];
    std::printf("{\"ranks\": %lld, \"strategy\": \"%s\", \"seq\": %lld, \"rank\": %zu, \"flops\": "
                "%.6g, \"work_over_mean\": %.6g, \"bytes_sent\": %lld, \"bytes_received\": %lld, "
                "\"bytes_self\": %lld, \"model_ms\": %.6g}\n",
                P, strategy_name(st), seq, r, rc.flops,
                c.mean_flops > 0 ? rc.flops / c.mean_flops : 1.0, static_cast<long long>(rc.sent),
                static_cast<long long>(rc.received), static_cast<long long>(rc.self),
                detail::modelled_rank_ms(rc, rates));
  }
}

void print_program(const detail::Geometry& g, Strategy st, const std::vector<detail::RankWork>& work,
                   long long rank) {
  if (rank >= static_cast<long long>(g.q_lens.size())) {
    std::printf("      (no rank %lld)\n", rank);
    return;
  }
  const int r = static_cast<int>(rank);
  const detail::Program p = st == Strategy::uaa ? detail::compile_uaa_forward(g, work, r)
                            : st == Strategy::allgather_kv ? detail::compile_allgather_kv_forward(g, r)
                                                           : detail::compile_padded_forward(g, r);
  std::printf("      rank %d program:\n", r);
  const std::string text = detail::describe(p);
  std::size_t at = 0;
  while (at < text.size()) {
    const std::size_t nl = text.find('\n', at);
    const std::size_t end = nl == std::string::npos ? text.size() : nl;
    std::printf("        %.*s\n", static_cast<int>(end - at), text.c_str() + at);
    at = end + 1;
  }
}

// Why strategy `st` has no row for this workload ("" if it has one).
const char* cannot_model(const bench::SweepOptions& o, Strategy st) {
  if (st == Strategy::uaa) return "";
  if (o.uaa_only()) return "cannot run: documents and batches need strategy uaa";
  if (o.has_window()) return "not modelled: the cost model counts this strategy without the window";
  return "";
}

// The workload's line(s) under the header: documents, batch, window.
void print_workload(const bench::SweepOptions& o) {
  if (!o.docs.empty()) {
    std::int64_t total = 0;
    for (std::int64_t x : o.docs) total += x;
    std::printf("# documents: %zu, %lld tokens (%s): %s\n", o.docs.size(),
                static_cast<long long>(total), bench::length_summary(o.docs).c_str(),
                bench::join(o.docs).c_str());
    if (!o.kv_docs.empty())
      std::printf("# key/value documents: %s\n", bench::join(o.kv_docs).c_str());
  }
  if (o.batch > 1 || o.has_window())
    std::printf("# batch %lld, window %lld,%lld\n", static_cast<long long>(o.batch),
                static_cast<long long>(o.window_left), static_cast<long long>(o.window_right));
}

}  // namespace

int plan_main(int argc, char** argv) {
  using namespace uaa::bench;
  try {
    std::vector<char*> rest;
    PlanExtras extras = take_extras(argc, argv, rest);
    const SweepOptions o = parse_sweep(static_cast<int>(rest.size()), rest.data(), SweepFor::plan);
    if (o.help) {
      std::fputs(kPlanUsage, stdout);
      std::fputs(kPlanExtraUsage, stdout);
      return 0;
    }
    // Documents: the per-rank work is the point, so the per-rank lines are on.
    if (!o.docs.empty()) extras.per_rank = true;
    const detail::CostRates rates{(o.compute_gflops > 0 ? o.compute_gflops : kDefaultGflops) * 1e9,
                                  (o.exchange_gbps > 0 ? o.exchange_gbps : kDefaultGbps) * 1e9};
    if (!o.json) {
      std::printf("# %s heads %lld/%lld x %lld %s%s; rates %.1f GFLOP/s per rank, %.2f GB/s data "
                  "movement per rank\n",
                  o.preset.empty() ? "custom" : o.preset.c_str(), static_cast<long long>(o.heads),
                  static_cast<long long>(o.kv_heads), static_cast<long long>(o.head_dim),
                  dtype_name(o.dtype), o.causal ? " causal" : "", rates.flops_per_s / 1e9,
                  rates.bytes_per_s / 1e9);
      print_workload(o);
    }
    // JSON fields of the workload, on every row of a document / batch / window workload.
    std::string workload_json;
    if (!o.docs.empty() || o.batch > 1 || o.has_window()) {
      workload_json = ", \"batch\": " + std::to_string(o.batch) + ", \"window\": [" +
                      std::to_string(o.window_left) + ", " + std::to_string(o.window_right) +
                      "], \"documents\": " + std::to_string(o.docs.size());
      if (!o.docs.empty()) workload_json += ", \"doc_lengths\": [" + join(o.docs) + "]";
      if (!o.kv_docs.empty()) workload_json += ", \"kv_doc_lengths\": [" + join(o.kv_docs) + "]";
    }
    for (std::int64_t P : o.ranks_list) {
      if (P > 0x7fffffff) throw SweepError("--ranks: " + std::to_string(P) + " is too many ranks");
      if (!o.json)
        std::printf("%5s %-13s %7s %11s %12s %12s %9s %8s %10s %10s %10s %8s\n", "ranks", "strategy",
                    "seq", "GFLOP/rank", "MB sent", "MB recv", "imbalance", "pad", "compute_ms",
                    "xchg_ms", "model_ms", "vs_uaa");
      const bool rank_lines = extras.all_ranks || P <= kRankLinesUpTo;
      for (auto& lens : sweep_lengths(o, static_cast<int>(P))) {
        std::int64_t seq = 0;
        for (std::int64_t x : lens) seq += x;
        const detail::Geometry g = geometry_for(o, lens, kv_lengths(o, lens));
        // The uaa split, once per sequence: every strategy's row compares with uaa's time.
        const std::vector<detail::RankWork> work = detail::split_work(detail::work_input(g));
        double uaa_ms = 0;
        for (Strategy st : o.strategies)
          if (st == Strategy::uaa)
            uaa_ms = detail::modelled_ms(detail::estimate_cost(g, st, work), rates);
        for (Strategy st : o.strategies) {
          const char* why = cannot_model(o, st);
          if (!*why && st == Strategy::ulysses) why = ulysses_cannot(g.q_lens, o.heads);
          if (*why) {
            if (o.json)
              std::printf("{\"ranks\": %lld, \"strategy\": \"%s\", \"seq\": %lld, \"error\": "
                          "\"%s\"}\n",
                          static_cast<long long>(P), strategy_name(st), static_cast<long long>(seq),
                          st == Strategy::ulysses && !o.uaa_only() && !o.has_window()
                              ? "does not divide"
                              : why);
            else
              std::printf("%5lld %-13s %7lld  (%s%s)\n", static_cast<long long>(P), strategy_name(st),
                          static_cast<long long>(seq),
                          st == Strategy::ulysses && !o.uaa_only() && !o.has_window() ? "cannot run: "
                                                                                      : "",
                          why);
            continue;
          }
          const detail::CostEstimate c = detail::estimate_cost(g, st, work);
          const double ms = detail::modelled_ms(c, rates);
          const double cms = detail::modelled_compute_ms(c, rates), xms = detail::modelled_exchange_ms(c, rates);
          if (o.json) {
            std::printf("{\"ranks\": %lld, \"strategy\": \"%s\", \"seq\": %lld, \"max_flops\": %.6g, "
                        "\"max_bytes_sent\": %lld, \"max_bytes_received\": %lld, \"imbalance\": %.6g, "
                        "\"pad_fraction\": %.6g, \"compute_ms\": %.6g, \"exchange_ms\": %.6g, "
                        "\"model_ms\": %.6g, \"vs_uaa\": %.6g%s%s}\n",
                        static_cast<long long>(P), strategy_name(st), static_cast<long long>(seq),
                        c.max_flops, static_cast<long long>(c.max_sent),
                        static_cast<long long>(c.max_received), c.imbalance, c.pad_fraction, cms,
                        xms, ms, uaa_ms > 0 ? ms / uaa_ms : 0.0,
                        extras.per_rank ? json_summary(c, rates).c_str() : "", workload_json.c_str());
            if (extras.per_rank && rank_lines)
              print_rank_json(static_cast<long long>(P), st, static_cast<long long>(seq), c, rates);
          } else {
            std::printf("%5lld %-13s %7lld %11.2f %12.2f %12.2f %9.3f %8.3f %10.2f %10.2f %10.2f %8.3f\n",
                        static_cast<long long>(P), strategy_name(st), static_cast<long long>(seq),
                        c.max_flops / 1e9, static_cast<double>(c.max_sent) / 1e6,
                        static_cast<double>(c.max_received) / 1e6, c.imbalance, c.pad_fraction,
                        cms, xms, ms, uaa_ms > 0 ? ms / uaa_ms : 0.0);
            if (extras.per_rank) {
              if (rank_lines) print_rank_lines(c, rates);
              else print_summary(c, rates);
            }
            if (extras.program_rank >= 0) print_program(g, st, work, extras.program_rank);
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
