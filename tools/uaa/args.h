// Command-line parsing for `uaa run` (no MPI here). Every rank parses its own argv; the command then
// agrees on the result (options_digest, canonical_options) so that ranks given different arguments
// stop with one error instead of waiting for each other.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "uaa/plan.h"
#include "uaa/types.h"

namespace uaa::cli {

// A usage error of this rank's arguments (the command carries it to every rank).
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
  // --docs / --kv-docs: packed documents (global lengths, in order; uaa::Documents). kv_docs needs
  // docs; unset kv_docs: the key/value documents are the query documents.
  std::optional<std::vector<std::int64_t>> docs, kv_docs;
  std::optional<std::int64_t> batch;            // --batch B (unset: 1, or from --load)
  std::int64_t window_left = -1, window_right = -1;  // --window L,R (-1: no bound)
  bool window_given = false;
  Strategy strategy = Strategy::uaa;
  std::int64_t iters = 1;
  std::uint64_t seed = 1;
  bool check = false;
  bool backward = false;        // --backward: a backward() call after each forward()
  bool backward_saved = true;   // --backward-mode saved (true) | recompute (false)
  BackwardOrder backward_order = BackwardOrder::canonical;  // --backward-order
  std::string load_dir, save_dir;
  bool json = false;
  bool help = false;
};

// Parses the arguments that follow `run`. Throws ArgError.
RunOptions parse_run_args(std::span<const char* const> args);

// Every option in a fixed order with its effective value, for agreeing across ranks and naming
// the first difference. Options with defaults (--dtype, --strategy, --iters, --seed,
// --backward-mode) always hold their value; unset ones have given = false; flags have given = the
// flag.
struct OptionValue {
  std::string name;   // "--iters"
  bool flag = false;  // --causal, --check, --backward, --json, --help
  bool given = false;
  std::string value;  // canonical text ("1,2,3", "f32"); empty for flags and unset options
};
std::vector<OptionValue> canonical_options(const RunOptions& o);
// A 64-bit digest of canonical_options (FNV-1a of "name=value" lines).
std::uint64_t options_digest(const RunOptions& o);
// "rank 1 has 2", "rank 1 gives it", "rank 1 does not give it".
std::string describe_option(int rank, const OptionValue& v);

// The usage text of `uaa run`.
const char* run_usage();

// Integer and list parsing (exposed for tests): whole-string decimal, within [lo, hi].
std::int64_t parse_int(const std::string& option, const std::string& text, std::int64_t lo,
                       std::int64_t hi);
std::vector<std::int64_t> parse_int_list(const std::string& option, const std::string& text);
// "L,R": exactly two integers, each >= -1 (--window).
std::pair<std::int64_t, std::int64_t> parse_window(const std::string& option, const std::string& text);

// `total` tokens over `ranks` ranks as evenly as possible: the first total % ranks get one more.
std::vector<std::int64_t> even_split(std::int64_t total, int ranks);

}  // namespace uaa::cli
