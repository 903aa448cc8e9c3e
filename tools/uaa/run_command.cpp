// `uaa run`: builds a plan for the given layout, runs forward() over MPI_COMM_WORLD, reports phase
// timings, the kernel and the data path (peer memory or messages, from uaa::last_call) and, with
// --check, compares against a single-rank run (bitwise) and a float64 reference.
//
// Failure handling: every step that can fail on some ranks only (reading files, allocating, the
// rank-0 work of --check/--save) runs inside local_step(), which ends with an agreement among all
// ranks, so all ranks either continue or stop with the same message: nothing hangs, nothing aborts.
// Library collectives (Plan::create, forward) already raise the same uaa::Error on every rank.
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <time.h>
#include <filesystem>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "args.h"
#include "commands.h"
#include "data.h"
#include "json.h"
#include "kernels/kernel.h"
#include "npy.h"
#include "text.h"
#include "uaa/mpi.h"
#include "uaa/uaa.h"

namespace uaa::cli {
namespace {

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// An error every rank knows about, with the same message. `origin` is the rank it came from, or -1
// when every rank raised it (library collectives).
struct AgreedError {
  int origin;
  std::string message;
};

std::string list_text(const std::vector<std::int64_t>& v) {
  std::string s = "[";
  for (std::size_t i = 0; i < v.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(v[i]);
  }
  return s + "]";
}

// Waits for every rank without spinning a core (ranks idle while rank 0 runs the --check
// reference, and cores are often oversubscribed).
void polite_barrier(MPI_Comm comm) {
  MPI_Request req;
  MPI_Ibarrier(comm, &req);
  int done = 0;
  long sleep_us = 50;
  while (true) {
    MPI_Test(&req, &done, MPI_STATUS_IGNORE);
    if (done) return;
    timespec ts{0, sleep_us * 1000};
    nanosleep(&ts, nullptr);
    sleep_us = std::min(sleep_us * 2, 2000L);
  }
}

// All ranks call this with their local verdict ("" = ok). If any rank failed, every rank throws
// AgreedError with the message of the lowest failing rank.
void agree(MPI_Comm comm, const std::string& local_error) {
  int rank = 0;
  MPI_Comm_rank(comm, &rank);
  polite_barrier(comm);
  int mine[2] = {local_error.empty() ? INT_MAX : rank, local_error.empty() ? 0 : 1};
  int first = INT_MAX, failed = 0;
  MPI_Allreduce(&mine[0], &first, 1, MPI_INT, MPI_MIN, comm);
  if (first == INT_MAX) return;
  MPI_Allreduce(&mine[1], &failed, 1, MPI_INT, MPI_SUM, comm);
  // Do the failing ranks all report the same message? (min and max of a hash over them)
  std::uint64_t h = 1469598103934665603ull;
  for (unsigned char c : local_error) h = (h ^ c) * 1099511628211ull;
  std::uint64_t lo_in = local_error.empty() ? UINT64_MAX : h, hi_in = local_error.empty() ? 0 : h;
  std::uint64_t lo = 0, hi = 0;
  MPI_Allreduce(&lo_in, &lo, 1, MPI_UINT64_T, MPI_MIN, comm);
  MPI_Allreduce(&hi_in, &hi, 1, MPI_UINT64_T, MPI_MAX, comm);
  std::string msg = rank == first ? local_error : std::string();
  int len = static_cast<int>(std::min<std::size_t>(msg.size(), 4096));
  MPI_Bcast(&len, 1, MPI_INT, first, comm);
  msg.resize(static_cast<std::size_t>(len));
  MPI_Bcast(msg.data(), len, MPI_CHAR, first, comm);
  if (failed > 1 && lo != hi) msg += cat(" (and ", failed - 1, " more rank(s) failed differently)");
  throw AgreedError{first, msg};
}

// Runs rank-local work `f` on every rank, then agrees on the outcome.
template <typename F>
void local_step(MPI_Comm comm, F&& f) {
  std::string error;
  try {
    f();
  } catch (const std::bad_alloc&) {
    error = "out of memory";
  } catch (const std::exception& e) {
    error = e.what();
    if (error.empty()) error = "unknown error";
  } catch (...) {
    error = "unknown error";
  }
  agree(comm, error);
}

// Runs a library collective; its uaa::Error is the same on every rank.
template <typename F>
auto collective(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const Error& e) {
    throw AgreedError{-1, e.what()};
  }
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

// [tokens][heads][dim] host tensor of f32 or bf16 elements.
struct HostTensor {
  DType dtype = DType::f32;
  std::int64_t tokens = 0, heads = 0, dim = 0;
  std::vector<float> storage;  // float-aligned bytes

  HostTensor() = default;
  HostTensor(DType dt, std::int64_t t, std::int64_t h, std::int64_t d)
      : dtype(dt), tokens(t), heads(h), dim(d) {
    storage.resize(static_cast<std::size_t>((bytes() + 3) / 4));
  }
  std::int64_t elements() const { return tokens * heads * dim; }
  std::int64_t bytes() const { return elements() * static_cast<std::int64_t>(dtype_size(dtype)); }
  void* data() { return storage.data(); }
  const void* data() const { return storage.data(); }
  ConstTensor view() const { return contiguous(data(), tokens, heads, dim, dtype); }
  Tensor view() { return contiguous(data(), tokens, heads, dim, dtype); }

  // Stores f32 values in this tensor's dtype (bf16: round to nearest even).
  void assign(const std::vector<float>& values) {
    if (dtype == DType::f32) {
      std::copy(values.begin(), values.end(), storage.begin());
    } else {
      auto* p = static_cast<std::uint16_t*>(data());
      for (std::size_t i = 0; i < values.size(); ++i) p[i] = uaa::bf16_from_f32(values[i]);
    }
  }
  // The stored values as f32 (exact for both dtypes).
  std::vector<float> to_f32() const {
    if (dtype == DType::f32) return {storage.begin(), storage.begin() + elements()};
    std::vector<float> out(static_cast<std::size_t>(elements()));
    const auto* p = static_cast<const std::uint16_t*>(data());
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = uaa::f32_from_bf16(p[i]);
    return out;
  }
};

// The resolved run: shape, lengths and where the data comes from.
struct Setup {
  std::int64_t heads = 0, kv_heads = 0, head_dim = 0;
  std::vector<std::int64_t> lens, kv_lens;
  std::int64_t q_total = 0, kv_total = 0;
  bool from_files = false;
  std::string paths[3];
  npy::Header headers[3];
};

Setup resolve(const RunOptions& o, int ranks) {
  Setup s;
  std::int64_t file_q = -1, file_kv = -1;
  if (!o.load_dir.empty()) {
    s.from_files = true;
    const char* names[3] = {"q.npy", "k.npy", "v.npy"};
    for (int t = 0; t < 3; ++t) {
      s.paths[t] = (std::filesystem::path(o.load_dir) / names[t]).string();
      s.headers[t] = npy::read_header(s.paths[t]);
      if (s.headers[t].shape.size() != 3)
        throw ArgError(cat(s.paths[t], ": shape ", npy::shape_string(s.headers[t].shape),
                           " is not [tokens, heads, head_dim]"));
    }
    const auto& q = s.headers[0].shape;
    const auto& k = s.headers[1].shape;
    const auto& v = s.headers[2].shape;
    if (k != v)
      throw ArgError(cat(s.paths[2], ": shape ", npy::shape_string(v), " differs from k.npy's ",
                         npy::shape_string(k)));
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
    s.heads = q[1];
    s.kv_heads = k[1];
    s.head_dim = q[2];
    file_q = q[0];
    file_kv = k[0];
  } else {
    s.heads = *o.heads;
    s.kv_heads = o.kv_heads.value_or(s.heads);
    s.head_dim = o.head_dim.value_or(128);
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

  // Every buffer size must fit; the gather to rank 0 counts rows of one token in an int.
  const std::int64_t es = static_cast<std::int64_t>(dtype_size(o.dtype));
  const std::int64_t q_row = mul(mul(s.heads, s.head_dim, "heads * head_dim"), 4, "a token row");
  const std::int64_t kv_row = mul(mul(s.kv_heads, s.head_dim, "kv_heads * head_dim"), 4, "a token row");
  mul(s.q_total, q_row, "the query tensor size");
  mul(s.kv_total, kv_row, "the key/value tensor size");
  if ((o.check || !o.save_dir.empty()) &&
      (s.q_total > INT_MAX || s.kv_total > INT_MAX || q_row / 4 * es > INT_MAX))
    throw ArgError("--check and --save gather whole tensors on rank 0 and support at most " +
                   std::to_string(INT_MAX) + " tokens and rows of at most that many bytes");
  return s;
}

// Fills tokens [first, first + n) of tensor t (kQ, kK, kV) as f32.
std::vector<float> input_rows(const Setup& s, const RunOptions& o, int t, std::int64_t first,
                              std::int64_t n) {
  const std::int64_t heads = t == kQ ? s.heads : s.kv_heads;
  std::vector<float> out(static_cast<std::size_t>(n * heads * s.head_dim));
  if (s.from_files)
    npy::read_rows(s.paths[t], s.headers[t], first, n, out.data());
  else
    generate(o.seed, t, first, n, heads, s.head_dim, out.data());
  return out;
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

struct CheckResult {
  double max_abs_err = 0;
  bool bitwise_equal = false;
};

// Rank 0 only: the whole inputs, optional save, the single-rank run and the float64 reference.
CheckResult rank0_work(const RunOptions& o, const Setup& s, const AttentionShape& shape,
                       const HostTensor& out_gathered) {
  CheckResult result;
  HostTensor q(o.dtype, s.q_total, s.heads, s.head_dim);
  HostTensor k(o.dtype, s.kv_total, s.kv_heads, s.head_dim);
  HostTensor v(o.dtype, s.kv_total, s.kv_heads, s.head_dim);
  q.assign(input_rows(s, o, kQ, 0, s.q_total));
  k.assign(input_rows(s, o, kK, 0, s.kv_total));
  v.assign(input_rows(s, o, kV, 0, s.kv_total));
  // f32 copies of exactly what the kernel sees (bf16-rounded for bf16).
  const std::vector<float> qf = q.to_f32(), kf = k.to_f32(), vf = v.to_f32();
  const std::vector<float> of = out_gathered.to_f32();

  if (!o.save_dir.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(o.save_dir, ec);
    if (ec) throw Error(ErrorCode::invalid_argument, "--save: cannot create " + o.save_dir + ": " + ec.message());
    auto path = [&](const char* name) { return (std::filesystem::path(o.save_dir) / name).string(); };
    const std::int64_t qs[3] = {s.q_total, s.heads, s.head_dim};
    const std::int64_t ks[3] = {s.kv_total, s.kv_heads, s.head_dim};
    npy::write(path("q.npy"), qs, qf.data());
    npy::write(path("k.npy"), ks, kf.data());
    npy::write(path("v.npy"), ks, vf.data());
    npy::write(path("out.npy"), qs, of.data());
  }

  if (o.check) {
    // The same kernel on one rank holding the whole sequence.
    std::shared_ptr<Communicator> self = make_mpi_communicator(MPI_COMM_SELF);
    const Plan plan = Plan::create(*self, shape, s.q_total, s.kv_total);
    HostTensor single(o.dtype, s.q_total, s.heads, s.head_dim);
    AttentionArgs a;
    a.q = q.view();
    a.k = k.view();
    a.v = v.view();
    a.out = single.view();
    Workspace ws;
    forward(plan, a, ws);
    result.bitwise_equal =
        single.bytes() == 0 ||
        std::memcmp(single.data(), out_gathered.data(), static_cast<std::size_t>(single.bytes())) == 0;

    std::vector<double> ref(static_cast<std::size_t>(s.q_total * s.heads * s.head_dim));
    detail::reference_attention(qf.data(), kf.data(), vf.data(), s.q_total, s.kv_total, s.heads,
                                s.kv_heads, s.head_dim, plan.shape().scale, shape.causal,
                                ref.data(), nullptr);
    double err = 0;
    for (std::size_t i = 0; i < ref.size(); ++i) {
      const double d = std::fabs(static_cast<double>(of[i]) - ref[i]);
      if (!(d <= err)) err = d;  // NaN propagates
      if (std::isnan(err)) break;
    }
    result.max_abs_err = err;
  }
  return result;
}

std::string fixed_ms(double ms) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%12.3f", ms);
  return buf;
}

// The whole command on one rank. Returns the exit status; throws ArgError / AgreedError.
int run(const RunOptions& o, int me, int P) {
  MPI_Comm world = MPI_COMM_WORLD;
  Setup s;
  local_step(world, [&] { s = resolve(o, P); });

  std::shared_ptr<Communicator> comm = make_mpi_communicator(world);
  AttentionShape shape;
  shape.q_heads = s.heads;
  shape.kv_heads = s.kv_heads;
  shape.head_dim = s.head_dim;
  shape.dtype = o.dtype;
  shape.causal = o.causal;
  PlanOptions options;
  options.strategy = o.strategy;

  MPI_Barrier(world);
  const auto t_plan = Clock::now();
  const Plan plan = collective([&] {
    return Plan::create(*comm, shape, s.lens[static_cast<std::size_t>(me)],
                        s.kv_lens[static_cast<std::size_t>(me)], options);
  });
  const double plan_ms = ms_since(t_plan);

  // My shards.
  HostTensor q, k, v, out;
  local_step(world, [&] {
    const std::int64_t fq = first_token(s.lens, me), fkv = first_token(s.kv_lens, me);
    const std::int64_t nq = plan.q_tokens(), nkv = plan.kv_tokens();
    q = HostTensor(o.dtype, nq, s.heads, s.head_dim);
    k = HostTensor(o.dtype, nkv, s.kv_heads, s.head_dim);
    v = HostTensor(o.dtype, nkv, s.kv_heads, s.head_dim);
    out = HostTensor(o.dtype, nq, s.heads, s.head_dim);
    q.assign(input_rows(s, o, kQ, fq, nq));
    k.assign(input_rows(s, o, kK, fkv, nkv));
    v.assign(input_rows(s, o, kV, fkv, nkv));
  });

  AttentionArgs args;
  args.q = q.view();
  args.k = k.view();
  args.v = v.view();
  args.out = out.view();
  Workspace ws;
  if (o.iters > 1) {
    MPI_Barrier(world);
    collective([&] { forward(plan, args, ws); });
  }
  std::vector<std::vector<double>> phase(kPhases);
  for (std::int64_t i = 0; i < o.iters; ++i) {
    PhaseTimes t;
    MPI_Barrier(world);
    collective([&] { forward(plan, args, ws, &t); });
    const double values[kPhases - 1] = {t.handshake, t.pack,   t.exchange_qkv, t.attention,
                                        t.exchange_out, t.unpack, t.total};
    for (int p = 0; p < kPhases - 1; ++p) phase[static_cast<std::size_t>(p + 1)].push_back(values[p]);
  }
  double local_ms[kPhases] = {plan_ms}, max_ms[kPhases] = {};
  for (int p = 1; p < kPhases; ++p) local_ms[p] = median(phase[static_cast<std::size_t>(p)]);
  MPI_Reduce(local_ms, max_ms, kPhases, MPI_DOUBLE, MPI_MAX, 0, world);
  const std::int64_t sent = plan.bytes_sent();
  std::int64_t max_sent = 0;
  MPI_Reduce(&sent, &max_sent, 1, MPI_INT64_T, MPI_MAX, 0, world);
  const char* kernel = kernel_name();
  // How the timed calls moved data (the same on every rank: peer memory needs it everywhere).
  const char* data_path = last_call(ws).peer_memory ? "peer_memory" : "messages";

  // Output to rank 0, one MPI element per token row.
  CheckResult check;
  if (o.check || !o.save_dir.empty()) {
    HostTensor gathered;
    local_step(world, [&] {
      if (me == 0) gathered = HostTensor(o.dtype, s.q_total, s.heads, s.head_dim);
    });
    MPI_Datatype row;
    MPI_Type_contiguous(static_cast<int>(s.heads * s.head_dim * static_cast<std::int64_t>(dtype_size(o.dtype))),
                        MPI_BYTE, &row);
    MPI_Type_commit(&row);
    std::vector<int> counts(static_cast<std::size_t>(P)), displs(static_cast<std::size_t>(P));
    for (int r = 0; r < P; ++r) {
      counts[static_cast<std::size_t>(r)] = static_cast<int>(s.lens[static_cast<std::size_t>(r)]);
      displs[static_cast<std::size_t>(r)] = static_cast<int>(first_token(s.lens, r));
    }
    MPI_Gatherv(out.data(), static_cast<int>(out.tokens), row, gathered.data(), counts.data(),
                displs.data(), row, 0, world);
    MPI_Type_free(&row);

    local_step(world, [&] {
      if (me == 0) check = rank0_work(o, s, shape, gathered);
    });
    int bitwise = check.bitwise_equal ? 1 : 0;
    MPI_Bcast(&bitwise, 1, MPI_INT, 0, world);
    check.bitwise_equal = bitwise != 0;
  }

  if (me == 0) {
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
          .field("strategy", strategy_name(o.strategy))
          .field("iters", o.iters);
      if (!s.from_files) j.field("seed", static_cast<std::uint64_t>(o.seed));
      j.field("kernel", kernel).field("threads", uaa::num_threads()).field("data_path", data_path);
      j.begin_object("ms");
      for (int p = 0; p < kPhases; ++p) j.field(kPhaseNames[p], max_ms[p]);
      j.end_object().field("bytes_sent", max_sent);
      if (o.check) j.field("max_abs_err", check.max_abs_err).field("bitwise_equal", check.bitwise_equal);
      if (!o.load_dir.empty()) j.field("load", o.load_dir);
      if (!o.save_dir.empty()) j.field("save", o.save_dir);
      std::printf("%s\n", j.str().c_str());
    } else {
      std::printf("uaa run: %d rank%s, q lens %s (%lld), kv lens %s (%lld), heads %lld q / %lld kv, "
                  "head_dim %lld, %s%s, %lld iter%s, kernel %s x %d thread%s, %s\n",
                  P, P == 1 ? "" : "s", list_text(s.lens).c_str(), static_cast<long long>(s.q_total),
                  list_text(s.kv_lens).c_str(), static_cast<long long>(s.kv_total),
                  static_cast<long long>(s.heads), static_cast<long long>(s.kv_heads),
                  static_cast<long long>(s.head_dim), dtype_name(o.dtype), o.causal ? ", causal" : "",
                  static_cast<long long>(o.iters), o.iters == 1 ? "" : "s", kernel, uaa::num_threads(),
                  uaa::num_threads() == 1 ? "" : "s",
                  (s.from_files ? cat("data ", o.load_dir) : cat("seed ", o.seed)).c_str());
      std::printf("data_path: %s, kernel: %s\n", data_path, kernel);
      std::printf("bytes sent per rank (max over ranks): %lld\n", static_cast<long long>(max_sent));
      std::printf("%-14s %12s   (median over iterations, max over ranks)\n", "phase", "ms");
      for (int p = 0; p < kPhases; ++p) std::printf("%-14s %s\n", kPhaseNames[p], fixed_ms(max_ms[p]).c_str());
      if (o.check)
        std::printf("check: max_abs_err %.3g (vs float64 reference), bitwise_equal %s (vs single-rank run)\n",
                    check.max_abs_err, check.bitwise_equal ? "true" : "false");
      if (!o.save_dir.empty()) std::printf("saved q.npy, k.npy, v.npy, out.npy to %s\n", o.save_dir.c_str());
    }
    std::fflush(stdout);
    if (o.check && !check.bitwise_equal)
      std::fprintf(stderr, "uaa run: rank 0: the %d-rank output is NOT bitwise equal to the single-rank run\n", P);
  }
  return o.check && !check.bitwise_equal ? 1 : 0;
}

}  // namespace

int run_main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int me = 0, P = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &me);
  MPI_Comm_size(MPI_COMM_WORLD, &P);
  int status = 0;
  auto report = [&](int rank, const std::string& message) {
    std::fprintf(stderr, "uaa run: rank %d: %s\n", rank, message.c_str());
    std::fflush(stderr);
  };
  try {
    const RunOptions o = parse_run_args(std::span<const char* const>(argv + 1, argc > 0 ? argc - 1 : 0));
    if (o.help) {
      if (me == 0) std::fputs(run_usage(), stdout);
    } else {
      status = run(o, me, P);
    }
  } catch (const ArgError& e) {
    // Every rank parsed the same argv: one report is enough.
    if (me == 0) report(0, e.what());
    status = 2;
  } catch (const AgreedError& e) {
    if (me == 0) report(e.origin >= 0 ? e.origin : me, e.message);
    status = 2;
  } catch (const std::exception& e) {
    report(me, e.what());  // possibly this rank only
    status = 2;
  }
  MPI_Finalize();
  return status;
}

}  // namespace uaa::cli
