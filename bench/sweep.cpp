#include "sweep.h"

#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <set>

#include "bench_util.h"
#include "plan/layout.h"
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
       mpirun -np P uaa bench docs [options]   (packed documents against one call per document)
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

const char* const kDocsUsage = R"(usage: mpirun -np P uaa bench docs [options]

Packed documents: one uaa::forward() over all documents (one plan with uaa::Documents) against the
same documents one call each (a plan per document, each rank holding the document's tokens that
the packed layout gives it, so both read the same input rows), on the same ranks in the same run,
and a calibration call (one causal-or-not sequence of --calib-seq tokens, no documents) whose
measured rates feed the cost model. Outputs are compared bitwise (packed against one by one).
Workload:
  --preset NAME          docs-longtail (64 log-normal documents, 32768 tokens, 32/8 x 128, causal)
  --docs a,b,...         document lengths (the sequence is their sum)  --kv-docs a,b,...
  --lens a,b,...         per-rank cut of the packed sequence (default: as even as possible)
  --heads H  --kv-heads H  --head-dim D  --dtype f32|bf16  --causal  --batch B  --window L,R
Timing:
  --iters N  --warmup N  rounds (default 5 after 1); in a round each of packed, one_by_one and
                         calibration runs once (one_by_one: every document's call back to back),
                         the first one rotating from round to round
  --backward             forward (keeping a uaa::SavedForward) + backward in saved mode
  --calib-seq N          calibration tokens (default 4096; 0: none, give the rates instead)
  --compute-gflops G --exchange-gbps B   model rates instead of the calibration's
Output: a table, or --json (one object per line per mode, then one summary object).

Times are medians over the timed rounds of each call's (or loop's) time, maximum over ranks.
Forward calls run with PhaseTimes::sync_exchanges (exchange phases are data movement; the skew
before them is wait_ms). ratio = median over rounds of packed / one_by_one (paired per round).
)";

const char* const kPlanUsage = R"(usage: uaa plan --ranks P[,P...] [options]

The cost model of every strategy, per rank, without running anything: FLOPs, bytes sent and
received, load imbalance (max/mean FLOPs over ranks), and a modelled time
  max FLOPs / compute rate + max (sent + received + 2 x self) bytes / data-movement rate.
Workload: --preset NAME --text-lens a,b,... | --seq N[,N...] | --lens a,b,...; --heads H --kv-heads H
  --head-dim D --dtype f32|bf16 --causal; --strategies LIST.
Documents, batches, windows (plan.h): --docs a,b,... (packed document lengths; the sequence is their
  sum, split evenly unless --lens), --kv-docs a,b,..., --batch B, --window L,R (-1: no bound), or
  --preset docs-longtail. Documents and batches run the uaa strategy only (the default then); the
  per-rank lines are on (as --per-rank) and the document lengths are printed.
Rates: --compute-gflops G (per rank) --exchange-gbps B (GB/s of data movement per rank); defaults
  are what `uaa bench` measured on the 2-core development machine (docs/PERFORMANCE.md).
Output: a table, or --json (one object per line).
)";

std::vector<std::int64_t> even_split(std::int64_t total, int ranks) {
  std::vector<std::int64_t> lens(static_cast<std::size_t>(ranks), total / ranks);
  for (std::int64_t r = 0; r < total % ranks; ++r) ++lens[static_cast<std::size_t>(r)];
  return lens;
}

SweepOptions parse_sweep(int argc, char** argv, SweepFor mode) {
  const bool for_plan = mode == SweepFor::plan, for_bench = mode == SweepFor::bench,
             for_docs = mode == SweepFor::docs;
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
    if (for_docs && a == "--backward") { o.backward = true; continue; }
    if (i + 1 >= argc) throw SweepError(a + " needs a value");
    const std::string v = argv[++i];
    if (a == "--strategies" && !for_docs) {
      o.strategies.clear();
      for (const std::string& s : split(v)) {
        Strategy st;
        if (!parse_strategy(s, &st))
          throw SweepError("--strategies: '" + s + "' is not one of uaa, ulysses, ulysses_pad, allgather_kv");
        o.strategies.push_back(st);
      }
    } else if (a == "--preset") {
      if (find_preset(v) && !for_docs) {
        o.preset = v;
      } else if (find_doc_preset(v) && !for_bench) {
        o.preset = v;
        o.doc_preset = true;
      } else {
        std::string names;
        if (!for_docs)
          for (const Preset& p : kPresets) names += (names.empty() ? "" : ", ") + std::string(p.name);
        if (!for_bench)
          for (const DocPreset& p : kDocPresets) names += (names.empty() ? "" : ", ") + std::string(p.name);
        throw SweepError("--preset: '" + v + "' is not one of " + names);
      }
    } else if (a == "--text-lens" && !for_docs) o.text_lens = int_list(a, v, 0);
    else if (a == "--seq" && !for_docs) o.seqs = int_list(a, v, 0);
    else if (a == "--lens") o.lens = int_list(a, v, 0);
    else if (a == "--docs" && !for_bench) o.docs = int_list(a, v, 0);
    else if (a == "--kv-docs" && !for_bench) o.kv_docs = int_list(a, v, 0);
    else if (a == "--batch" && !for_bench) o.batch = to_int(a, v, 1);
    else if (a == "--window" && !for_bench) {
      const std::vector<std::int64_t> w = int_list(a, v, -1);
      if (w.size() != 2) throw SweepError("--window: '" + v + "' is not L,R (two integers >= -1)");
      o.window_left = w[0];
      o.window_right = w[1];
    } else if (a == "--heads") o.heads = to_int(a, v, 1);
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
    else if (for_bench && a == "--csv") o.csv = v;
    else if (for_bench && a == "--plot") o.plot = v;
    else if (for_docs && a == "--calib-seq") o.calib_seq = to_int(a, v, 0);
    else throw SweepError("unknown option '" + a + "' (see --help)");
  }
  if (o.help) return o;
  if (o.doc_preset) {
    const DocPreset& p = *find_doc_preset(o.preset);
    if (!seen.count("--heads")) o.heads = p.heads;
    if (!seen.count("--kv-heads")) o.kv_heads = p.kv_heads;
    if (!seen.count("--head-dim")) o.head_dim = p.head_dim;
    if (p.causal) o.causal = true;
    if (!o.docs.empty()) throw SweepError("give --preset " + o.preset + " or --docs, not both");
    if (!o.text_lens.empty()) throw SweepError("--text-lens needs an image preset, not " + o.preset);
    o.docs = preset_documents(p);
  } else if (!o.preset.empty()) {
    const Preset& p = *find_preset(o.preset);
    if (!seen.count("--heads")) o.heads = p.heads;
    if (!seen.count("--kv-heads")) o.kv_heads = p.kv_heads;
    if (!seen.count("--head-dim")) o.head_dim = p.head_dim;
    if (o.seqs.empty() && o.lens.empty() && o.docs.empty()) {
      if (o.text_lens.empty()) o.text_lens = {0};
      for (std::int64_t t : o.text_lens) o.seqs.push_back(p.image_tokens + t);
    }
  } else if (!o.text_lens.empty()) {
    throw SweepError("--text-lens needs --preset");
  }
  if (!o.kv_docs.empty() && o.docs.empty()) throw SweepError("--kv-docs needs --docs");
  if (!o.kv_docs.empty() && o.kv_docs.size() != o.docs.size())
    throw SweepError("--kv-docs has " + std::to_string(o.kv_docs.size()) + " lengths but --docs has " +
                     std::to_string(o.docs.size()));
  if (!o.docs.empty()) {
    const std::int64_t total = sum(o.docs);
    if (!o.seqs.empty() && (o.seqs.size() != 1 || o.seqs[0] != total))
      throw SweepError("--seq must be the documents' total " + std::to_string(total) +
                       " (or left out)");
    if (!o.lens.empty() && sum(o.lens) != total)
      throw SweepError("--lens sum to " + std::to_string(sum(o.lens)) + " but the documents to " +
                       std::to_string(total));
    if (o.lens.empty()) o.seqs = {total};
    else o.seqs.clear();
    if (!o.kv_docs.empty() && sum(o.kv_docs) != total && !o.lens.empty())
      throw SweepError("--kv-docs with another total than --docs: give no --lens (both are split "
                       "evenly)");
    // Documents and batches are uaa's alone: the default list is uaa then.
    if (o.uaa_only() && !seen.count("--strategies")) o.strategies = {Strategy::uaa};
  } else if (o.batch > 1 && !seen.count("--strategies")) {
    o.strategies = {Strategy::uaa};
  }
  if (o.heads == 0) throw SweepError("give --preset or --heads");
  if (o.kv_heads == 0) o.kv_heads = o.heads;
  if (o.heads % o.kv_heads) throw SweepError("--heads must be a multiple of --kv-heads");
  if (o.seqs.empty() && o.lens.empty()) throw SweepError("give --preset, --seq, --lens or --docs");
  if (!o.seqs.empty() && !o.lens.empty()) throw SweepError("give --seq or --lens, not both");
  if (for_plan && o.ranks_list.empty()) throw SweepError("--ranks is required");
  if (for_docs && o.docs.empty()) throw SweepError("give --preset docs-longtail or --docs");
  if (for_docs && o.calib_seq == 0 && !(o.compute_gflops > 0 && o.exchange_gbps > 0))
    throw SweepError("--calib-seq 0 needs --compute-gflops and --exchange-gbps");
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

std::vector<std::int64_t> kv_lengths(const SweepOptions& o, const std::vector<std::int64_t>& q_lens) {
  if (o.kv_docs.empty() || sum(o.kv_docs) == sum(q_lens)) return q_lens;
  return even_split(sum(o.kv_docs), static_cast<int>(q_lens.size()));
}

detail::Geometry geometry_for(const SweepOptions& o, const std::vector<std::int64_t>& q_lens,
                              const std::vector<std::int64_t>& kv_lens, bool with_lse) {
  detail::Geometry g;
  g.q_lens = q_lens;
  g.kv_lens = kv_lens;
  g.batch = o.batch;
  g.q_heads = o.heads * o.batch;
  g.kv_heads = o.kv_heads * o.batch;
  g.head_dim = o.head_dim;
  g.elem_bytes = static_cast<std::int64_t>(dtype_size(o.dtype));
  g.causal = o.causal;
  g.with_lse = with_lse;
  g.window_left = o.window_left;
  g.window_right = o.window_right;
  if (o.has_docs()) {
    g.q_doc_start = detail::prefix_sums(o.docs);
    g.kv_doc_start = detail::prefix_sums(o.kv_docs.empty() ? o.docs : o.kv_docs);
  }
  return g;
}

std::string length_summary(const std::vector<std::int64_t>& v) {
  if (v.empty()) return "none";
  std::vector<std::int64_t> s = v;
  std::sort(s.begin(), s.end());
  const std::size_t n = s.size();
  const double med = n % 2 ? static_cast<double>(s[n / 2])
                           : 0.5 * static_cast<double>(s[n / 2 - 1] + s[n / 2]);
  char buf[128];
  std::snprintf(buf, sizeof buf, "min %lld, median %g, max %lld", static_cast<long long>(s.front()),
                med, static_cast<long long>(s.back()));
  return buf;
}

std::string join(const std::vector<std::int64_t>& v) {
  std::string s;
  for (std::size_t i = 0; i < v.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(v[i]);
  }
  return s;
}

int mpi_benchmark_main(int argc, char** argv, SweepFor mode, const char* name, const char* usage,
                       int (*run)(const SweepOptions& o, int me, int P)) {
  MPI_Init(&argc, &argv);
  int me = 0, P = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &me);
  MPI_Comm_size(MPI_COMM_WORLD, &P);
  int status = 0;
  try {
    const SweepOptions o = parse_sweep(argc, argv, mode);
    if (o.help) {
      if (me == 0) std::fputs(usage, stdout);
    } else {
      status = run(o, me, P);
    }
  } catch (const std::exception& e) {
    // Option and plan errors are the same on every rank; a rank-0-only failure (csv, plot) is
    // reported there.
    if (me == 0) std::fprintf(stderr, "%s: %s\n", name, e.what());
    status = 2;
  }
  MPI_Finalize();
  return status;
}

}  // namespace uaa::bench
