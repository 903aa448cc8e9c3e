#include "sweep.h"

#include <cstdlib>
#include <set>

#include "presets.h"

namespace uaa::bench {
namespace {

std::int64_t to_int(const std::string& opt, const std::string& v, std::int64_t lo) {
  char* end = nullptr;
  const long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end || x < lo)
    throw SweepError(opt + ": '" + v + "' is not an integer >= " + std::to_string(lo));
  return x;
}

double to_double(const std::string& opt, const std::string& v) {
  char* end = nullptr;
  const double x = std::strtod(v.c_str(), &end);
  if (v.empty() || *end || !(x > 0)) throw SweepError(opt + ": '" + v + "' is not a positive number");
  return x;
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::size_t at = 0;
  while (true) {
    const std::size_t c = s.find(',', at);
    out.push_back(s.substr(at, c == std::string::npos ? std::string::npos : c - at));
    if (c == std::string::npos) return out;
    at = c + 1;
  }
}

std::vector<std::int64_t> int_list(const std::string& opt, const std::string& v, std::int64_t lo) {
  std::vector<std::int64_t> out;
  for (const std::string& x : split(v)) out.push_back(to_int(opt, x, lo));
  return out;
}

}  // namespace

const char* const kBenchUsage = R"(usage: mpirun -np P uaa bench [options]
       uaa bench kernel [options]      (the local attention kernel vs OpenBLAS)

Times the strategies of uaa::forward() on the same inputs in one run and compares their outputs.
Workload (a preset, or --heads/--head-dim):
  --preset NAME          flux, flux-1008, qwen-image, sd3, z-image, wan-480p, wan-720p
  --text-lens a,b,...    prompt lengths added to the preset's image tokens (default 0)
  --seq N[,N...]         explicit totals, split over the ranks as evenly as possible
  --lens a,b,...         explicit per-rank lengths (one sequence)
  --heads H  --kv-heads H  --head-dim D  --dtype f32|bf16  --causal
Strategies and timing:
  --strategies LIST      default uaa,ulysses_pad,ulysses,allgather_kv (ulysses skips totals that do
                         not divide)
  --iters N              timed rounds per sequence, default 5, after --warmup N (1) untimed rounds.
                         In a round every strategy that can run makes one call, followed by its
                         raw MPI_Alltoallv; the first strategy rotates from round to round.
Output:
  --json                 one JSON object per line per (strategy, sequence)
  --csv FILE  --plot FILE.png (gnuplot)
  --compute-gflops G --exchange-gbps B   model rates (default: calibrated from the first uaa row)

Phases are medians over the timed rounds, then the maximum over ranks. Every exchange is preceded
by a barrier that is timed separately (wait_ms), so exchange_ms (pack + both exchanges + unpack)
is data movement, not skew. raw_alltoallv_ms: MPI_Alltoallv of exactly the same per-peer byte
counts (both exchanges), timed in the same rounds the same way. Paired per round, so the machine's
drift cancels (each call's time is the maximum over ranks before the ratio):
  ratio_to_uaa           median over rounds of total_ms / uaa's total_ms (null without uaa)
  exchange_ratio_to_raw  median over rounds of exchange_ms / raw_alltoallv_ms
)";

const char* const kPlanUsage = R"(usage: uaa plan --ranks P[,P...] [options]

The cost model of every strategy, per rank, without running anything: FLOPs, bytes sent and
received, load imbalance (max/mean FLOPs over ranks), and a modelled time
  max FLOPs / compute rate + max (sent + received + 2 x self) bytes / data-movement rate.
Workload: --preset NAME --text-lens a,b,... | --seq N[,N...] | --lens a,b,...; --heads H --kv-heads H
  --head-dim D --dtype f32|bf16 --causal; --strategies LIST.
Rates: --compute-gflops G (per rank) --exchange-gbps B (GB/s of data movement per rank); defaults
  are what `uaa bench` measured on the 2-core development machine (docs/PERFORMANCE.md).
Output: a table, or --json (one object per line).
)";

std::vector<std::int64_t> even_split(std::int64_t total, int ranks) {
  std::vector<std::int64_t> lens(static_cast<std::size_t>(ranks), total / ranks);
  for (std::int64_t r = 0; r < total % ranks; ++r) ++lens[static_cast<std::size_t>(r)];
  return lens;
}

SweepOptions parse_sweep(int argc, char** argv, bool for_plan) {
  SweepOptions o;
  std::set<std::string> seen;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      o.help = true;
      continue;
    }
    if (!seen.insert(a).second) throw SweepError(a + " is given more than once");
    if (a == "--json") { o.json = true; continue; }
    if (a == "--causal") { o.causal = true; continue; }
    if (i + 1 >= argc) throw SweepError(a + " needs a value");
    const std::string v = argv[++i];
    if (a == "--strategies") {
      o.strategies.clear();
      for (const std::string& s : split(v)) {
        Strategy st;
        if (!parse_strategy(s, &st))
          throw SweepError("--strategies: '" + s + "' is not one of uaa, ulysses, ulysses_pad, allgather_kv");
        o.strategies.push_back(st);
      }
    } else if (a == "--preset") {
      if (!find_preset(v)) throw SweepError("--preset: '" + v + "' is not one of " + preset_names());
      o.preset = v;
    } else if (a == "--text-lens") o.text_lens = int_list(a, v, 0);
    else if (a == "--seq") o.seqs = int_list(a, v, 0);
    else if (a == "--lens") o.lens = int_list(a, v, 0);
    else if (a == "--heads") o.heads = to_int(a, v, 1);
    else if (a == "--kv-heads") o.kv_heads = to_int(a, v, 1);
    else if (a == "--head-dim") o.head_dim = to_int(a, v, 1);
    else if (a == "--dtype") {
      if (v == "f32") o.dtype = DType::f32;
      else if (v == "bf16") o.dtype = DType::bf16;
      else throw SweepError("--dtype: '" + v + "' is not one of f32, bf16");
    } else if (a == "--compute-gflops") o.compute_gflops = to_double(a, v);
    else if (a == "--exchange-gbps") o.exchange_gbps = to_double(a, v);
    else if (for_plan && a == "--ranks") o.ranks_list = int_list(a, v, 1);
    else if (!for_plan && a == "--iters") o.iters = to_int(a, v, 1);
    else if (!for_plan && a == "--warmup") o.warmup = to_int(a, v, 0);
    else if (!for_plan && a == "--csv") o.csv = v;
    else if (!for_plan && a == "--plot") o.plot = v;
    else throw SweepError("unknown option '" + a + "' (see --help)");
  }
  if (o.help) return o;
  if (!o.preset.empty()) {
    const Preset& p = *find_preset(o.preset);
    if (!seen.count("--heads")) o.heads = p.heads;
    if (!seen.count("--kv-heads")) o.kv_heads = p.kv_heads;
    if (!seen.count("--head-dim")) o.head_dim = p.head_dim;
    if (o.seqs.empty() && o.lens.empty()) {
      if (o.text_lens.empty()) o.text_lens = {0};
      for (std::int64_t t : o.text_lens) o.seqs.push_back(p.image_tokens + t);
    }
  } else if (!o.text_lens.empty()) {
    throw SweepError("--text-lens needs --preset");
  }
  if (o.heads == 0) throw SweepError("give --preset or --heads");
  if (o.kv_heads == 0) o.kv_heads = o.heads;
  if (o.heads % o.kv_heads) throw SweepError("--heads must be a multiple of --kv-heads");
  if (o.seqs.empty() && o.lens.empty()) throw SweepError("give --preset, --seq or --lens");
  if (!o.seqs.empty() && !o.lens.empty()) throw SweepError("give --seq or --lens, not both");
  if (for_plan && o.ranks_list.empty()) throw SweepError("--ranks is required");
  return o;
}

std::vector<std::vector<std::int64_t>> sweep_lengths(const SweepOptions& o, int ranks) {
  std::vector<std::vector<std::int64_t>> out;
  if (!o.lens.empty()) {
    if (static_cast<int>(o.lens.size()) != ranks)
      throw SweepError("--lens has " + std::to_string(o.lens.size()) + " values for " +
                       std::to_string(ranks) + " ranks");
    out.push_back(o.lens);
  }
  for (std::int64_t s : o.seqs) out.push_back(even_split(s, ranks));
  return out;
}

}  // namespace uaa::bench
