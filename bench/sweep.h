// Options shared by `uaa bench` (strategies, under mpirun) and `uaa plan` (the cost model, no MPI):
// a workload (preset or explicit shape), a sweep of sequences and the strategies to compare.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "uaa/plan.h"
#include "uaa/types.h"

namespace uaa::bench {

struct SweepError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct SweepOptions {
  std::vector<Strategy> strategies{Strategy::uaa, Strategy::ulysses_pad, Strategy::ulysses,
                                   Strategy::allgather_kv};
  std::string preset;
  std::int64_t heads = 0, kv_heads = 0, head_dim = 128;
  std::vector<std::int64_t> text_lens;  // added to the preset's image tokens
  std::vector<std::int64_t> seqs;       // explicit totals (split as evenly as possible)
  std::vector<std::int64_t> lens;       // explicit per-rank lengths (one sequence)
  DType dtype = DType::f32;
  bool causal = false;
  int ranks = 0;                        // uaa plan: --ranks (comma list allowed via ranks_list)
  std::vector<std::int64_t> ranks_list;
  std::int64_t iters = 5, warmup = 1;
  bool json = false;
  std::string csv, plot;
  double compute_gflops = 0, exchange_gbps = 0;  // model rates (0: calibrate / default)
  bool help = false;
};

// Parses the options after the command name. `for_plan` selects `uaa plan`'s set. Throws SweepError.
SweepOptions parse_sweep(int argc, char** argv, bool for_plan);

// The sequence totals (or explicit lens) to run, each as per-rank lengths for `ranks` ranks.
std::vector<std::vector<std::int64_t>> sweep_lengths(const SweepOptions& o, int ranks);

std::vector<std::int64_t> even_split(std::int64_t total, int ranks);

extern const char* const kBenchUsage;
extern const char* const kPlanUsage;

}  // namespace uaa::bench
