#include "args.h"

#include <charconv>
#include <limits>
#include <set>

#include "text.h"

namespace uaa::cli {
namespace {

constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max();

}  // namespace

const char* run_usage() {
  return R"(usage: mpirun -np P uaa run [options]

Runs Ulysses Anything Attention over the P ranks of MPI_COMM_WORLD on deterministic (or loaded)
data, times it, and optionally checks it.

Tokens (per rank; give --lens or --seq, or --load to split the file's tokens evenly):
  --lens a,b,...       query tokens of each rank (exactly P values, each >= 0)
  --seq N              N query tokens split as evenly as possible (first N % P ranks get one more)
  --kv-lens a,b,...    key/value tokens of each rank (default: the query lengths)
  --kv-seq N           N key/value tokens split as evenly as possible
Shape:
  --heads H            query heads (required unless --load)
  --kv-heads H         key/value heads, dividing --heads (default: --heads)
  --head-dim D         head dimension (default 128)
  --dtype f32|bf16     element type (default f32; bf16 rounds the f32 data to nearest even)
  --causal             causal mask (bottom-right aligned when query and key counts differ)
  --strategy NAME      uaa (default), ulysses, ulysses_pad or allgather_kv (see uaa/plan.h)
Run:
  --iters N            timed forward() calls (default 1; with N > 1 one untimed warm-up call first)
  --seed S             data seed (default 1)
  --check              compare with a single-rank run (bitwise) and a float64 reference; exit
                       status 1 if the outputs are not bitwise equal
  --load DIR           read DIR/q.npy [Sq,Hq,D], DIR/k.npy and DIR/v.npy [Skv,Hkv,D] (float32)
  --save DIR           write DIR/q.npy, k.npy, v.npy (inputs as float32) and DIR/out.npy
  --json               print one JSON object on one line (rank 0, stdout)
  --help               this text

Timings: per phase, the median over the timed calls on each rank, then the maximum over ranks
("handshake" is the call's agreement). The report also names the kernel and the data path of the
calls: data_path peer_memory (single-copy reads/writes of the peers' memory) or messages.
Errors print "uaa run: rank R: <message>" on stderr and exit with status 2.
)";
}

std::int64_t parse_int(const std::string& option, const std::string& text, std::int64_t lo,
                       std::int64_t hi) {
  std::int64_t v = 0;
  const char* b = text.data();
  const char* e = b + text.size();
  const auto r = std::from_chars(b, e, v);
  if (text.empty() || r.ec == std::errc::invalid_argument || r.ptr != e)
    throw ArgError(option + ": '" + text + "' is not an integer");
  if (r.ec == std::errc::result_out_of_range || v < lo || v > hi) {
    if (hi == kMax) throw ArgError(cat(option, ": ", text, " is outside [", lo, ", ...]"));
    throw ArgError(cat(option, ": ", text, " is outside [", lo, ", ", hi, "]"));
  }
  return v;
}

std::vector<std::int64_t> parse_int_list(const std::string& option, const std::string& text) {
  std::vector<std::int64_t> out;
  std::size_t start = 0;
  while (true) {
    const std::size_t comma = text.find(',', start);
    const std::string item = text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    if (item.empty()) throw ArgError(option + ": empty entry in '" + text + "'");
    out.push_back(parse_int(option, item, 0, kMax));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

std::vector<std::int64_t> even_split(std::int64_t total, int ranks) {
  std::vector<std::int64_t> lens(static_cast<std::size_t>(ranks), total / ranks);
  for (std::int64_t r = 0; r < total % ranks; ++r) ++lens[static_cast<std::size_t>(r)];
  return lens;
}

RunOptions parse_run_args(std::span<const char* const> args) {
  RunOptions o;
  std::set<std::string> seen;
  for (std::size_t i = 0; i < args.size(); ++i) {
    std::string arg = args[i];
    if (arg == "-h" || arg == "--help") {
      o.help = true;
      continue;
    }
    if (arg.rfind("--", 0) != 0)
      throw ArgError("unexpected argument '" + arg + "' (see uaa run --help)");
    std::string name = arg, value;
    bool inline_value = false;
    if (const std::size_t eq = arg.find('='); eq != std::string::npos) {
      name = arg.substr(0, eq);
      value = arg.substr(eq + 1);
      inline_value = true;
    }
    static const std::set<std::string> flags = {"--causal", "--check", "--json"};
    static const std::set<std::string> valued = {
        "--lens", "--seq",  "--kv-lens", "--kv-seq", "--heads", "--kv-heads", "--head-dim",
        "--dtype", "--iters", "--seed",  "--load",   "--save", "--strategy"};
    if (flags.count(name)) {
      if (inline_value) throw ArgError(name + " takes no value");
    } else if (valued.count(name)) {
      if (!inline_value) {
        if (i + 1 >= args.size()) throw ArgError(name + " needs a value");
        value = args[++i];
      }
    } else {
      throw ArgError("unknown option '" + name + "' (see uaa run --help)");
    }
    if (!seen.insert(name).second) throw ArgError(name + " is given more than once");

    if (name == "--causal") o.causal = true;
    else if (name == "--check") o.check = true;
    else if (name == "--json") o.json = true;
    else if (name == "--lens") o.lens = parse_int_list(name, value);
    else if (name == "--kv-lens") o.kv_lens = parse_int_list(name, value);
    else if (name == "--seq") o.seq = parse_int(name, value, 0, kMax);
    else if (name == "--kv-seq") o.kv_seq = parse_int(name, value, 0, kMax);
    else if (name == "--heads") o.heads = parse_int(name, value, 1, kMax);
    else if (name == "--kv-heads") o.kv_heads = parse_int(name, value, 1, kMax);
    else if (name == "--head-dim") o.head_dim = parse_int(name, value, 1, kMax);
    else if (name == "--iters") o.iters = parse_int(name, value, 1, 1000000);
    else if (name == "--seed") {
      std::uint64_t s = 0;
      const auto r = std::from_chars(value.data(), value.data() + value.size(), s);
      if (value.empty() || r.ec != std::errc() || r.ptr != value.data() + value.size())
        throw ArgError("--seed: '" + value + "' is not an unsigned 64-bit integer");
      o.seed = s;
    } else if (name == "--dtype") {
      if (value == "f32" || value == "float32") o.dtype = DType::f32;
      else if (value == "bf16" || value == "bfloat16") o.dtype = DType::bf16;
      else throw ArgError("--dtype: '" + value + "' is not one of f32, bf16");
    } else if (name == "--strategy") {
      if (!parse_strategy(value, &o.strategy))
        throw ArgError("--strategy: '" + value + "' is not one of uaa, ulysses, ulysses_pad, allgather_kv");
    } else if (name == "--load" || name == "--save") {
      if (value.empty()) throw ArgError(name + " needs a directory");
      (name == "--load" ? o.load_dir : o.save_dir) = value;
    }
  }
  if (o.help) return o;
  if (o.lens && o.seq) throw ArgError("give --lens or --seq, not both");
  if (o.kv_lens && o.kv_seq) throw ArgError("give --kv-lens or --kv-seq, not both");
  if (!o.lens && !o.seq && o.load_dir.empty())
    throw ArgError("give the query tokens with --lens or --seq (or --load a directory)");
  if (!o.heads && o.load_dir.empty()) throw ArgError("--heads is required (or --load a directory)");
  return o;
}

}  // namespace uaa::cli
