// Options shared by `uaa bench` (strategies, under mpirun), `uaa bench docs` (packed documents,
// under mpirun) and `uaa plan` (the cost model, no MPI): a workload (preset or explicit shape), a
// sweep of sequences and the strategies to compare.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "program/program.h"
#include "uaa/plan.h"
#include "uaa/types.h"

namespace uaa::bench {

struct SweepError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Which command the options are for: each accepts its own subset.
enum class SweepFor { bench, plan, docs };

struct SweepOptions {
  std::vector<Strategy> strategies{Strategy::uaa, Strategy::ulysses_pad, Strategy::ulysses,
                                   Strategy::allgather_kv};
  std::string preset;
  bool doc_preset = false;              // `preset` names a document preset (presets.h kDocPresets)
  std::int64_t heads = 0, kv_heads = 0, head_dim = 128;
  std::vector<std::int64_t> text_lens;  // added to the preset's image tokens
  std::vector<std::int64_t> seqs;       // explicit totals (split as evenly as possible)
  std::vector<std::int64_t> lens;       // explicit per-rank lengths (one sequence)
  // Packed documents of the (one) sequence: global lengths; kv_docs empty = the same as docs.
  // With documents the sequence is their sum, split over the ranks as evenly as possible unless
  // --lens gives the cut; key/value tokens are split evenly when their total differs.
  std::vector<std::int64_t> docs, kv_docs;
  std::int64_t batch = 1;
  std::int64_t window_left = -1, window_right = -1;  // plan.h's window; -1: no bound
  DType dtype = DType::f32;
  bool causal = false;
  int ranks = 0;                        // uaa plan: --ranks (comma list allowed via ranks_list)
  std::vector<std::int64_t> ranks_list;
  std::int64_t iters = 5, warmup = 1;
  bool json = false;
  std::string csv, plot;
  double compute_gflops = 0, exchange_gbps = 0;  // model rates (0: calibrate / default)
  bool backward = false;                // uaa bench docs: forward + backward
  std::int64_t calib_seq = 4096;        // uaa bench docs: the calibration sequence (0: none)
  bool help = false;

  bool has_docs() const { return docs.size() > 1; }
  // Documents or a batch: only the uaa strategy runs them (plan.h).
  bool uaa_only() const { return has_docs() || batch > 1; }
  bool has_window() const { return window_left >= 0 || window_right >= 0; }
};

// Parses the options after the command name. Throws SweepError.
SweepOptions parse_sweep(int argc, char** argv, SweepFor mode);

// main() of the MPI benchmarks (`uaa bench`, `uaa bench docs`): MPI up, options parsed (`usage` on
// rank 0 for --help), `run` called; an exception (option and plan errors are the same on every rank)
// is printed once as "<name>: <what>" and gives status 2.
int mpi_benchmark_main(int argc, char** argv, SweepFor mode, const char* name, const char* usage,
                       int (*run)(const SweepOptions& o, int me, int P));

// The sequence totals (or explicit lens) to run, each as per-rank lengths for `ranks` ranks.
std::vector<std::vector<std::int64_t>> sweep_lengths(const SweepOptions& o, int ranks);
// The key/value per-rank lengths that go with query lengths `q_lens`: the same, unless the key/value
// documents sum to another total (then that total split evenly).
std::vector<std::int64_t> kv_lengths(const SweepOptions& o, const std::vector<std::int64_t>& q_lens);

std::vector<std::int64_t> even_split(std::int64_t total, int ranks);

// The generators' geometry of one sequence of the workload (as detail::geometry_of builds it for a
// plan of that shape: heads over the batch, document starts when there is more than one document).
detail::Geometry geometry_for(const SweepOptions& o, const std::vector<std::int64_t>& q_lens,
                              const std::vector<std::int64_t>& kv_lens, bool with_lse = false);

// "min 8, median 175, max 8041" of a list of lengths.
std::string length_summary(const std::vector<std::int64_t>& v);
// "a,b,c".
std::string join(const std::vector<std::int64_t>& v);

extern const char* const kBenchUsage;
extern const char* const kDocsUsage;
extern const char* const kPlanUsage;

}  // namespace uaa::bench
