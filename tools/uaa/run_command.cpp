// `uaa run`: builds a plan for the given layout, runs forward() over MPI_COMM_WORLD, reports phase
// timings, every rank's kernel and the data path (peer memory or messages, from uaa::last_call)
// and, with --check, compares against a single-rank run (bitwise) and a float64 reference.
// --backward follows each forward() with a backward() (saved or recompute mode) on a dO from the
// seed or DIR/dout.npy, reports its phases and bytes, and with --check compares dq/dk/dv the same
// way (a single-rank forward+backward, the float64 reference backward per kv head).
// --docs/--kv-docs (packed documents), --batch (B sequences per call, [B][S_local][H][D] on every
// rank, [B][S][H][D] files) and --window go into the plan; --check's single-rank run uses the same
// plan, and its float64 reference runs per sequence and per document with the window
// (data.h, reference_window).
//
// Failure handling (docs/FAILURE_MODEL.md, section 9):
//  - Every rank parses its own argv; the ranks then agree on a digest of the options (control.h),
//    and name the first option they disagree on. Nothing of the command waits without a deadline:
//    its only collectives are the library's agreements, all-gathers and exchanges.
//  - Every step that can fail on some ranks only (reading files, the memory check, allocations,
//    the rank-0 work of --check/--save) ends with an agreement, so all ranks stop together with
//    the failing rank's message, printed once by rank 0. A timeout or transport failure is printed
//    by the rank that has it and aborts the job (MPI_Abort).
//  - Before allocating, every rank compares the memory it needs with what it may use (memory.h).
//  - --save writes all files or none (save.h).
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <deque>
#include <filesystem>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "args.h"
#include "commands.h"
#include "control.h"
#include "data.h"
#include "json.h"
#include "kernels/kernel.h"
#include "memory.h"
#include "npy.h"
#include "progress.h"
#include "save.h"
#include "text.h"
#include "uaa/mpi.h"
#include "uaa/uaa.h"

namespace uaa::cli {
namespace {

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

std::string list_text(const std::vector<std::int64_t>& v) {
  std::string s = "[";
  for (std::size_t i = 0; i < v.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(v[i]);
  }
  return s + "]";
}

std::int64_t mul(std::int64_t a, std::int64_t b, const char* what) {
  if (a != 0 && b > std::numeric_limits<std::int64_t>::max() / a)
    throw ArgError(std::string(what) + " overflows 64 bits");
  return a * b;
}

std::int64_t sum_of(const std::vector<std::int64_t>& v, const char* what) {
  std::int64_t s = 0;
  for (std::int64_t x : v) {
    if (x > std::numeric_limits<std::int64_t>::max() - s)
      throw ArgError(std::string(what) + " sum overflows 64 bits");
    s += x;
  }
  return s;
}

// [batch][tokens][heads][dim] host tensor of f32 or bf16 elements (batch 1: [tokens][heads][dim]).
// Its views are contiguous: sequence b at b * tokens rows (the library's default batch stride).
struct HostTensor {
  DType dtype = DType::f32;
  std::int64_t batch = 1, tokens = 0, heads = 0, dim = 0;
  std::vector<float> storage;  // float-aligned bytes

  HostTensor() = default;
  HostTensor(DType dt, std::int64_t t, std::int64_t h, std::int64_t d, std::int64_t b = 1)
      : dtype(dt), batch(b), tokens(t), heads(h), dim(d) {
    storage.resize(static_cast<std::size_t>((bytes() + 3) / 4));
  }
  std::int64_t row_elements() const { return heads * dim; }
  std::int64_t elements() const { return batch * tokens * heads * dim; }
  std::int64_t bytes() const { return elements() * static_cast<std::int64_t>(dtype_size(dtype)); }
  std::int64_t row_bytes() const { return row_elements() * static_cast<std::int64_t>(dtype_size(dtype)); }
  void* data() { return storage.data(); }
  const void* data() const { return storage.data(); }
  ConstTensor view() const { return contiguous(data(), tokens, heads, dim, dtype); }
  Tensor view() { return contiguous(data(), tokens, heads, dim, dtype); }
  const float* f32() const { return dtype == DType::f32 ? storage.data() : nullptr; }
};

// The resolved run: shape, lengths and where the data comes from.
struct Setup {
  std::int64_t heads = 0, kv_heads = 0, head_dim = 0;
  std::vector<std::int64_t> lens, kv_lens;
  std::int64_t q_total = 0, kv_total = 0;  // of one sequence of the batch
  std::int64_t batch = 1;                    // --batch (or the files' leading dimension)
  Documents docs;                            // --docs/--kv-docs; empty: none
  bool from_files = false;
  std::string paths[4];  // by TensorId: q, k, v, and dout (--backward only)
  npy::Header headers[4];
  // The files as [batch * tokens][heads][dim] (the same bytes; read_rows of row b * tokens + t).
  npy::Header flat[4];
  // --save (decided on rank 0): the files written; only the outputs (out.npy, and with --backward
  // dq/dk/dv.npy) when --save is the --load dir.
  std::vector<std::string> save_names;
  bool save_outputs_only = false;
};

Setup resolve(const RunOptions& o, int ranks) {
  Setup s;
  std::int64_t file_q = -1, file_kv = -1;
  if (!o.load_dir.empty()) {
    s.from_files = true;
    const char* names[3] = {"q.npy", "k.npy", "v.npy"};
    // [tokens, heads, head_dim], or [batch, tokens, heads, head_dim] (all files alike).
    std::vector<std::int64_t> dims[3];
    for (int t = 0; t < 3; ++t) {
      s.paths[t] = (std::filesystem::path(o.load_dir) / names[t]).string();
      s.headers[t] = npy::read_header(s.paths[t]);
      const auto& sh = s.headers[t].shape;
      if (sh.size() != 3 && sh.size() != 4)
        throw ArgError(cat(s.paths[t], ": shape ", npy::shape_string(sh),
                           " is not [tokens, heads, head_dim] or [batch, tokens, heads, head_dim]"));
      if (sh.size() != s.headers[0].shape.size())
        throw ArgError(cat(s.paths[t], ": shape ", npy::shape_string(sh), " has ", sh.size(),
                           " dimensions but q.npy's ", npy::shape_string(s.headers[0].shape), " has ",
                           s.headers[0].shape.size(), " (give every file a leading batch, or none)"));
      if (sh.size() == 4 && sh[0] != s.headers[0].shape[0])
        throw ArgError(cat(s.paths[t], ": batch ", sh[0], " (shape ", npy::shape_string(sh),
                           ") differs from q.npy's ", s.headers[0].shape[0]));
      dims[t].assign(sh.end() - 3, sh.end());
    }
    const std::vector<std::int64_t>& q0 = s.headers[0].shape;
    const std::int64_t file_batch = q0.size() == 4 ? q0[0] : 1;
    if (q0.size() == 4 && file_batch < 1)
      throw ArgError(cat(s.paths[0], ": shape ", npy::shape_string(q0), " holds a batch of 0 sequences"));
    if (o.batch && *o.batch != file_batch) {
      if (q0.size() == 3)
        throw ArgError(cat("--batch ", *o.batch, " but ", s.paths[0], " has shape ", npy::shape_string(q0),
                           " (a batch needs [batch, tokens, heads, head_dim] files)"));
      throw ArgError(cat("--batch ", *o.batch, " but ", s.paths[0], " has shape ", npy::shape_string(q0),
                         " (batch ", file_batch, ")"));
    }
    s.batch = file_batch;
    const auto& q = dims[0];
    const auto& k = dims[1];
    if (s.headers[1].shape != s.headers[2].shape)
      throw ArgError(cat(s.paths[2], ": shape ", npy::shape_string(s.headers[2].shape),
                         " differs from k.npy's ", npy::shape_string(s.headers[1].shape)));
    if (k[2] != q[2])
      throw ArgError(cat(s.paths[1], ": head_dim ", k[2], " differs from q.npy's ", q[2]));
    auto agree_flag = [](const char* flag, const std::optional<std::int64_t>& given,
                         std::int64_t file, const std::string& what) {
      if (given && *given != file)
        throw ArgError(cat(flag, " ", *given, " but ", what, " ", file));
    };
    agree_flag("--heads", o.heads, q[1], s.paths[0] + " has heads");
    agree_flag("--kv-heads", o.kv_heads, k[1], s.paths[1] + " has heads");
    agree_flag("--head-dim", o.head_dim, q[2], s.paths[0] + " has head_dim");
    if (o.backward) {
      // dO of the backward: required, the shape of q.npy.
      s.paths[kDout] = (std::filesystem::path(o.load_dir) / "dout.npy").string();
      const std::string need = cat("--backward with --load needs ", s.paths[kDout],
                                   s.batch > 1 || q0.size() == 4
                                       ? " (dO, the gradient of out: float32 [B, Sq, Hq, D] like q.npy)"
                                       : " (dO, the gradient of out: float32 [Sq, Hq, D] like q.npy)");
      try {
        s.headers[kDout] = npy::read_header(s.paths[kDout]);
      } catch (const Error& e) {
        throw ArgError(cat(need, ": ", e.what()));
      }
      if (s.headers[kDout].shape != q0)
        throw ArgError(cat(need, ": its shape ", npy::shape_string(s.headers[kDout].shape),
                           " differs from q.npy's ", npy::shape_string(q0)));
    }
    s.heads = q[1];
    s.kv_heads = k[1];
    s.head_dim = q[2];
    file_q = q[0];
    file_kv = k[0];
  } else {
    s.heads = *o.heads;
    s.kv_heads = o.kv_heads.value_or(s.heads);
    s.head_dim = o.head_dim.value_or(128);
    s.batch = o.batch.value_or(1);
  }
  for (int t = 0; t < 4; ++t) {
    if (s.paths[t].empty()) continue;
    s.flat[t] = s.headers[t];
    if (s.flat[t].shape.size() == 4)
      s.flat[t].shape = {s.flat[t].shape[0] * s.flat[t].shape[1], s.flat[t].shape[2], s.flat[t].shape[3]};
  }
  if (o.docs) {
    s.docs.q = *o.docs;
    if (o.kv_docs) s.docs.kv = *o.kv_docs;  // else the same as q (the library's convention)
  }

  const std::string nranks = std::to_string(ranks) + (ranks == 1 ? " rank" : " ranks");
  if (o.lens) {
    if (static_cast<std::int64_t>(o.lens->size()) != ranks)
      throw ArgError(cat("--lens has ", o.lens->size(), " value(s) ", list_text(*o.lens),
                         " but there are ", nranks, " (give one length per rank)"));
    s.lens = *o.lens;
  } else {
    s.lens = even_split(o.seq ? *o.seq : file_q, ranks);
  }
  s.q_total = sum_of(s.lens, "--lens");
  if (s.from_files && s.q_total != file_q)
    throw ArgError(cat("the query lengths sum to ", s.q_total, " but ", s.paths[0], " has ",
                       file_q, " tokens"));

  if (o.kv_lens) {
    if (static_cast<std::int64_t>(o.kv_lens->size()) != ranks)
      throw ArgError(cat("--kv-lens has ", o.kv_lens->size(), " value(s) ", list_text(*o.kv_lens),
                         " but there are ", nranks, " (give one length per rank)"));
    s.kv_lens = *o.kv_lens;
  } else if (o.kv_seq) {
    s.kv_lens = even_split(*o.kv_seq, ranks);
  } else if (s.from_files && file_kv != s.q_total) {
    s.kv_lens = even_split(file_kv, ranks);
  } else {
    s.kv_lens = s.lens;
  }
  s.kv_total = sum_of(s.kv_lens, "--kv-lens");
  if (s.from_files && s.kv_total != file_kv)
    throw ArgError(cat("the key/value lengths sum to ", s.kv_total, " but ", s.paths[1], " has ",
                       file_kv, " tokens"));

  // Every buffer size must fit in 64 bits (in bytes, the widest element being 8 for --check).
  const std::int64_t q_row = mul(mul(s.heads, s.head_dim, "heads * head_dim"), 8, "a token row");
  const std::int64_t kv_row = mul(mul(s.kv_heads, s.head_dim, "kv_heads * head_dim"), 8, "a token row");
  mul(mul(s.q_total, s.batch, "batch * query tokens"), q_row, "the query tensor size");
  mul(mul(s.kv_total, s.batch, "batch * key/value tokens"), kv_row, "the key/value tensor size");
  return s;
}

// rank 0: checks the --save directory before anything runs, and decides what to write.
void prepare_save(const RunOptions& o, Setup& s) {
  if (o.save_dir.empty()) return;
  std::error_code ec;
  std::filesystem::create_directories(o.save_dir, ec);  // errors: prepare_dir says
  s.save_outputs_only =
      !o.load_dir.empty() && std::filesystem::equivalent(o.load_dir, o.save_dir, ec) && !ec;
  s.save_names.clear();
  if (!s.save_outputs_only) {
    s.save_names = {"q.npy", "k.npy", "v.npy"};
    if (o.backward) s.save_names.push_back("dout.npy");
  }
  s.save_names.push_back("out.npy");
  if (o.backward)
    for (const char* n : {"dq.npy", "dk.npy", "dv.npy"}) s.save_names.push_back(n);
  AtomicSave::prepare_dir(o.save_dir, s.save_names);
}

// Fills rows [at, at + n) of `dst` (rows counted over its whole storage, sequence after sequence)
// with tokens [first, first + n) of sequence b of tensor t (kQ, kK, kV, kDout), and the same values
// as float32 (bf16-rounded for bf16) into f32_copy + at * row, when given. Generated data: sequence
// b holds the generator's tokens [b * total, (b + 1) * total) (batch 1: as without a batch).
void fill_rows(const Setup& s, const RunOptions& o, int t, std::int64_t b, std::int64_t first,
               std::int64_t n, HostTensor& dst, std::int64_t at, float* f32_copy) {
  const std::int64_t row = dst.row_elements();
  const std::int64_t base_token = b * (t == kQ || t == kDout ? s.q_total : s.kv_total);
  auto produce = [&](std::int64_t tok, std::int64_t count, float* out) {
    if (s.from_files)
      npy::read_rows(s.paths[t], s.flat[t], base_token + tok, count, out);
    else
      generate(o.seed, t, base_token + tok, count, dst.heads, dst.dim, out);
  };
  if (dst.dtype == DType::f32) {
    produce(first, n, dst.storage.data() + at * row);
    return;
  }
  // bf16: through a bounded f32 buffer.
  const std::int64_t chunk = std::max<std::int64_t>(1, (std::int64_t{1} << 20) / std::max<std::int64_t>(row, 1));
  std::vector<float> buf;
  auto* p = static_cast<std::uint16_t*>(dst.data());
  for (std::int64_t a = 0; a < n; a += chunk) {
    const std::int64_t c = std::min(chunk, n - a);
    buf.resize(static_cast<std::size_t>(c * row));
    produce(first + a, c, buf.data());
    const std::int64_t base = (at + a) * row;
    for (std::int64_t i = 0; i < c * row; ++i) {
      p[base + i] = bf16_from_f32(buf[static_cast<std::size_t>(i)]);
      if (f32_copy) f32_copy[base + i] = f32_from_bf16(p[base + i]);
    }
  }
}

std::int64_t first_token(const std::vector<std::int64_t>& lens, int rank) {
  std::int64_t f = 0;
  for (int r = 0; r < rank; ++r) f += lens[static_cast<std::size_t>(r)];
  return f;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

constexpr int kPhases = 8;
constexpr const char* kPhaseNames[kPhases] = {"plan",         "handshake", "pack",   "exchange_qkv",
                                              "attention",    "exchange_out", "unpack", "total"};

// What every rank reports to the others at the end (one all-gather).
struct RankRecord {
  double ms[kPhases];
  std::int64_t bytes_sent;
  std::int32_t peer_memory;
  char kernel[52];
};
static_assert(sizeof(RankRecord) == 128);

// --backward: the phases of BackwardTimes, and what every rank reports of them (one all-gather).
constexpr int kBackwardPhases = 8;
constexpr const char* kBackwardPhaseNames[kBackwardPhases] = {
    "handshake", "prepare", "exchange_in", "kernel", "carry", "exchange_out", "reduce", "total"};
struct BackwardRecord {
  double ms[kBackwardPhases];
  std::int64_t bytes_sent, bytes_received, saved_bytes;
  char kernel[40];
};
static_assert(sizeof(BackwardRecord) == 128);

// Vote flags of the rank-0 work of --check/--save (only rank 0 sets them).
constexpr std::uint16_t kMoreWork = 1;
constexpr std::uint16_t kNotBitwise = 2;
constexpr std::uint16_t kNonFiniteOutput = 4;
constexpr std::uint16_t kNonFiniteInput = 8;
constexpr std::uint16_t kGradientNotBitwise = 16;
constexpr std::uint16_t kNonFiniteGradient = 32;
constexpr std::uint16_t kCheckFailed = kNotBitwise | kNonFiniteOutput | kNonFiniteInput |
                                       kGradientNotBitwise | kNonFiniteGradient;

// Rank 0 runs its --check/--save work in slices of about this long, agreeing with the others in
// between, so that nobody waits on it for longer than a slice (the deadline holds).
constexpr double kSliceSeconds = 0.5;
// Elements per piece of the rank-0 work (filling, writing).
constexpr std::int64_t kPieceElements = std::int64_t{1} << 22;
// Bytes of float64 reference rows computed at once.
constexpr std::int64_t kReferenceBytes = std::int64_t{64} << 20;

// --check of one gradient (--backward): dq, dk or dv.
struct GradientCheck {
  bool bitwise_equal = false;       // with the single-rank forward+backward
  // --backward-order by_rank with a head shared by two ranks: dk/dv are not the single-rank bits
  // (documented), so bitwise_equal is reported but not required.
  bool bitwise_expected = true;
  double max_abs_err = 0;           // vs the float64 reference backward, over the finite elements
  std::int64_t compared = 0;
  std::int64_t nonfinite = 0;       // NaN/Inf where the reference is finite
  std::string first_nonfinite;      // "token 3, head 0, dim 5: nan (reference 0.25)"
  bool passed() const { return (bitwise_equal || !bitwise_expected) && nonfinite == 0; }
};
constexpr int kGradients = 3;
constexpr const char* kGradientNames[kGradients] = {"dq", "dk", "dv"};

struct CheckResult {
  bool bitwise_equal = false;
  double max_abs_err = 0;           // over the elements finite in both the output and the reference
  std::int64_t compared = 0;        // those elements
  std::int64_t nonfinite_outputs = 0;  // output NaN/Inf where the reference is finite
  std::string first_nonfinite_output;  // "token 3, head 0, dim 5: nan (reference 0.25)"
  std::int64_t nonfinite_inputs = 0;   // q, k, v (and dout with --backward)
  std::string first_nonfinite_input;   // "q token 0, head 0, dim 5: nan"
  bool backward = false;
  GradientCheck gradients[kGradients];  // --backward: dq, dk, dv
  bool forward_passed() const { return bitwise_equal && nonfinite_outputs == 0 && nonfinite_inputs == 0; }
  bool backward_passed() const {
    for (const GradientCheck& g : gradients)
      if (!g.passed()) return false;
    return nonfinite_inputs == 0;
  }
  bool passed() const { return forward_passed() && (!backward || backward_passed()); }
};

// "token 3, head 0, dim 5" of element `index` of a [batch][tokens][heads][dim] tensor ("sequence 1,
// token 3, ..." when batch > 1).
std::string position(std::int64_t index, std::int64_t heads, std::int64_t dim, std::int64_t tokens,
                     std::int64_t batch) {
  const std::int64_t row = heads * dim;
  std::int64_t token = index / row;
  std::string seq;
  if (batch > 1 && tokens > 0) {
    seq = cat("sequence ", token / tokens, ", ");
    token %= tokens;
  }
  return cat(seq, "token ", token, ", head ", (index % row) / dim, ", dim ", index % dim);
}

std::string float_text(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.6g", v);
  return buf;
}

// A queue of bounded pieces of rank-local work, run in slices of about kSliceSeconds between
// agreements (run_sliced), so that no rank waits on another for longer than a slice: the deadline
// holds however long the whole work takes.
class Tasks {
 public:
  void add(std::string what, std::function<void()> f) { q_.emplace_back(std::move(what), std::move(f)); }
  bool done() const { return q_.empty(); }
  // Runs tasks for about kSliceSeconds (at least one).
  void run_slice(Progress& progress) {
    const auto t0 = Clock::now();
    while (!q_.empty()) {
      progress.set(q_.front().first);
      q_.front().second();
      q_.pop_front();
      if (std::chrono::duration<double>(Clock::now() - t0).count() > kSliceSeconds) break;
    }
  }

 private:
  std::deque<std::pair<std::string, std::function<void()>>> q_;
};

// Runs every rank's tasks, one agreement per slice, until no rank has any left. A task that throws
// stops every rank with its error. Returns the OR over ranks of `final_flags()` (called once a
// rank's tasks are done).
std::uint16_t run_sliced(ToolControl& ctl, const char* step, Tasks& tasks, Progress& progress,
                         const std::function<std::uint16_t()>& final_flags) {
  for (;;) {
    std::uint16_t flags = 0;
    const detail::Verdict v = ctl.local_step(step, [&] {
      tasks.run_slice(progress);
      flags = tasks.done() ? final_flags() : kMoreWork;
    }, &flags);
    if (!(v.flags & kMoreWork)) return v.flags;
  }
}

// Whether rank 0 builds the whole inputs: for --check, and for --save unless only the outputs are
// saved.
bool rank0_needs_inputs(const RunOptions& o, const Setup& s) {
  return o.check || (!o.save_dir.empty() && !s.save_outputs_only);
}

// What rank 0 gathers of every rank for --check/--save: the output and (--backward) the gradients.
struct Gathered {
  HostTensor out, dq, dk, dv;
};

// One piece of the float64 reference backward of --check: about this many (query row, q head, key,
// dim) steps, each a handful of multiply-adds (about 0.5 s at most).
constexpr double kReferenceBackwardWork = 5e7;

// Query rows per piece of the float64 reference backward of one kv head (`group` q heads).
std::int64_t reference_backward_rows(const Setup& s) {
  const std::int64_t group = s.heads / std::max<std::int64_t>(s.kv_heads, 1);
  const std::int64_t row = std::max<std::int64_t>(group * s.head_dim, 1);
  const std::int64_t by_bytes = std::max<std::int64_t>(1, kReferenceBytes / (row * 8));
  const std::int64_t by_work = std::max<std::int64_t>(
      1, static_cast<std::int64_t>(kReferenceBackwardWork /
                                   (static_cast<double>(row) *
                                    static_cast<double>(std::max<std::int64_t>(s.kv_total, 1)))));
  return std::min(by_bytes, by_work);
}

// Rank 0's part of --check/--save, as a queue of bounded tasks.
class Rank0Work {
 public:
  Rank0Work(const RunOptions& o, const Setup& s, const AttentionShape& shape, Gathered& gathered,
            std::optional<Plan>& single)
      : o_(o), s_(s), shape_(shape), g_(gathered), single_plan_(single) {
    const bool bf16 = o.dtype == DType::bf16;
    const bool need_inputs = rank0_needs_inputs(o, s);
    const bool bwd = o.backward;
    add("allocating the whole inputs", [this, bf16, need_inputs, bwd] {
      if (need_inputs) {
        q_ = HostTensor(o_.dtype, s_.q_total, s_.heads, s_.head_dim, s_.batch);
        k_ = HostTensor(o_.dtype, s_.kv_total, s_.kv_heads, s_.head_dim, s_.batch);
        v_ = HostTensor(o_.dtype, s_.kv_total, s_.kv_heads, s_.head_dim, s_.batch);
        if (bwd) dout_ = HostTensor(o_.dtype, s_.q_total, s_.heads, s_.head_dim, s_.batch);
      }
      if (bf16) {
        qf_.resize(static_cast<std::size_t>(q_.elements()));
        kf_.resize(static_cast<std::size_t>(k_.elements()));
        vf_.resize(static_cast<std::size_t>(v_.elements()));
        doutf_.resize(static_cast<std::size_t>(dout_.elements()));
        of_.resize(static_cast<std::size_t>(g_.out.elements()));
        dqf_.resize(static_cast<std::size_t>(g_.dq.elements()));
        dkf_.resize(static_cast<std::size_t>(g_.dk.elements()));
        dvf_.resize(static_cast<std::size_t>(g_.dv.elements()));
      }
    });
    const std::pair<HostTensor*, std::vector<float>*> inputs[4] = {
        {&q_, &qf_}, {&k_, &kf_}, {&v_, &vf_}, {&dout_, &doutf_}};
    const char* names[4] = {"q", "k", "v", "dout"};
    for (int t = 0; t < (bwd ? 4 : 3) && need_inputs; ++t) {
      const bool q_like = t == kQ || t == kDout;
      const std::int64_t tokens = q_like ? s.q_total : s.kv_total;
      const std::int64_t row = (q_like ? s.heads : s.kv_heads) * s.head_dim;
      const std::int64_t step = std::max<std::int64_t>(1, kPieceElements / std::max<std::int64_t>(row, 1));
      for (std::int64_t b = 0; b < s.batch; ++b)
        for (std::int64_t a = 0; a < tokens; a += step) {
          const std::int64_t n = std::min(step, tokens - a);
          add(cat("preparing the whole ", names[t], " (", s.batch > 1 ? cat("sequence ", b, ", ") : "",
                  "tokens ", a, "-", a + n, " of ", tokens, ")"),
              [this, t, b, a, n, tokens, bf16, inputs] {
                fill_rows(s_, o_, t, b, a, n, *inputs[t].first, b * tokens + a,
                          bf16 ? inputs[t].second->data() : nullptr);
              });
        }
    }
    if (bf16) {
      add("converting the outputs to float32", [this] {
        const std::pair<const HostTensor*, std::vector<float>*> outs[4] = {
            {&g_.out, &of_}, {&g_.dq, &dqf_}, {&g_.dk, &dkf_}, {&g_.dv, &dvf_}};
        for (const auto& [t, f] : outs) {
          const auto* p = static_cast<const std::uint16_t*>(t->data());
          for (std::size_t i = 0; i < f->size(); ++i) (*f)[i] = f32_from_bf16(p[i]);
        }
      });
    }
    if (!o.save_dir.empty()) add_save();
    if (o.check) add_check();
  }

  Tasks& tasks() { return tasks_; }

  const CheckResult& result() const { return result_; }
  // by_rank order with a shared head: dk and dv need not be the single-rank bits.
  void relax_kv_gradients() {
    result_.gradients[1].bitwise_expected = result_.gradients[2].bitwise_expected = false;
  }
  std::uint16_t result_flags() const {
    std::uint16_t f = 0;
    if (!o_.check) return f;
    if (!result_.bitwise_equal) f |= kNotBitwise;
    if (result_.nonfinite_outputs) f |= kNonFiniteOutput;
    if (result_.nonfinite_inputs) f |= kNonFiniteInput;
    if (o_.backward)
      for (const GradientCheck& g : result_.gradients) {
        if (!g.bitwise_equal && g.bitwise_expected) f |= kGradientNotBitwise;
        if (g.nonfinite) f |= kNonFiniteGradient;
      }
    return f;
  }

 private:
  void add(std::string what, std::function<void()> f) { tasks_.add(std::move(what), std::move(f)); }

  static const float* f32_of(const HostTensor& t, const std::vector<float>& copy) {
    return t.f32() ? t.f32() : copy.data();
  }
  const float* qf() const { return f32_of(q_, qf_); }
  const float* kf() const { return f32_of(k_, kf_); }
  const float* vf() const { return f32_of(v_, vf_); }
  const float* doutf() const { return f32_of(dout_, doutf_); }
  const float* of() const { return f32_of(g_.out, of_); }
  const float* gradf(int i) const {
    return i == 0 ? f32_of(g_.dq, dqf_) : i == 1 ? f32_of(g_.dk, dkf_) : f32_of(g_.dv, dvf_);
  }

  // The float32 values saved as `name`.
  const float* save_data(const std::string& name) const {
    if (name == "q.npy") return qf();
    if (name == "k.npy") return kf();
    if (name == "v.npy") return vf();
    if (name == "dout.npy") return doutf();
    if (name == "dq.npy") return gradf(0);
    if (name == "dk.npy") return gradf(1);
    if (name == "dv.npy") return gradf(2);
    return of();
  }

  void add_save() {
    saver_ = std::make_unique<AtomicSave>(o_.save_dir);
    // [Sq, Hq, D]: q, out, dout, dq; [Skv, Hkv, D]: k, v, dk, dv; with a batch B > 1 a leading B.
    const std::int64_t B = s_.batch;
    const std::vector<std::int64_t> qs = B > 1 ? std::vector<std::int64_t>{B, s_.q_total, s_.heads, s_.head_dim}
                                               : std::vector<std::int64_t>{s_.q_total, s_.heads, s_.head_dim};
    const std::vector<std::int64_t> ks = B > 1 ? std::vector<std::int64_t>{B, s_.kv_total, s_.kv_heads, s_.head_dim}
                                               : std::vector<std::int64_t>{s_.kv_total, s_.kv_heads, s_.head_dim};
    for (const std::string& name : s_.save_names) {
      const bool is_q_shape = name == "q.npy" || name == "out.npy" || name == "dout.npy" || name == "dq.npy";
      const std::vector<std::int64_t>& shape = is_q_shape ? qs : ks;
      std::int64_t total = 1;
      for (std::int64_t d : shape) total *= d;
      auto index = std::make_shared<int>(-1);
      add(cat("--save: writing ", name), [this, name, index, shape] {
        *index = saver_->open(name, std::span<const std::int64_t>(shape));
      });
      for (std::int64_t a = 0; a < total; a += kPieceElements) {
        const std::int64_t n = std::min(kPieceElements, total - a);
        add(cat("--save: writing ", name, " (", a, "-", a + n, " of ", total, " values)"),
            [this, index, name, a, n] { saver_->write(*index, save_data(name) + a, n); });
      }
    }
    add("--save: renaming the files", [this] { saver_->commit(); });
  }

  static bool same_bytes(const HostTensor& a, const HostTensor& b) {
    return a.bytes() == b.bytes() &&
           (a.bytes() == 0 ||
            std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.bytes())) == 0);
  }

  void add_check() {
    const bool bwd = o_.backward;
    result_.backward = bwd;
    // The documents of one sequence (one document of the totals when none were given): starts.
    const Documents& docs = single_plan_->documents();
    q_doc_start_.assign(1, 0);
    kv_doc_start_.assign(1, 0);
    for (std::size_t d = 0; d < docs.q.size(); ++d) {
      q_doc_start_.push_back(q_doc_start_.back() + docs.q[d]);
      kv_doc_start_.push_back(kv_doc_start_.back() + docs.kv[d]);
    }
    add("--check: checking that the inputs are finite", [this, bwd] {
      const std::pair<const float*, std::int64_t> ts[4] = {{qf(), q_.elements()},
                                                           {kf(), k_.elements()},
                                                           {vf(), v_.elements()},
                                                           {doutf(), dout_.elements()}};
      const char* names[4] = {"q", "k", "v", "dout"};
      for (int t = 0; t < (bwd ? 4 : 3); ++t) {
        const bool q_like = t == kQ || t == kDout;
        const std::int64_t heads = q_like ? s_.heads : s_.kv_heads;
        const std::int64_t tokens = q_like ? s_.q_total : s_.kv_total;
        for (std::int64_t i = 0; i < ts[t].second; ++i) {
          if (std::isfinite(ts[t].first[i])) continue;
          if (result_.nonfinite_inputs++ == 0)
            result_.first_nonfinite_input =
                cat(names[t], " ", position(i, heads, s_.head_dim, tokens, s_.batch), ": ",
                    float_text(ts[t].first[i]));
        }
      }
    });
    // The single-rank run: forward() and (--backward) backward() are one piece each.
    add("--check: the single-rank forward()", [this, bwd] {
      const Plan& plan = *single_plan_;
      single_out_ = HostTensor(o_.dtype, s_.q_total, s_.heads, s_.head_dim, s_.batch);
      if (bwd) single_lse_.assign(static_cast<std::size_t>(s_.batch * s_.q_total * s_.heads), 0.0f);
      AttentionArgs a;
      a.q = q_.view();
      a.k = k_.view();
      a.v = v_.view();
      a.out = single_out_.view();
      a.lse = bwd ? single_lse_.data() : nullptr;
      single_ws_ = std::make_unique<Workspace>();
      if (bwd && o_.backward_saved) {
        single_saved_ = std::make_unique<SavedForward>();
        forward(plan, a, *single_ws_, *single_saved_);
      } else {
        forward(plan, a, *single_ws_);
      }
      result_.bitwise_equal = same_bytes(single_out_, g_.out);
      if (!bwd) {
        single_out_ = HostTensor();
        single_ws_.reset();
      }
    });
    if (bwd) {
      add("--check: the single-rank backward()", [this] {
        const Plan& plan = *single_plan_;
        HostTensor dq(o_.dtype, s_.q_total, s_.heads, s_.head_dim, s_.batch);
        HostTensor dk(o_.dtype, s_.kv_total, s_.kv_heads, s_.head_dim, s_.batch);
        HostTensor dv(o_.dtype, s_.kv_total, s_.kv_heads, s_.head_dim, s_.batch);
        BackwardArgs b;
        b.q = q_.view();
        b.k = k_.view();
        b.v = v_.view();
        b.out = std::as_const(single_out_).view();
        b.lse = single_lse_.data();
        b.dout = dout_.view();
        b.dq = dq.view();
        b.dk = dk.view();
        b.dv = dv.view();
        if (single_saved_)
          backward(plan, b, *single_ws_, *single_saved_);
        else
          backward(plan, b, *single_ws_);
        result_.gradients[0].bitwise_equal = same_bytes(dq, g_.dq);
        result_.gradients[1].bitwise_equal = same_bytes(dk, g_.dk);
        result_.gradients[2].bitwise_equal = same_bytes(dv, g_.dv);
        single_out_ = HostTensor();
        single_lse_ = std::vector<float>();
        single_saved_.reset();
        single_ws_.reset();
      });
    }
    const std::int64_t row = s_.heads * s_.head_dim;
    // Rows per piece: at most kReferenceBytes of float64 output and about 2e8 multiply-adds.
    const std::int64_t by_bytes = std::max<std::int64_t>(1, kReferenceBytes / std::max<std::int64_t>(row * 8, 1));
    const std::int64_t by_work = std::max<std::int64_t>(
        1, static_cast<std::int64_t>(2e8 / (static_cast<double>(std::max<std::int64_t>(row, 1)) *
                                            static_cast<double>(std::max<std::int64_t>(s_.kv_total, 1)))));
    const std::int64_t step = std::min(by_bytes, by_work);
    for (std::int64_t bi = 0; bi < s_.batch; ++bi)
      for (std::int64_t a = 0; a < s_.q_total; a += step) {
        const std::int64_t b = std::min(s_.q_total, a + step);
        add(cat("--check: float64 reference, ", s_.batch > 1 ? cat("sequence ", bi, ", ") : "",
                "query rows ", a, "-", b, " of ", s_.q_total),
            [this, bi, a, b, row] { reference_rows(bi, a, b, row); });
      }
    if (bwd) add_backward_reference();
  }

  // The pieces of rows [a, b) of one sequence that lie in one document each: calls
  // f(first query row of the document, its q length, first key of the document, its kv length,
  // the piece's rows [ra, rb) within the document).
  template <typename F>
  void for_each_document_piece(std::int64_t a, std::int64_t b, F&& f) const {
    const std::size_t n = q_doc_start_.size() - 1;
    // The first document that ends after a (empty documents before it hold no row).
    std::size_t d = static_cast<std::size_t>(
        std::upper_bound(q_doc_start_.begin() + 1, q_doc_start_.end(), a) - (q_doc_start_.begin() + 1));
    for (; d < n && q_doc_start_[d] < b; ++d) {
      const std::int64_t qs = q_doc_start_[d], ql = q_doc_start_[d + 1] - qs;
      const std::int64_t ks = kv_doc_start_[d], kl = kv_doc_start_[d + 1] - ks;
      const std::int64_t ra = std::max(a, qs) - qs, rb = std::min(b, qs + ql) - qs;
      if (rb > ra) f(qs, ql, ks, kl, ra, rb);
    }
  }

  ReferenceWindow window_of(std::int64_t ra, std::int64_t rb, std::int64_t ql, std::int64_t kl) const {
    const ReferenceWindow w = reference_window(ra, rb, ql, kl, shape_.causal, shape_.window_left,
                                               shape_.window_right);
    if ((w.keys > 0 && ((shape_.window_left >= 0 && w.window_left < 0) ||
                        (w.window_right < 0 && (shape_.causal || shape_.window_right >= 0)))) ||
        w.key_first < 0 || w.key_first + w.keys > kl)
      throw Error(ErrorCode::internal,
                  cat("--check: the reference window of rows ", ra, "-", rb, " of a document of ",
                      ql, " queries and ", kl, " keys came out wrong (internal error)"));
    return w;
  }

  // The float64 reference of query rows [a, b) of sequence bi, compared with the gathered output:
  // per document, with the mask of the plan (reference_window).
  void reference_rows(std::int64_t bi, std::int64_t a, std::int64_t b, std::int64_t row) {
    ref_.resize(static_cast<std::size_t>((b - a) * row));
    const std::int64_t kv_row = s_.kv_heads * s_.head_dim;
    const float* q = qf() + bi * s_.q_total * row;
    const float* k = kf() + bi * s_.kv_total * kv_row;
    const float* v = vf() + bi * s_.kv_total * kv_row;
    for_each_document_piece(a, b, [&](std::int64_t qs, std::int64_t ql, std::int64_t ks,
                                      std::int64_t kl, std::int64_t ra, std::int64_t rb) {
      const ReferenceWindow w = window_of(ra, rb, ql, kl);
      detail::reference_attention(q + (qs + ra) * row, k + (ks + w.key_first) * kv_row,
                                  v + (ks + w.key_first) * kv_row, rb - ra, w.keys, s_.heads,
                                  s_.kv_heads, s_.head_dim, single_plan_->shape().scale, false,
                                  ref_.data() + (qs + ra - a) * row, nullptr, w.window_left,
                                  w.window_right);
    });
    const std::int64_t first = (bi * s_.q_total + a) * row;
    const float* out = of() + first;
    for (std::int64_t i = 0; i < (b - a) * row; ++i) {
      const double r = ref_[static_cast<std::size_t>(i)];
      const double x = out[i];
      if (!std::isfinite(r)) continue;
      if (!std::isfinite(x)) {
        if (result_.nonfinite_outputs++ == 0)
          result_.first_nonfinite_output =
              cat(position(first + i, s_.heads, s_.head_dim, s_.q_total, s_.batch), ": ",
                  float_text(x), " (reference ", float_text(r), ")");
        continue;
      }
      result_.max_abs_err = std::max(result_.max_abs_err, std::fabs(x - r));
      ++result_.compared;
    }
  }

  // The float64 reference backward, per sequence and kv head (its `group` q heads packed
  // contiguously) and per piece of query rows (split at documents): dq of the piece is compared at
  // once, dk/dv (sums over every query row of the key's document) once the kv head's last piece is
  // done.
  void add_backward_reference() {
    const std::int64_t group = s_.heads / s_.kv_heads;
    const std::int64_t step = reference_backward_rows(s_);
    for (std::int64_t bi = 0; bi < s_.batch; ++bi) {
      const std::string seq = s_.batch > 1 ? cat("sequence ", bi, ", ") : std::string();
      for (std::int64_t g = 0; g < s_.kv_heads; ++g) {
        add(cat("--check: float64 reference backward, ", seq, "kv head ", g, " of ", s_.kv_heads, ": set-up"),
            [this, bi, g] { backward_head_begin(bi, g); });
        for (std::int64_t a = 0; a < s_.q_total; a += step) {
          const std::int64_t b = std::min(s_.q_total, a + step);
          add(cat("--check: float64 reference backward, ", seq, "kv head ", g, " of ", s_.kv_heads,
                  ", query rows ", a, "-", b, " of ", s_.q_total),
              [this, bi, g, a, b, group] { backward_rows(bi, g, group, a, b); });
        }
        add(cat("--check: float64 reference backward, ", seq, "kv head ", g, " of ", s_.kv_heads, ": dk, dv"),
            [this, bi, g] { backward_head_end(bi, g); });
      }
    }
  }

  // Compares one gradient value with its reference (index: of the whole [B][S][H][D] tensor).
  void compare(int grad, double r, double x, std::int64_t index, std::int64_t heads, std::int64_t tokens) {
    GradientCheck& c = result_.gradients[grad];
    if (!std::isfinite(r)) return;
    if (!std::isfinite(x)) {
      if (c.nonfinite++ == 0)
        c.first_nonfinite = cat(position(index, heads, s_.head_dim, tokens, s_.batch), ": ",
                                float_text(x), " (reference ", float_text(r), ")");
      return;
    }
    c.max_abs_err = std::max(c.max_abs_err, std::fabs(x - r));
    ++c.compared;
  }

  void backward_head_begin(std::int64_t bi, std::int64_t g) {
    const std::int64_t D = s_.head_dim, n = s_.kv_total * D;
    kg_.resize(static_cast<std::size_t>(n));
    vg_.resize(static_cast<std::size_t>(n));
    const std::int64_t seq = bi * s_.kv_total;
    for (std::int64_t j = 0; j < s_.kv_total; ++j) {
      const std::int64_t from = ((seq + j) * s_.kv_heads + g) * D;
      std::memcpy(kg_.data() + j * D, kf() + from, static_cast<std::size_t>(D) * sizeof(float));
      std::memcpy(vg_.data() + j * D, vf() + from, static_cast<std::size_t>(D) * sizeof(float));
    }
    dk_acc_.assign(static_cast<std::size_t>(n), 0.0);
    dv_acc_.assign(static_cast<std::size_t>(n), 0.0);
    dk_ref_.resize(static_cast<std::size_t>(n));
    dv_ref_.resize(static_cast<std::size_t>(n));
  }

  void backward_rows(std::int64_t bi, std::int64_t g, std::int64_t group, std::int64_t a, std::int64_t b) {
    const std::int64_t D = s_.head_dim, rows = b - a, hrow = group * D;
    qg_.resize(static_cast<std::size_t>(rows * hrow));
    dog_.resize(static_cast<std::size_t>(rows * hrow));
    dq_ref_.resize(static_cast<std::size_t>(rows * hrow));
    const std::int64_t first = g * group * D, row = s_.heads * D;
    const std::int64_t seq = bi * s_.q_total;
    for (std::int64_t i = 0; i < rows; ++i) {
      std::memcpy(qg_.data() + i * hrow, qf() + (seq + a + i) * row + first,
                  static_cast<std::size_t>(hrow) * sizeof(float));
      std::memcpy(dog_.data() + i * hrow, doutf() + (seq + a + i) * row + first,
                  static_cast<std::size_t>(hrow) * sizeof(float));
    }
    for_each_document_piece(a, b, [&](std::int64_t qs, std::int64_t ql, std::int64_t ks,
                                      std::int64_t kl, std::int64_t ra, std::int64_t rb) {
      const ReferenceWindow w = window_of(ra, rb, ql, kl);
      const std::int64_t at = (qs + ra - a) * hrow, key = (ks + w.key_first) * D;
      detail::reference_attention_backward(qg_.data() + at, kg_.data() + key, vg_.data() + key,
                                           dog_.data() + at, rb - ra, w.keys, group, 1, D,
                                           single_plan_->shape().scale, false, dq_ref_.data() + at,
                                           dk_ref_.data(), dv_ref_.data(), w.window_left,
                                           w.window_right);
      for (std::int64_t i = 0; i < w.keys * D; ++i) {
        dk_acc_[static_cast<std::size_t>(key + i)] += dk_ref_[static_cast<std::size_t>(i)];
        dv_acc_[static_cast<std::size_t>(key + i)] += dv_ref_[static_cast<std::size_t>(i)];
      }
    });
    const float* dq = gradf(0);
    for (std::int64_t i = 0; i < rows; ++i)
      for (std::int64_t e = 0; e < hrow; ++e) {
        const std::int64_t index = (seq + a + i) * row + first + e;
        compare(0, dq_ref_[static_cast<std::size_t>(i * hrow + e)], dq[index], index, s_.heads, s_.q_total);
      }
  }

  void backward_head_end(std::int64_t bi, std::int64_t g) {
    const std::int64_t D = s_.head_dim;
    const float* dk = gradf(1);
    const float* dv = gradf(2);
    const std::int64_t seq = bi * s_.kv_total;
    for (std::int64_t j = 0; j < s_.kv_total; ++j)
      for (std::int64_t d = 0; d < D; ++d) {
        const std::int64_t index = ((seq + j) * s_.kv_heads + g) * D + d;
        compare(1, dk_acc_[static_cast<std::size_t>(j * D + d)], dk[index], index, s_.kv_heads, s_.kv_total);
        compare(2, dv_acc_[static_cast<std::size_t>(j * D + d)], dv[index], index, s_.kv_heads, s_.kv_total);
      }
    for (auto* v : {&dk_acc_, &dv_acc_, &dk_ref_, &dv_ref_, &dq_ref_}) *v = std::vector<double>();
    for (auto* v : {&kg_, &vg_, &qg_, &dog_}) *v = std::vector<float>();
  }

  const RunOptions& o_;
  const Setup& s_;
  const AttentionShape& shape_;
  Gathered& g_;
  std::optional<Plan>& single_plan_;
  Tasks tasks_;
  HostTensor q_, k_, v_, dout_;
  // bf16: the values as float32.
  std::vector<float> qf_, kf_, vf_, doutf_, of_, dqf_, dkf_, dvf_;
  std::vector<double> ref_;
  // Where each document of a sequence starts (q and kv), with the totals at the end.
  std::vector<std::int64_t> q_doc_start_, kv_doc_start_;
  // The single-rank run (between its forward and backward pieces).
  HostTensor single_out_;
  std::vector<float> single_lse_;
  std::unique_ptr<Workspace> single_ws_;
  std::unique_ptr<SavedForward> single_saved_;
  // The reference backward of one kv head: its k/v rows, a piece's q/dout rows, the results.
  std::vector<float> kg_, vg_, qg_, dog_;
  std::vector<double> dq_ref_, dk_ref_, dv_ref_, dk_acc_, dv_acc_;
  std::unique_ptr<AtomicSave> saver_;
  CheckResult result_;
};

// What this rank needs, in named parts.
struct MemoryNeed {
  std::vector<std::pair<std::string, std::int64_t>> parts;
  std::int64_t total = 0;
  void add(std::string what, std::int64_t bytes) {
    if (bytes <= 0) return;
    parts.emplace_back(std::move(what), bytes);
    total = mem::sat_add(total, bytes);
  }
  std::string text() const {
    std::string t;
    for (const auto& [what, bytes] : parts) t += cat(t.empty() ? "" : ", ", what, " ", bytes);
    return t;
  }
};

// An estimate (an upper bound in practice, not exact) of the workspace one backward() call of
// `plan` on this rank adds, from the plan's public figures: the staging of dO/lse/delta rows
// received for the rank's work and of its dQ rows, the fp32 dK/dV partial sums of the q heads it
// computes over every key (the largest part), the carry and the per-head sums received for the
// rank's own keys, the message buffers (the backward exchanges by messages; counted as every byte
// sent and received, where the executor needs the largest exchange's), delta, the kernel's scratch
// and, in recompute mode, the q/k/v rows received again. Counted on top of the forward's staging
// although the two share buffers: a buffer that grows holds old and new for a moment.
std::int64_t backward_workspace_bytes(const Plan& plan, bool saved_mode) {
  using mem::sat_add;
  using mem::sat_product;
  const AttentionShape& sh = plan.shape();
  const std::int64_t es = static_cast<std::int64_t>(dtype_size(sh.dtype));
  const std::int64_t D = sh.head_dim, me = plan.rank();
  const WorkRange w = plan.work(static_cast<int>(me));
  // (q head, row) pairs of this rank's work (at most batch * q_heads * q_total, which resolve()
  // keeps far from overflowing), and the q heads they touch (heads count over the batch: see
  // WorkRange).
  const std::int64_t pairs = std::max<std::int64_t>(
      0, (w.end_head - w.first_head) * plan.q_total() + (w.end_row - w.first_row));
  const std::int64_t heads = std::max<std::int64_t>(0, plan.q_head_end(static_cast<int>(me)) -
                                                           plan.q_head_begin(static_cast<int>(me)));
  const std::int64_t kvt = plan.kv_total();
  // Of those, the rows of other ranks' tokens (staged; its own rows are read in place): at most
  // every row it does not hold, in each head it touches.
  const std::int64_t foreign = std::min(pairs, heads * (plan.q_total() - plan.q_tokens()));
  std::int64_t b = sat_product(foreign, sat_add(sat_product(2, D, es), 8));  // dO, lse, delta, dQ rows
  b = sat_add(b, sat_product(2, heads, kvt, D, 4));                        // dK/dV partial sums
  b = sat_add(b, sat_product(2, kvt, D, 4));                               // carry
  b = sat_add(b, sat_product(2, sh.q_heads, plan.batch(), plan.kv_tokens(), D, 4));  // per-head sums to reduce
  b = sat_add(b, sat_add(plan.backward_bytes_sent(saved_mode), plan.backward_bytes_received(saved_mode)));
  b = sat_add(b, sat_product(plan.batch(), plan.q_tokens(), sh.q_heads, 4));  // delta
  b = sat_add(b, sat_product(sat_add(sat_product(3, kvt), sat_product(4, std::min(pairs, plan.q_total()))),
                             D, 4));                                       // kernel scratch
  if (!saved_mode) b = sat_add(b, plan.saved_bytes());                     // q/k/v rows again
  return b;
}

MemoryNeed memory_need(const RunOptions& o, const Setup& s, const Plan& plan, bool peer_memory,
                       const Plan* single) {
  using mem::sat_add;
  using mem::sat_product;
  const std::int64_t es = static_cast<std::int64_t>(dtype_size(o.dtype));
  const std::int64_t D = s.head_dim, B = s.batch;  // every tensor holds B sequences
  MemoryNeed n;
  n.add("q/k/v/out", sat_add(sat_product(2, B, plan.q_tokens(), s.heads, D, es),
                             sat_product(2, B, plan.kv_tokens(), s.kv_heads, D, es)));
  n.add("staging", plan.staging_bytes());
  if (!peer_memory) n.add("pack/unpack", sat_add(plan.bytes_sent(), plan.bytes_received()));
  if (o.backward) {
    n.add("dout/dq/dk/dv/lse",
          sat_add(sat_add(sat_product(2, B, plan.q_tokens(), s.heads, D, es),
                          sat_product(2, B, plan.kv_tokens(), s.kv_heads, D, es)),
                  sat_product(B, plan.q_tokens(), s.heads, 4)));
    if (o.backward_saved) n.add("saved forward", plan.saved_bytes());
    n.add("backward workspace", backward_workspace_bytes(plan, o.backward_saved));
  }
  if (single != nullptr) {  // rank 0 with --check or --save
    const std::int64_t q_all = sat_product(B, s.q_total, s.heads, D);
    const std::int64_t kv_all = sat_product(B, s.kv_total, s.kv_heads, D);
    const bool inputs = rank0_needs_inputs(o, s);
    const bool bwd = o.backward;
    // The outputs gathered (out; dq, dk, dv) and the whole inputs (q, k, v; dout).
    const std::int64_t outs = bwd ? sat_add(sat_product(2, q_all), sat_product(2, kv_all)) : q_all;
    const std::int64_t ins = inputs ? sat_add(sat_product(bwd ? 2 : 1, q_all), sat_product(2, kv_all)) : 0;
    n.add(bwd ? "gathered out/dq/dk/dv" : "gathered out", sat_product(outs, es));
    if (inputs) n.add(bwd ? "whole q/k/v/dout" : "whole q/k/v", sat_product(ins, es));
    if (o.dtype != DType::f32) n.add("float32 copies", sat_product(sat_add(outs, ins), 4));
    if (o.check) {
      n.add("single-rank out", sat_product(q_all, es));
      n.add("single-rank staging", sat_add(single->staging_bytes(),
                                           sat_add(single->bytes_sent(), single->bytes_received())));
      const std::int64_t row = sat_product(s.heads, D, 8);
      n.add("reference rows", std::min(sat_product(s.q_total, row), std::max(row, kReferenceBytes)));
      if (bwd) {
        n.add("single-rank dq/dk/dv/lse", sat_add(sat_product(sat_add(q_all, sat_product(2, kv_all)), es),
                                                  sat_product(B, s.q_total, s.heads, 4)));
        if (o.backward_saved) n.add("single-rank saved forward", single->saved_bytes());
        n.add("single-rank backward workspace", backward_workspace_bytes(*single, o.backward_saved));
        // One kv head at a time: its k/v rows (float32) and dk/dv sums (float64, twice), and a
        // piece of query rows of its q heads.
        const std::int64_t group = s.heads / std::max<std::int64_t>(s.kv_heads, 1);
        const std::int64_t piece = std::min(s.q_total, reference_backward_rows(s));
        n.add("reference backward",
              sat_add(sat_product(s.kv_total, D, 2 * 4 + 4 * 8), sat_product(piece, group, D, 2 * 4 + 8)));
      }
    }
  }
  return n;
}

std::string ranks_text(const std::vector<int>& ranks) {
  std::string t;
  for (std::size_t i = 0; i < ranks.size();) {
    std::size_t j = i;
    while (j + 1 < ranks.size() && ranks[j + 1] == ranks[j] + 1) ++j;
    t += cat(t.empty() ? "" : ",", ranks[i]);
    if (j > i) t += cat("-", ranks[j]);
    i = j + 1;
  }
  return t;
}

// "flash_avx2 (ranks 0-3)" or "a (ranks 0,2), b (rank 1)".
std::string kernels_text(const std::vector<std::string>& kernels) {
  std::vector<std::string> names;
  for (const std::string& k : kernels)
    if (std::find(names.begin(), names.end(), k) == names.end()) names.push_back(k);
  std::string t;
  for (const std::string& name : names) {
    std::vector<int> rs;
    for (std::size_t r = 0; r < kernels.size(); ++r)
      if (kernels[r] == name) rs.push_back(static_cast<int>(r));
    t += cat(t.empty() ? "" : ", ", name, " (rank", rs.size() == 1 ? " " : "s ", ranks_text(rs), ")");
  }
  return t;
}

std::string fixed_ms(double ms) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%12.3f", ms);
  return buf;
}
std::string fixed_ms3(double ms) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3f", ms);
  return buf;
}

// Start-up: every rank's own parse result and environment, agreed. A failure on any rank (its
// message names it) becomes the same error on every rank; different options are named.
void agree_options(ToolControl& ctl, const RunOptions& o, const std::string& local_error) {
  const std::uint64_t digest = local_error.empty() ? options_digest(o) : 0;
  const detail::Verdict v =
      ctl.agree("options", local_error, ErrorCode::invalid_argument, 0, digest, false);
  if (v.fingerprint_min == v.fingerprint_max) return;

  // Which option differs: every rank's table of (hash, value text), one 64-byte slot per option.
  struct Slot {
    std::uint64_t hash;
    std::uint8_t given;
    char text[55];
  };
  static_assert(sizeof(Slot) == 64);
  const std::vector<OptionValue> opts = canonical_options(o);
  const std::size_t n = opts.size();
  std::vector<Slot> mine(n), all(n * static_cast<std::size_t>(ctl.size()));
  for (std::size_t i = 0; i < n; ++i) {
    Slot& sl = mine[i];
    std::memset(&sl, 0, sizeof sl);
    sl.hash = fnv1a(opts[i].given ? "=" + opts[i].value : std::string("!"));
    sl.given = opts[i].given ? 1 : 0;
    std::string t = opts[i].value;
    if (t.size() > sizeof sl.text - 1) t = t.substr(0, sizeof sl.text - 4) + "...";
    std::memcpy(sl.text, t.data(), t.size());
  }
  collective([&] { ctl.comm().allgather(mine.data(), n * sizeof(Slot), all.data()); },
             "options");
  for (std::size_t i = 0; i < n; ++i) {
    const Slot& zero = all[i];
    for (int r = 1; r < ctl.size(); ++r) {
      const Slot& other = all[static_cast<std::size_t>(r) * n + i];
      if (other.hash == zero.hash) continue;
      auto value = [&](const Slot& sl) {
        return OptionValue{opts[i].name, opts[i].flag, sl.given != 0, std::string(sl.text)};
      };
      throw AgreedError{ErrorCode::mismatch,
                        cat("ranks disagree on ", opts[i].name, ": ", describe_option(r, value(other)),
                            ", ", describe_option(0, value(zero)),
                            " (every rank must be given the same options)")};
    }
  }
  throw AgreedError{ErrorCode::mismatch,
                    cat("ranks were given different options (rank ", v.fingerprint_max_rank,
                        "'s differ from another rank's; every rank must be given the same options)")};
}

// What each rank brings to the run besides its options (read before the options are agreed).
struct Environment {
  double progress_seconds = 10;
  mem::Detected memory;
};

// The whole command on one rank, once the options are agreed. Returns the exit status; throws
// AgreedError (aborts the job on a transport failure).
int run(ToolControl& ctl, const RunOptions& o, const Environment& env) {
  const int me = ctl.rank(), P = ctl.size();
  Communicator& comm = ctl.comm();
  Progress progress;
  if (me == 0) progress.start(env.progress_seconds);

  Setup s;
  progress.set("reading the inputs' headers");
  ctl.local_step("resolve the options", [&] {
    s = resolve(o, P);
    if (me == 0) prepare_save(o, s);
  });

  AttentionShape shape;
  shape.q_heads = s.heads;
  shape.kv_heads = s.kv_heads;
  shape.head_dim = s.head_dim;
  shape.dtype = o.dtype;
  shape.causal = o.causal;
  shape.return_lse = o.backward;  // backward() recomputes the softmax from the forward's lse
  shape.batch = s.batch;
  shape.window_left = o.window_left;
  shape.window_right = o.window_right;
  PlanOptions options;
  options.strategy = o.strategy;
  options.backward_order = o.backward_order;

  progress.set("building the plan");
  const auto t_plan = Clock::now();
  const Plan plan = collective([&] {
    return Plan::create(comm, shape, s.lens[static_cast<std::size_t>(me)],
                        s.kv_lens[static_cast<std::size_t>(me)], s.docs, options);
  }, "Plan::create");
  const double plan_ms = ms_since(t_plan);
  const bool peer_memory = o.strategy == Strategy::uaa && P > 1 && comm.can_read_peers();
  const bool rank0_work = o.check || !o.save_dir.empty();

  // Memory: what each rank needs against what it may use, before anything large is allocated.
  progress.set("checking memory");
  std::uint64_t keys[2] = {fnv1a(env.memory.host),
                           fnv1a(env.memory.cgroup ? env.memory.cgroup->dir : std::string("-"),
                                 fnv1a(env.memory.host))};
  std::vector<std::uint64_t> all_keys(2 * static_cast<std::size_t>(P));
  collective([&] { comm.allgather(keys, sizeof keys, all_keys.data()); }, "check memory");
  int node_ranks = 0, cgroup_ranks = 0;
  for (int r = 0; r < P; ++r) {
    node_ranks += all_keys[2 * static_cast<std::size_t>(r)] == keys[0];
    cgroup_ranks += all_keys[2 * static_cast<std::size_t>(r) + 1] == keys[1];
  }
  std::optional<Plan> single;
  std::shared_ptr<Communicator> self;
  ctl.local_step("check memory", [&] {
    if (me == 0 && rank0_work) {
      self = make_mpi_communicator(MPI_COMM_SELF);
      single = Plan::from_lengths(*self, shape, {s.q_total}, {s.kv_total}, s.docs, options);
    }
    const MemoryNeed need = memory_need(o, s, plan, peer_memory, single ? &*single : nullptr);
    const mem::Available avail = mem::share(env.memory, node_ranks, cgroup_ranks);
    if (need.total > avail.bytes)
      throw Error(ErrorCode::out_of_memory,
                  cat("needs ", mem::bytes_text(need.total), " of memory (", need.text(),
                      ") but its limit is ", mem::bytes_text(avail.bytes), " (", avail.how,
                      "); use more ranks, fewer tokens or heads, or free memory"));
  });

  // My shards, in slices.
  HostTensor q, k, v, out;
  HostTensor dout, dq, dk, dv;  // --backward
  std::vector<float> lse;       // --backward: [batch][q_tokens][heads]
  {
    Tasks tasks;
    tasks.add("allocating the inputs", [&] {
      const std::int64_t B = s.batch;
      q = HostTensor(o.dtype, plan.q_tokens(), s.heads, s.head_dim, B);
      k = HostTensor(o.dtype, plan.kv_tokens(), s.kv_heads, s.head_dim, B);
      v = HostTensor(o.dtype, plan.kv_tokens(), s.kv_heads, s.head_dim, B);
      out = HostTensor(o.dtype, plan.q_tokens(), s.heads, s.head_dim, B);
      if (o.backward) {
        dout = HostTensor(o.dtype, plan.q_tokens(), s.heads, s.head_dim, B);
        dq = HostTensor(o.dtype, plan.q_tokens(), s.heads, s.head_dim, B);
        dk = HostTensor(o.dtype, plan.kv_tokens(), s.kv_heads, s.head_dim, B);
        dv = HostTensor(o.dtype, plan.kv_tokens(), s.kv_heads, s.head_dim, B);
        lse.assign(static_cast<std::size_t>(B * plan.q_tokens() * s.heads), 0.0f);
      }
    });
    HostTensor* dst[4] = {&q, &k, &v, &dout};
    const char* names[4] = {"q", "k", "v", "dout"};
    for (int t = 0; t < (o.backward ? 4 : 3); ++t) {
      const bool q_like = t == kQ || t == kDout;
      const std::vector<std::int64_t>& lens = q_like ? s.lens : s.kv_lens;
      const std::int64_t first = first_token(lens, me), n = lens[static_cast<std::size_t>(me)];
      const std::int64_t row = (q_like ? s.heads : s.kv_heads) * s.head_dim;
      const std::int64_t step = std::max<std::int64_t>(1, kPieceElements / std::max<std::int64_t>(row, 1));
      for (std::int64_t b = 0; b < s.batch; ++b)
        for (std::int64_t a = 0; a < n; a += step) {
          const std::int64_t c = std::min(step, n - a);
          tasks.add(cat("preparing the inputs: ", names[t], s.batch > 1 ? cat(" sequence ", b) : "",
                        " tokens ", a, "-", a + c, " of ", n),
                    [&, t, b, a, c, n, first] { fill_rows(s, o, t, b, first + a, c, *dst[t], b * n + a, nullptr); });
        }
    }
    run_sliced(ctl, "prepare the inputs", tasks, progress, [] { return std::uint16_t{0}; });
  }

  AttentionArgs args;
  args.q = q.view();
  args.k = k.view();
  args.v = v.view();
  args.out = out.view();
  if (o.backward) args.lse = lse.data();
  BackwardArgs bargs;
  if (o.backward) {
    bargs.q = args.q;
    bargs.k = args.k;
    bargs.v = args.v;
    bargs.out = std::as_const(out).view();
    bargs.lse = lse.data();
    bargs.dout = std::as_const(dout).view();
    bargs.dq = dq.view();
    bargs.dk = dk.view();
    bargs.dv = dv.view();
  }
  Workspace ws;
  SavedForward saved;  // --backward-mode saved
  const bool use_saved = o.backward && o.backward_saved;
  // Every call starts together (an agreement, under the deadline), so that the phases time the
  // call rather than the skew of the ranks before it. With --backward each forward() is followed
  // by a backward() (its own start agreement) on the forward's output and lse.
  bool forward_peer_memory = false;  // the data path of the last forward() (backward() uses messages)
  auto call = [&](PhaseTimes* t, BackwardTimes* bt) {
    ctl.agree("start a forward() call", {});
    collective([&] {
      if (use_saved) forward(plan, args, ws, saved, t);
      else forward(plan, args, ws, t);
    }, "forward()");
    forward_peer_memory = last_call(ws).peer_memory;
    if (!o.backward) return;
    ctl.agree("start a backward() call", {});
    collective([&] {
      if (use_saved) backward(plan, bargs, ws, saved, bt);
      else backward(plan, bargs, ws, bt);
    }, "backward()");
  };
  const char* calls = o.backward ? " (forward + backward)" : "";
  if (o.iters > 1) {
    progress.set(cat("warm-up call", calls, " (then ", o.iters, " timed calls)"));
    call(nullptr, nullptr);
  }
  std::vector<std::vector<double>> phase(kPhases), bphase(kBackwardPhases);
  for (std::int64_t i = 0; i < o.iters; ++i) {
    progress.set(cat("timed call ", i + 1, " of ", o.iters, calls));
    PhaseTimes t;
    BackwardTimes bt;
    call(&t, &bt);
    const double values[kPhases - 1] = {t.handshake, t.pack,   t.exchange_qkv, t.attention,
                                        t.exchange_out, t.unpack, t.total};
    for (int p = 0; p < kPhases - 1; ++p) phase[static_cast<std::size_t>(p + 1)].push_back(values[p]);
    const double bvalues[kBackwardPhases] = {bt.handshake, bt.prepare, bt.exchange_in, bt.kernel,
                                             bt.carry, bt.exchange_out, bt.reduce, bt.total};
    for (int p = 0; p < kBackwardPhases; ++p) bphase[static_cast<std::size_t>(p)].push_back(bvalues[p]);
  }

  // Every rank's phases, bytes, data path and kernel, to every rank.
  RankRecord mine;
  std::memset(&mine, 0, sizeof mine);
  mine.ms[0] = plan_ms;
  for (int p = 1; p < kPhases; ++p) mine.ms[p] = median(phase[static_cast<std::size_t>(p)]);
  mine.bytes_sent = plan.bytes_sent();
  mine.peer_memory = forward_peer_memory ? 1 : 0;
  std::snprintf(mine.kernel, sizeof mine.kernel, "%s", kernel_name());
  std::vector<RankRecord> records(static_cast<std::size_t>(P));
  collective([&] { comm.allgather(&mine, sizeof mine, records.data()); }, "gather the reports");
  double max_ms[kPhases] = {};
  std::int64_t max_sent = 0;
  std::vector<std::string> kernels;
  int peer_ranks = 0;
  for (const RankRecord& r : records) {
    for (int p = 0; p < kPhases; ++p) max_ms[p] = std::max(max_ms[p], r.ms[p]);
    max_sent = std::max(max_sent, r.bytes_sent);
    kernels.emplace_back(r.kernel, strnlen(r.kernel, sizeof r.kernel));
    peer_ranks += r.peer_memory;
  }
  const char* data_path = peer_ranks == P ? "peer_memory" : peer_ranks == 0 ? "messages" : "mixed";

  // --backward: every rank's phases, bytes and backward kernel, to every rank.
  double bmax_ms[kBackwardPhases] = {};
  std::int64_t bmax_sent = 0, bmax_received = 0, bmax_saved = 0;
  std::vector<std::string> bkernels;
  if (o.backward) {
    BackwardRecord bmine;
    std::memset(&bmine, 0, sizeof bmine);
    for (int p = 0; p < kBackwardPhases; ++p) bmine.ms[p] = median(bphase[static_cast<std::size_t>(p)]);
    bmine.bytes_sent = plan.backward_bytes_sent(o.backward_saved);
    bmine.bytes_received = plan.backward_bytes_received(o.backward_saved);
    bmine.saved_bytes = plan.saved_bytes();
    std::snprintf(bmine.kernel, sizeof bmine.kernel, "%s", backward_kernel_name());
    std::vector<BackwardRecord> brecords(static_cast<std::size_t>(P));
    collective([&] { comm.allgather(&bmine, sizeof bmine, brecords.data()); },
               "gather the backward reports");
    for (const BackwardRecord& r : brecords) {
      for (int p = 0; p < kBackwardPhases; ++p) bmax_ms[p] = std::max(bmax_ms[p], r.ms[p]);
      bmax_sent = std::max(bmax_sent, r.bytes_sent);
      bmax_received = std::max(bmax_received, r.bytes_received);
      bmax_saved = std::max(bmax_saved, r.saved_bytes);
      bkernels.emplace_back(r.kernel, strnlen(r.kernel, sizeof r.kernel));
    }
  }

  // --check / --save: the output to rank 0 (point-to-point messages under the deadline), then rank
  // 0's work in slices, every rank agreeing after each one.
  std::uint16_t outcome = 0;
  CheckResult check;
  if (rank0_work) {
    Gathered gathered;
    progress.set(o.backward ? "gathering the output and the gradients on rank 0"
                            : "gathering the output on rank 0");
    ctl.local_step("allocate the gathered output", [&] {
      if (me != 0) return;
      gathered.out = HostTensor(o.dtype, s.q_total, s.heads, s.head_dim, s.batch);
      if (o.backward) {
        gathered.dq = HostTensor(o.dtype, s.q_total, s.heads, s.head_dim, s.batch);
        gathered.dk = HostTensor(o.dtype, s.kv_total, s.kv_heads, s.head_dim, s.batch);
        gathered.dv = HostTensor(o.dtype, s.kv_total, s.kv_heads, s.head_dim, s.batch);
      }
    });
    // Per rank, in this order: out, then (--backward) dq, dk, dv, each sequence of the batch after
    // the other (messages between a pair of ranks match in the order they are listed).
    struct Part {
      HostTensor* mine;
      HostTensor* all;
      const std::vector<std::int64_t>* lens;
    };
    std::vector<Part> parts = {{&out, &gathered.out, &s.lens}};
    if (o.backward) {
      parts.push_back({&dq, &gathered.dq, &s.lens});
      parts.push_back({&dk, &gathered.dk, &s.kv_lens});
      parts.push_back({&dv, &gathered.dv, &s.kv_lens});
    }
    std::vector<Message> sends, recvs;
    for (const Part& p : parts) {
      const std::int64_t seq_bytes = p.mine->tokens * p.mine->row_bytes();
      for (std::int64_t b = 0; b < s.batch && seq_bytes > 0; ++b)
        sends.push_back({0, static_cast<char*>(p.mine->data()) + b * seq_bytes, seq_bytes});
    }
    if (me == 0) {
      for (int r = 0; r < P; ++r)
        for (const Part& p : parts) {
          const std::int64_t row = p.all->row_bytes();
          const std::int64_t n = (*p.lens)[static_cast<std::size_t>(r)];
          for (std::int64_t b = 0; b < s.batch && n > 0; ++b)
            recvs.push_back({r, static_cast<char*>(p.all->data()) +
                                    (b * p.all->tokens + first_token(*p.lens, r)) * row,
                             n * row});
        }
    }
    collective([&] { comm.exchange(sends, recvs); }, "gather the output on rank 0");

    std::unique_ptr<Rank0Work> work;
    ctl.local_step("prepare the rank-0 work", [&] {
      if (me == 0) work = std::make_unique<Rank0Work>(o, s, shape, gathered, single);
      if (me == 0 && o.backward && o.backward_order == BackwardOrder::by_rank) {
        bool shared = false;
        for (int r = 0; r < P; ++r) shared = shared || plan.work(r).first_row != 0 || plan.work(r).end_row != 0;
        if (shared) work->relax_kv_gradients();
      }
    });
    Tasks none;
    outcome = run_sliced(ctl, "--check/--save on rank 0", me == 0 ? work->tasks() : none, progress,
                         [&] { return me == 0 ? work->result_flags() : std::uint16_t{0}; });
    if (me == 0) check = work->result();
  }
  progress.stop();

  const bool check_failed = o.check && (outcome & kCheckFailed) != 0;
  if (me == 0) {
    std::string saved;
    if (!o.save_dir.empty()) {
      for (const std::string& n : s.save_names) saved += (saved.empty() ? "" : ", ") + n;
    }
    if (o.json) {
      JsonWriter j;
      j.field("ranks", P)
          .field("lens", s.lens)
          .field("kv_lens", s.kv_lens)
          .field("heads", s.heads)
          .field("kv_heads", s.kv_heads)
          .field("head_dim", s.head_dim)
          .field("dtype", dtype_name(o.dtype))
          .field("causal", o.causal)
          .field("window", std::vector<std::int64_t>{o.window_left, o.window_right})
          .field("documents", static_cast<std::int64_t>(plan.documents().q.size()))
          .field("batch", s.batch)
          .field("strategy", strategy_name(o.strategy))
          .field("iters", o.iters);
      if (!s.from_files) j.field("seed", static_cast<std::uint64_t>(o.seed));
      j.field("kernel", kernels[0])
          .field("kernels", kernels)
          .field("threads", uaa::num_threads())
          .field("data_path", data_path);
      j.begin_object("ms");
      for (int p = 0; p < kPhases; ++p) j.field(kPhaseNames[p], max_ms[p]);
      j.end_object().field("bytes_sent", max_sent);
      if (o.check)
        j.field("max_abs_err", check.max_abs_err)
            .field("bitwise_equal", check.bitwise_equal)
            .field("nonfinite_inputs", check.nonfinite_inputs)
            .field("nonfinite_outputs", check.nonfinite_outputs)
            .field("check_passed", check.passed());  // the forward's and the backward's
      if (o.backward) {
        j.begin_object("backward")
            .field("mode", o.backward_saved ? "saved" : "recompute")
            .field("order", o.backward_order == BackwardOrder::canonical ? "canonical" : "by_rank")
            .field("kernel", bkernels[0])
            .field("kernels", bkernels);
        j.begin_object("ms");
        for (int p = 0; p < kBackwardPhases; ++p) j.field(kBackwardPhaseNames[p], bmax_ms[p]);
        j.end_object()
            .field("bytes_sent", bmax_sent)
            .field("bytes_received", bmax_received)
            .field("saved_bytes", bmax_saved);
        if (o.check) {
          j.begin_object("check");
          for (int g = 0; g < kGradients; ++g) {
            const GradientCheck& c = check.gradients[g];
            j.begin_object(kGradientNames[g])
                .field("max_abs_err", c.max_abs_err)
                .field("bitwise_equal", c.bitwise_equal)
                .field("bitwise_expected", c.bitwise_expected)
                .field("nonfinite_outputs", c.nonfinite)
                .end_object();
          }
          j.end_object().field("check_passed", check.backward_passed());
        }
        j.end_object();
      }
      if (!o.load_dir.empty()) j.field("load", o.load_dir);
      if (!o.save_dir.empty()) {
        std::vector<std::string> files(s.save_names);
        j.field("save", o.save_dir).field("saved", files);
      }
      std::printf("%s\n", j.str().c_str());
    } else {
      // ", causal, window (8,0), 3 documents, batch 2": what differs from plain attention.
      std::string layout_text = o.causal ? ", causal" : "";
      if (o.window_left >= 0 || o.window_right >= 0)
        layout_text += cat(", window (", o.window_left, ",", o.window_right, ")");
      if (o.docs) {
        const std::size_t nd = plan.documents().q.size();
        layout_text += cat(", ", nd, " document", nd == 1 ? "" : "s");
        if (nd <= 16) {  // the lengths, when short enough for one line
          layout_text += cat(" ", list_text(plan.documents().q));
          if (o.kv_docs) layout_text += cat(" (kv ", list_text(plan.documents().kv), ")");
        }
      }
      if (s.batch > 1) layout_text += cat(", batch ", s.batch);
      std::printf("uaa run: %d rank%s, q lens %s (%lld), kv lens %s (%lld), heads %lld q / %lld kv, "
                  "head_dim %lld, %s%s, %lld iter%s, kernel %s x %d thread%s, %s\n",
                  P, P == 1 ? "" : "s", list_text(s.lens).c_str(), static_cast<long long>(s.q_total),
                  list_text(s.kv_lens).c_str(), static_cast<long long>(s.kv_total),
                  static_cast<long long>(s.heads), static_cast<long long>(s.kv_heads),
                  static_cast<long long>(s.head_dim), dtype_name(o.dtype), layout_text.c_str(),
                  static_cast<long long>(o.iters), o.iters == 1 ? "" : "s", kernels[0].c_str(),
                  uaa::num_threads(), uaa::num_threads() == 1 ? "" : "s",
                  (s.from_files ? cat("data ", o.load_dir) : cat("seed ", o.seed)).c_str());
      std::printf("data_path: %s, kernels: %s\n", data_path, kernels_text(kernels).c_str());
      const std::string bkernels_text = o.backward ? kernels_text(bkernels) : std::string();
      std::printf("bytes sent per rank (max over ranks): %lld\n", static_cast<long long>(max_sent));
      std::printf("%-14s %12s   (median over iterations, max over ranks)\n", "phase", "ms");
      for (int p = 0; p < kPhases; ++p) std::printf("%-14s %s\n", kPhaseNames[p], fixed_ms(max_ms[p]).c_str());
      if (o.check)
        std::printf("check: max_abs_err %.3g (vs float64 reference, over %lld finite values), "
                    "bitwise_equal %s (vs single-rank run)\n",
                    check.max_abs_err, static_cast<long long>(check.compared),
                    check.bitwise_equal ? "true" : "false");
      if (o.backward) {
        std::printf("backward: %s mode, kernel %s, bytes per rank (max over ranks) sent %lld, "
                    "received %lld, saved forward %lld\n",
                    o.backward_saved ? "saved" : "recompute", bkernels_text.c_str(),
                    static_cast<long long>(bmax_sent), static_cast<long long>(bmax_received),
                    static_cast<long long>(bmax_saved));
        std::string line = "backward ms:";
        for (int p = 0; p < kBackwardPhases; ++p)
          line += cat(p ? ", " : " ", kBackwardPhaseNames[p], " ", fixed_ms3(bmax_ms[p]));
        std::printf("%s   (median over iterations, max over ranks)\n", line.c_str());
        if (o.check) {
          std::string c = "check backward:";
          for (int g = 0; g < kGradients; ++g) {
            const GradientCheck& r = check.gradients[g];
            c += cat(g ? "; " : " ", kGradientNames[g], " max_abs_err ", float_text(r.max_abs_err),
                     " bitwise_equal ", r.bitwise_equal ? "true" : "false");
          }
          std::printf("%s\n", c.c_str());
        }
      }
      if (!o.save_dir.empty())
        std::printf("saved %s to %s%s\n", saved.c_str(), o.save_dir.c_str(),
                    s.save_outputs_only ? " (the --load directory: its inputs are kept as they were)" : "");
    }
    std::fflush(stdout);
    if (o.check && !check.bitwise_equal)
      std::fprintf(stderr, "uaa run: check failed: the %d-rank output is NOT bitwise equal to the single-rank run\n", P);
    if (check.nonfinite_outputs)
      std::fprintf(stderr, "uaa run: check failed: %lld output value(s) are NaN/Inf where the float64 "
                   "reference is finite (first: %s)\n",
                   static_cast<long long>(check.nonfinite_outputs), check.first_nonfinite_output.c_str());
    if (check.nonfinite_inputs)
      std::fprintf(stderr, "uaa run: check failed: the inputs hold %lld NaN/Inf value(s) (first: %s); "
                   "--check needs finite inputs (max_abs_err covers the finite values only)\n",
                   static_cast<long long>(check.nonfinite_inputs), check.first_nonfinite_input.c_str());
    for (int g = 0; o.check && o.backward && g < kGradients; ++g) {
      const GradientCheck& c = check.gradients[g];
      if (!c.bitwise_equal && c.bitwise_expected)
        std::fprintf(stderr, "uaa run: check failed: the %d-rank %s is NOT bitwise equal to the "
                     "single-rank run\n", P, kGradientNames[g]);
      if (c.nonfinite)
        std::fprintf(stderr, "uaa run: check failed: %lld %s value(s) are NaN/Inf where the float64 "
                     "reference is finite (first: %s)\n",
                     static_cast<long long>(c.nonfinite), kGradientNames[g], c.first_nonfinite.c_str());
    }
    std::fflush(stderr);
  }
  return check_failed ? 1 : 0;
}

}  // namespace

int run_main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  // Errors of MPI calls become uaa::Error (MPICH reports request errors on MPI_COMM_WORLD).
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  int me = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &me);

  // 1. This rank's arguments and environment, without stopping on an error.
  RunOptions o;
  Environment env;
  std::string local_error;
  try {
    o = parse_run_args(std::span<const char* const>(argv + 1, argc > 0 ? argc - 1 : 0));
    env.progress_seconds = Progress::interval_from_env();
    env.memory = mem::detect();
  } catch (const std::exception& e) {
    local_error = e.what();
  }

  int status = 0;
  {
    std::shared_ptr<Communicator> comm;
    try {
      // 2. The communicator (collective, under the deadline; its own errors are agreed).
      comm = collective([&] { return make_mpi_communicator(MPI_COMM_WORLD); },
                        "make_mpi_communicator");
      ToolControl ctl(*comm);
      // 3. The options, agreed.
      agree_options(ctl, o, local_error);
      if (o.help) {
        if (me == 0) std::fputs(run_usage(), stdout);
      } else {
        status = run(ctl, o, env);
      }
    } catch (const AgreedError& e) {
      // The same on every rank: one report.
      if (me == 0) {
        std::fflush(stdout);
        std::fprintf(stderr, "uaa run: %s\n", e.message.c_str());
        std::fflush(stderr);
      }
      status = 2;
    } catch (const std::bad_alloc&) {
      abort_job("out of memory");
    } catch (const std::exception& e) {
      abort_job(e.what());  // this rank only: its peers cannot know, so end the job
    }
  }
  MPI_Finalize();
  return status;
}

}  // namespace uaa::cli
