#include "args.h"

#include <charconv>
#include <limits>
#include <set>
#include <tuple>

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
  --causal             causal mask (bottom-right aligned when query and key counts differ;
                       per document with --docs)
  --window L,R         sliding window (integers >= -1; -1: no bound on that side): query i sees
                       key j iff i' - L <= j <= i' + R, where i' = i + kv_len - q_len is the
                       query's position aligned to the bottom right of its document; --causal caps
                       R at 0. "-1,-1" is no window
  --strategy NAME      uaa (default), ulysses, ulysses_pad or allgather_kv (see uaa/plan.h)
Documents and batches (need --strategy uaa):
  --docs a,b,...       packed documents: the global query lengths of the documents, in order,
                       summing to the query total (0 allowed). The sequence is cut over the ranks
                       by --lens/--seq as without documents (a document may span ranks); attention
                       never crosses documents, and --causal/--window apply within each one
  --kv-docs a,b,...    key/value lengths of the same documents (cross attention; needs --docs,
                       as many values, summing to the key/value total; default: --docs)
  --batch B            B sequences per call, each cut over the ranks by the same lengths (each
                       rank holds [B][S_local][H][D]); --docs apply to every sequence (default 1,
                       or the leading dimension of 4-d --load files)
Run:
  --iters N            timed forward() calls (default 1; with N > 1 one untimed warm-up call first;
                       with --backward each is followed by a timed backward() call)
  --seed S             data seed (default 1)
  --check              compare with a single-rank run of the same plan (documents, batch,
                       window; bitwise) and a float64 reference (rank 0; per sequence and
                       document, with the window); exit status 1 if the outputs are not
                       bitwise equal, if an output value is
                       NaN/Inf where the reference is finite, or if the inputs hold NaN/Inf
                       (with --backward: the same for each of dq, dk and dv, and for dO).
                       The other ranks wait under the deadline: rank 0 works in slices of about
                       0.5 s between agreements, but its single-rank forward() (and backward())
                       is one piece
  --backward           after each forward(), run backward() (uaa/backward.h) with a gradient dO
                       of the output (deterministic from --seed, or DIR/dout.npy with --load);
                       the plan is built with return_lse. Needs --strategy uaa. Times its phases
                       ("backward" in the report); with --check, checks dq, dk and dv as the
                       output (bitwise vs a single-rank forward+backward, max_abs_err vs the
                       float64 reference backward); with --save, also writes dq/dk/dv/dout.npy
  --backward-mode M    saved (default: forward() keeps the q/k/v rows it received in a
                       SavedForward, the backward moves only dO in and dQ/dK/dV out) or
                       recompute (no SavedForward: the backward moves q/k/v rows in again)
  --backward-order O   canonical (default: gradients bitwise the single-rank run's for every
                       split) or by_rank (a head shared by two ranks is summed per rank and added
                       in rank order: no carry message; see PlanOptions::backward_order)
  --load DIR           read DIR/q.npy [Sq,Hq,D], DIR/k.npy and DIR/v.npy [Skv,Hkv,D] (float32);
                       with --backward also DIR/dout.npy [Sq,Hq,D] (required then). With a
                       batch every file has a leading B: [B,Sq,Hq,D], [B,Skv,Hkv,D] (4-d files
                       without --batch set it to their B)
  --save DIR           write DIR/q.npy, k.npy, v.npy (the inputs the kernel saw, as float32: bf16
                       values rounded) and DIR/out.npy, on rank 0; with --backward also
                       DIR/dout.npy (the dO used) and DIR/dq.npy, dk.npy, dv.npy; with
                       --batch B > 1 every file has a leading B ([B,S,H,D]). All files or
                       none: each is written to a temporary name and renamed only when all are
                       complete; DIR is checked (created, writable) before the run. When DIR is
                       the --load directory only the outputs (out.npy, and dq/dk/dv.npy) are
                       written: the inputs are never overwritten
  --json               print one JSON object on one line (rank 0, stdout)
  --help               this text

Every rank must be given the same options: the ranks agree on them first, and a rank whose
arguments are wrong or differ from rank 0's stops every rank with one error naming it.

Timings: per phase, the median over the timed calls on each rank, then the maximum over ranks
("handshake" is the call's agreement). The report names every rank's kernel and the data path of
the calls: data_path peer_memory (single-copy reads/writes of the peers' memory) or messages.
With --backward, the backward's phases (handshake, prepare, exchange_in, kernel, carry,
exchange_out, reduce, total; same median/max), its bytes sent/received per rank for the mode
(max over ranks) and Plan::saved_bytes() follow; backward() exchanges by messages.

Memory: before allocating, every rank compares what it needs (its tensors, the plan's staging,
pack/unpack buffers, with --backward the gradients, the SavedForward and an estimate of the
backward's workspace, and on rank 0 the --check/--save buffers) with what it may use: the cgroup
limit minus usage (v2 memory.max, v1 memory.limit_in_bytes) or /proc/meminfo MemAvailable, shared
by the job's ranks on the node. If a rank lacks memory, every rank stops with one error naming it.

Errors: an error every rank shares (bad or different arguments, a file, memory, the library's
checks) is printed once, by rank 0, naming the failing rank ("uaa run: rank R: <message>" for the
command's own checks), exit status 2. A deadline that passes (a rank stopped or gone;
UAA_TIMEOUT_SECONDS, default 300) or a transport failure is printed by the rank that sees it
("uaa run: rank R: ...") and ends the whole job with MPI_Abort (status 2).

Environment (per rank):
  UAA_TIMEOUT_SECONDS          deadline of every wait, in seconds (see uaa/mpi.h)
  UAA_TOOL_PROGRESS_SECONDS    rank 0 prints a progress line on stderr at most this often during
                               long runs (default 10; 0: never)
  UAA_TOOL_MEMORY_LIMIT_BYTES  the memory this rank may use, replacing the detection (for tests;
                               bytes or a K/M/G/T suffix)
  UAA_TOOL_SAVE_FAULT          write:NAME or rename:NAME makes --save fail there (for tests)
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

std::pair<std::int64_t, std::int64_t> parse_window(const std::string& option, const std::string& text) {
  const std::size_t comma = text.find(',');
  if (comma == std::string::npos || text.find(',', comma + 1) != std::string::npos)
    throw ArgError(option + ": '" + text + "' is not L,R (two integers >= -1; -1: no bound)");
  const std::string left = text.substr(0, comma), right = text.substr(comma + 1);
  if (left.empty() || right.empty()) throw ArgError(option + ": empty entry in '" + text + "'");
  auto side = [&](const std::string& item, const char* which) {
    try {
      return parse_int(option, item, -1, kMax);
    } catch (const ArgError& e) {
      throw ArgError(cat(e.what(), " (the ", which, " side of '", text, "'; -1 means no bound)"));
    }
  };
  return {side(left, "left"), side(right, "right")};
}

std::vector<std::int64_t> even_split(std::int64_t total, int ranks) {
  std::vector<std::int64_t> lens(static_cast<std::size_t>(ranks), total / ranks);
  for (std::int64_t r = 0; r < total % ranks; ++r) ++lens[static_cast<std::size_t>(r)];
  return lens;
}

std::vector<OptionValue> canonical_options(const RunOptions& o) {
  std::vector<OptionValue> out;
  auto list = [](const std::vector<std::int64_t>& v) {
    std::string t;
    for (std::size_t i = 0; i < v.size(); ++i) {
      if (i) t += ',';
      t += std::to_string(v[i]);
    }
    return t;
  };
  auto valued = [&](const char* name, bool given, std::string value) {
    out.push_back({name, false, given, given ? std::move(value) : std::string()});
  };
  auto flag = [&](const char* name, bool given) { out.push_back({name, true, given, {}}); };
  valued("--lens", o.lens.has_value(), o.lens ? list(*o.lens) : "");
  valued("--seq", o.seq.has_value(), o.seq ? std::to_string(*o.seq) : "");
  valued("--kv-lens", o.kv_lens.has_value(), o.kv_lens ? list(*o.kv_lens) : "");
  valued("--kv-seq", o.kv_seq.has_value(), o.kv_seq ? std::to_string(*o.kv_seq) : "");
  valued("--heads", o.heads.has_value(), o.heads ? std::to_string(*o.heads) : "");
  valued("--kv-heads", o.kv_heads.has_value(), o.kv_heads ? std::to_string(*o.kv_heads) : "");
  valued("--head-dim", o.head_dim.has_value(), o.head_dim ? std::to_string(*o.head_dim) : "");
  valued("--dtype", true, dtype_name(o.dtype));
  flag("--causal", o.causal);
  valued("--window", o.window_given,
         std::to_string(o.window_left) + "," + std::to_string(o.window_right));
  valued("--docs", o.docs.has_value(), o.docs ? list(*o.docs) : "");
  valued("--kv-docs", o.kv_docs.has_value(), o.kv_docs ? list(*o.kv_docs) : "");
  valued("--batch", o.batch.has_value(), o.batch ? std::to_string(*o.batch) : "");
  valued("--strategy", true, strategy_name(o.strategy));
  valued("--iters", true, std::to_string(o.iters));
  valued("--seed", true, std::to_string(o.seed));
  flag("--check", o.check);
  flag("--backward", o.backward);
  valued("--backward-mode", true, o.backward_saved ? "saved" : "recompute");
  valued("--backward-order", true,
         o.backward_order == BackwardOrder::canonical ? "canonical" : "by_rank");
  valued("--load", !o.load_dir.empty(), o.load_dir);
  valued("--save", !o.save_dir.empty(), o.save_dir);
  flag("--json", o.json);
  flag("--help", o.help);
  return out;
}

std::uint64_t options_digest(const RunOptions& o) {
  std::uint64_t h = 1469598103934665603ull;
  auto add = [&](const std::string& s) {
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  };
  for (const OptionValue& v : canonical_options(o)) {
    add(v.name);
    add(v.given ? "=" : "!");
    add(v.value);
    add("\n");
  }
  return h;
}

std::string describe_option(int rank, const OptionValue& v) {
  if (!v.given) return cat("rank ", rank, " does not give it");
  if (v.flag) return cat("rank ", rank, " gives it");
  return cat("rank ", rank, " has ", v.value);
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
    static const std::set<std::string> flags = {"--causal", "--check", "--backward", "--json"};
    static const std::set<std::string> valued = {
        "--lens",  "--seq",   "--kv-lens", "--kv-seq", "--heads",    "--kv-heads",     "--head-dim",
        "--dtype", "--iters", "--seed",    "--load",   "--save",     "--strategy", "--backward-mode",
        "--backward-order", "--docs", "--kv-docs", "--batch", "--window"};
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
    else if (name == "--backward") o.backward = true;
    else if (name == "--json") o.json = true;
    else if (name == "--lens") o.lens = parse_int_list(name, value);
    else if (name == "--kv-lens") o.kv_lens = parse_int_list(name, value);
    else if (name == "--docs") o.docs = parse_int_list(name, value);
    else if (name == "--kv-docs") o.kv_docs = parse_int_list(name, value);
    else if (name == "--batch") o.batch = parse_int(name, value, 1, 2147483647);
    else if (name == "--window") {
      std::tie(o.window_left, o.window_right) = parse_window(name, value);
      o.window_given = true;
    } else if (name == "--seq") o.seq = parse_int(name, value, 0, kMax);
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
    } else if (name == "--backward-mode") {
      if (value == "saved") o.backward_saved = true;
      else if (value == "recompute") o.backward_saved = false;
      else throw ArgError("--backward-mode: '" + value + "' is not one of saved, recompute");
    } else if (name == "--backward-order") {
      if (value == "canonical") o.backward_order = BackwardOrder::canonical;
      else if (value == "by_rank") o.backward_order = BackwardOrder::by_rank;
      else throw ArgError("--backward-order: '" + value + "' is not one of canonical, by_rank");
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
  if (seen.count("--backward-mode") && !o.backward)
    throw ArgError("--backward-mode needs --backward");
  if (seen.count("--backward-order") && !o.backward)
    throw ArgError("--backward-order needs --backward");
  if (o.kv_docs && !o.docs) throw ArgError("--kv-docs needs --docs (the query documents)");
  if (o.kv_docs && o.kv_docs->size() != o.docs->size())
    throw ArgError(cat("--kv-docs has ", o.kv_docs->size(), " value(s) but --docs has ",
                       o.docs->size(), " (one key/value length per document)"));
  if (o.backward && o.strategy != Strategy::uaa)
    throw ArgError(std::string("--backward needs --strategy uaa (backward() runs the uaa strategy "
                               "only; --strategy is ") + strategy_name(o.strategy) + ")");
  return o;
}

}  // namespace uaa::cli
