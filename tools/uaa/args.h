// Command-line parsing for `uaa run` (no MPI here: every rank parses the same argv the same way).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "uaa/plan.h"
#include "uaa/types.h"

namespace uaa::cli {

// A usage error: the same on every rank, since every rank parses the same argv.
class ArgError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct RunOptions {
  std::optional<std::vector<std::int64_t>> lens, kv_lens;  // --lens, --kv-lens
  std::optional<std::int64_t> seq, kv_seq;                 // --seq, --kv-seq
  std::optional<std::int64_t> heads, kv_heads, head_dim;   // unset: default or from --load
  DType dtype = DType::f32;
  bool causal = false;
  Strategy strategy = Strategy::uaa;
  std::int64_t iters = 1;
  std::uint64_t seed = 1;
  bool check = false;
  std::string load_dir, save_dir;
  bool json = false;
  bool help = false;
};

// Parses the arguments that follow `run`. Throws ArgError.
RunOptions parse_run_args(std::span<const char* const> args);

// The usage text of `uaa run`.
const char* run_usage();

// Integer and list parsing (exposed for tests): whole-string decimal, within [lo, hi].
std::int64_t parse_int(const std::string& option, const std::string& text, std::int64_t lo,
                       std::int64_t hi);
std::vector<std::int64_t> parse_int_list(const std::string& option, const std::string& text);

// `total` tokens over `ranks` ranks as evenly as possible: the first total % ranks get one more.
std::vector<std::int64_t> even_split(std::int64_t total, int ranks);

}  // namespace uaa::cli
