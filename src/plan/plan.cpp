#include <algorithm>
#include <cmath>
#include <cstring>

#include "comm/control_plane.h"
#include "core/agreement.h"
#include "common/strings.h"
#include "kernels/kernel.h"
#include "plan/plan_data.h"
#include "uaa/error.h"
#include "uaa/plan.h"

namespace uaa {
namespace detail {
namespace {

// Returns an empty string when the shape is valid, else what is wrong with it.
std::string shape_problem(const AttentionShape& s) {
  if (s.q_heads < 1) return cat("q_heads ", s.q_heads, " must be >= 1");
  if (s.q_heads > 2147483647) return cat("q_heads ", s.q_heads, " is above 2^31 - 1");
  if (s.kv_heads < 0) return cat("kv_heads ", s.kv_heads, " must be >= 1 (or 0 for q_heads)");
  const std::int64_t kv = s.kv_heads == 0 ? s.q_heads : s.kv_heads;
  if (s.q_heads % kv != 0)
    return cat("q_heads ", s.q_heads, " is not a multiple of kv_heads ", kv);
  if (s.head_dim < 1 || s.head_dim > kMaxHeadDim)
    return cat("head_dim ", s.head_dim, " is outside [1, ", kMaxHeadDim, "]");
  if (s.dtype != DType::f32 && s.dtype != DType::bf16)
    return cat("dtype ", static_cast<int>(s.dtype), " is not a known dtype");
  if (!std::isfinite(s.scale)) return cat("scale ", s.scale, " is not finite");
  if (s.batch < 1) return cat("batch ", s.batch, " must be >= 1");
  if (s.batch > 2147483647 / s.q_heads)
    return cat("batch ", s.batch, " x q_heads ", s.q_heads, " is above 2^31 - 1");
  if (s.window_left < -1)
    return cat("window_left ", s.window_left, " is negative (-1 means no bound on the left)");
  if (s.window_right < -1)
    return cat("window_right ", s.window_right, " is negative (-1 means no bound on the right)");
  return {};
}

// What is wrong with the documents in themselves ("" if nothing).
std::string docs_problem(const Documents& d) {
  if (!d.kv.empty() && d.kv.size() != d.q.size())
    return cat("documents: ", d.q.size(), " query lengths but ", d.kv.size(), " key/value lengths");
  for (std::size_t i = 0; i < d.q.size(); ++i)
    if (d.q[i] < 0) return cat("documents: query length ", i, " is ", d.q[i], " (negative)");
  for (std::size_t i = 0; i < d.kv.size(); ++i)
    if (d.kv[i] < 0) return cat("documents: key/value length ", i, " is ", d.kv[i], " (negative)");
  return {};
}

// The documents against the totals every rank knows ("" if they fit), and the strategy.
// *code: unsupported for a strategy that cannot run documents, else invalid_argument.
std::string docs_fit_problem(const Documents& d, const AttentionShape& s, const PlanOptions& o,
                             std::int64_t q_total, std::int64_t kv_total, ErrorCode* code) {
  *code = ErrorCode::invalid_argument;
  if ((d.q.size() > 1 || s.batch > 1) && o.strategy != Strategy::uaa) {
    *code = ErrorCode::unsupported;
    return cat("documents and batches need strategy uaa (the plan has ", strategy_name(o.strategy), ")");
  }
  if (d.q.empty()) return {};
  __int128 q = 0, kv = 0;
  for (std::int64_t x : d.q) q += x;
  for (std::int64_t x : (d.kv.empty() ? d.q : d.kv)) kv += x;
  if (q != q_total)
    return cat("documents: the ", d.q.size(), " query lengths sum to ", static_cast<long double>(q),
               " but the ranks hold ", q_total, " query tokens");
  if (kv != kv_total)
    return cat("documents: the ", d.q.size(), " key/value lengths sum to ",
               static_cast<long double>(kv), " but the ranks hold ", kv_total, " key/value tokens");
  return {};
}


std::string options_problem(const PlanOptions& o) {
  if (static_cast<int>(o.strategy) > static_cast<int>(Strategy::allgather_kv))
    return cat("strategy ", static_cast<int>(o.strategy), " is not a known strategy");
  return {};
}

std::int64_t sum(const std::vector<std::int64_t>& v) {
  std::int64_t s = 0;
  for (std::int64_t x : v) s += x;
  return s;
}

// Returns "" when every byte count of every exchange fits comfortably in 64 bits, else the problem.
// (Counts are int64 bytes; an absurd length must be an error, not a signed overflow.)
std::string size_problem(const AttentionShape& s, const std::vector<std::int64_t>& q,
                         const std::vector<std::int64_t>& kv) {
  __int128 tokens = 0;
  for (std::int64_t n : q) tokens += n;
  for (std::int64_t n : kv) tokens += 2 * static_cast<__int128>(n);
  const std::int64_t heads = std::max(s.q_heads, s.kv_heads);
  const __int128 bytes = tokens * heads * std::max<std::int64_t>(s.batch, 1) * s.head_dim *
                         static_cast<std::int64_t>(dtype_size(s.dtype));
  constexpr __int128 kLimit = static_cast<__int128>(1) << 60;
  if (bytes > kLimit)
    return cat("the sequence is too large: q and k/v tokens x heads x head_dim come to ",
               static_cast<long double>(bytes), " bytes (limit 2^60)");
  return {};
}

AttentionShape normalized(AttentionShape s) {
  if (s.kv_heads == 0) s.kv_heads = s.q_heads;
  if (s.scale == 0.0f) s.scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  return s;
}

// FNV-1a over the fields all ranks must agree on.
struct Fnv {
  std::uint64_t h = 1469598103934665603ull;
  void add(const void* p, std::size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (std::size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  }
  template <typename T>
  void add(const T& v) { add(&v, sizeof v); }
};

// FNV-1a of the document lists as normalized (kv filled in; none when one document).
std::uint64_t docs_digest(const Documents& d) {
  Fnv f;
  const std::uint64_t n = d.q.size() > 1 ? d.q.size() : 0;
  f.add(n);
  if (n == 0) return f.h;
  f.add(d.q.data(), d.q.size() * sizeof(std::int64_t));
  const std::vector<std::int64_t>& kv = d.kv.empty() ? d.q : d.kv;
  f.add(kv.data(), kv.size() * sizeof(std::int64_t));
  return f.h;
}

std::uint64_t fingerprint_of(const AttentionShape& s, const PlanOptions& o,
                             const std::vector<std::int64_t>& q, const std::vector<std::int64_t>& kv,
                             const Documents& docs) {
  Fnv f;
  const std::int64_t ranks = static_cast<std::int64_t>(q.size());
  f.add(ranks);
  f.add(q.data(), q.size() * sizeof(std::int64_t));
  f.add(kv.data(), kv.size() * sizeof(std::int64_t));
  f.add(s.q_heads);
  f.add(s.kv_heads);
  f.add(s.head_dim);
  f.add(static_cast<std::uint8_t>(s.dtype));
  f.add(static_cast<std::uint8_t>(s.causal));
  f.add(static_cast<std::uint8_t>(s.return_lse));
  f.add(s.scale);
  f.add(static_cast<std::uint8_t>(o.strategy));
  f.add(static_cast<std::uint8_t>(o.allow_mixed_kernels));
  f.add(static_cast<std::uint8_t>(o.backward_order));
  f.add(s.batch);
  f.add(s.window_left);
  f.add(s.window_right);
  f.add(docs_digest(docs));
  return f.h;
}



}  // namespace

Geometry geometry_of(const PlanData& d) {
  const AttentionShape& s = d.shape;
  Geometry g;
  g.q_lens = d.q_lens;
  g.kv_lens = d.kv_lens;
  g.q_heads = s.q_heads;
  g.kv_heads = s.kv_heads;
  g.head_dim = s.head_dim;
  g.elem_bytes = static_cast<std::int64_t>(dtype_size(s.dtype));
  g.causal = s.causal;
  g.with_lse = s.return_lse;
  g.batch = s.batch;
  g.q_heads *= s.batch;
  g.kv_heads *= s.batch;
  g.window_left = s.window_left;
  g.window_right = s.window_right;
  g.q_doc_start = d.q_doc_start;
  g.kv_doc_start = d.kv_doc_start;
  return g;
}

const BackwardProgram& backward_program(const PlanData& d) {
  std::call_once(d.backward_once, [&] {
    d.backward = std::make_unique<const BackwardProgram>(
        compile_uaa_backward(geometry_of(d), d.work, d.rank,
                             d.options.backward_order == BackwardOrder::canonical));
  });
  return *d.backward;
}

namespace {

// O(P) for this rank: the work split of all ranks (O(P log S)) and this rank's program (O(P)).
std::shared_ptr<PlanData> build(Communicator& comm, const AttentionShape& shape,
                                const PlanOptions& options, std::vector<std::int64_t> q_lens,
                                std::vector<std::int64_t> kv_lens, const Documents& docs) {
  auto d = std::make_shared<PlanData>();
  d->shape = normalized(shape);
  d->options = options;
  d->ranks = comm.size();
  d->rank = comm.rank();
  d->q_lens = std::move(q_lens);
  d->kv_lens = std::move(kv_lens);
  d->q_start = prefix_sums(d->q_lens);
  d->kv_start = prefix_sums(d->kv_lens);
  if (docs.q.size() > 1) {
    d->docs = docs;
    if (d->docs.kv.empty()) d->docs.kv = d->docs.q;
    d->q_doc_start = prefix_sums(d->docs.q);
    d->kv_doc_start = prefix_sums(d->docs.kv);
  } else {
    d->docs.q = {d->q_start.back()};
    d->docs.kv = {d->kv_start.back()};
  }
  const Geometry g = geometry_of(*d);
  d->work = split_work(work_input(g));
  switch (options.strategy) {
    case Strategy::uaa: d->forward = compile_uaa_forward(g, d->work, d->rank); break;
    case Strategy::ulysses:
    case Strategy::ulysses_pad: d->forward = compile_padded_forward(g, d->rank); break;
    case Strategy::allgather_kv: d->forward = compile_allgather_kv_forward(g, d->rank); break;
  }
  d->fingerprint = fingerprint_of(d->shape, options, d->q_lens, d->kv_lens, d->docs);
  d->comm = comm.shared_from_this();
  return d;
}

// Why `ulysses` cannot run this layout ("" if it can): the totals must divide by the rank count,
// every rank must hold total/P tokens, and q_heads must divide by the rank count.
std::string ulysses_problem(const std::vector<std::int64_t>& q_lens,
                            const std::vector<std::int64_t>& kv_lens, std::int64_t q_heads) {
  const std::int64_t P = static_cast<std::int64_t>(q_lens.size());
  const char* hint = " (strategy uaa runs any layout; ulysses_pad pads it)";
  const std::int64_t q = sum(q_lens), kv = sum(kv_lens);
  if (q % P != 0)
    return cat("strategy ulysses needs the query total to divide by the rank count: ", q,
               " tokens over ", P, " ranks", hint);
  if (kv % P != 0)
    return cat("strategy ulysses needs the key/value total to divide by the rank count: ", kv,
               " tokens over ", P, " ranks", hint);
  for (std::int64_t j = 0; j < P; ++j) {
    if (q_lens[j] != q / P)
      return cat("strategy ulysses needs every rank to hold total/P = ", q / P,
                 " query tokens but rank ", j, " holds ", q_lens[j], hint);
    if (kv_lens[j] != kv / P)
      return cat("strategy ulysses needs every rank to hold total/P = ", kv / P,
                 " key/value tokens but rank ", j, " holds ", kv_lens[j], hint);
  }
  if (q_heads % P != 0)
    return cat("strategy ulysses needs q_heads to divide by the rank count: ", q_heads,
               " heads over ", P, " ranks", hint);
  return {};
}

// Fixed-size record that Plan::create all-gathers once the ranks agreed to go on: this rank's
// lengths and its view of the shape and options.
struct PlanRecord {
  std::uint64_t magic;
  std::int64_t q_len, kv_len, q_heads, kv_heads, head_dim, ranks;
  std::int64_t batch, window_left, window_right, documents;
  std::uint64_t docs_digest;
  float scale;
  std::uint8_t dtype, causal, return_lse, strategy, allow_mixed, backward_order;
};
constexpr std::uint64_t kPlanRecordMagic = 0x336e616c70616175ull;  // "uaaplan3"

// Problems of this process only (its kernel cannot run the dtype; kernel selection failed).
std::string local_problem(const AttentionShape& shape, ErrorCode& code) {
  try {
    if (!kernel_supports(shape.dtype)) {
      code = ErrorCode::unsupported;
      return cat("dtype ", dtype_name(shape.dtype), " is not supported by kernel ",
                 select_kernel().name());
    }
  } catch (const Error& e) {
    code = e.code();
    return e.what();
  }
  return {};
}

}  // namespace
}  // namespace detail

using detail::cat;

const detail::PlanData& detail::plan_data(const Plan& plan) { return *plan.data_; }

Plan Plan::create(Communicator& comm, const AttentionShape& shape, std::int64_t q_tokens,
                  std::int64_t kv_tokens, const PlanOptions& options) {
  return create(comm, shape, q_tokens, kv_tokens, Documents{}, options);
}

Plan Plan::create(Communicator& comm, const AttentionShape& shape, std::int64_t q_tokens,
                  std::int64_t kv_tokens, const Documents& docs, const PlanOptions& options) {
  const int me = comm.rank(), P = comm.size();
  std::string problem;
  ErrorCode code = ErrorCode::invalid_argument;
  if (options.caller_problem != nullptr) {
    problem = options.caller_problem;  // first: the values a binding passed with it mean nothing
  } else if (q_tokens < 0) {
    problem = cat("q_tokens ", q_tokens, " is negative");
  } else if (kv_tokens < 0) {
    problem = cat("kv_tokens ", kv_tokens, " is negative");
  } else if (!(problem = detail::shape_problem(shape)).empty()) {
  } else if (!(problem = detail::options_problem(options)).empty()) {
  } else if (!(problem = detail::docs_problem(docs)).empty()) {
  } else {
    problem = detail::local_problem(shape, code);
  }
  // First agree (64 bytes per rank, O(log P) messages): a rank that cannot go on says so and
  // every rank raises its error; nobody is left in the all-gather below.
  detail::Vote vote;
  vote.kind = detail::VoteKind::plan_create;
  if (!problem.empty()) {
    vote.failed = true;
    vote.code = code;
    vote.message = cat("uaa::Plan::create: rank ", me, ": ", problem);
  }
  detail::raise_agreed_error(detail::control_plane(comm).agree(vote),
                             {"uaa::Plan::create", false, false});

  detail::PlanRecord mine{};
  mine.magic = detail::kPlanRecordMagic;
  mine.q_len = q_tokens;
  mine.kv_len = kv_tokens;
  mine.q_heads = shape.q_heads;
  mine.kv_heads = shape.kv_heads;
  mine.head_dim = shape.head_dim;
  mine.ranks = P;
  mine.scale = shape.scale;
  mine.dtype = static_cast<std::uint8_t>(shape.dtype);
  mine.causal = shape.causal;
  mine.return_lse = shape.return_lse;
  mine.strategy = static_cast<std::uint8_t>(options.strategy);
  mine.allow_mixed = options.allow_mixed_kernels;
  mine.backward_order = static_cast<std::uint8_t>(options.backward_order);
  mine.batch = shape.batch;
  mine.window_left = shape.window_left;
  mine.window_right = shape.window_right;
  mine.documents = docs.q.size() > 1 ? static_cast<std::int64_t>(docs.q.size()) : 1;
  mine.docs_digest = detail::docs_digest(docs);
  std::vector<detail::PlanRecord> all(P);
  comm.allgather(&mine, sizeof mine, all.data());

  // Every rank walks the same records in the same order, so every rank raises the same error.
  const detail::PlanRecord& ref = all[0];
  for (int j = 0; j < P; ++j) {
    const detail::PlanRecord& rec = all[j];
    if (rec.magic != detail::kPlanRecordMagic)
      throw Error(ErrorCode::internal, "uaa::Plan::create: corrupt plan record received");
    auto disagree = [&](const char* field, auto theirs, auto ours) {
      throw Error(ErrorCode::mismatch,
                  cat("uaa::Plan::create: ranks disagree on ", field, ": rank ", j, " has ", theirs,
                      " but rank 0 has ", ours));
    };
    if (rec.ranks != ref.ranks) disagree("communicator size", rec.ranks, ref.ranks);
    if (rec.q_heads != ref.q_heads) disagree("q_heads", rec.q_heads, ref.q_heads);
    if (rec.kv_heads != ref.kv_heads) disagree("kv_heads", rec.kv_heads, ref.kv_heads);
    if (rec.head_dim != ref.head_dim) disagree("head_dim", rec.head_dim, ref.head_dim);
    if (rec.dtype != ref.dtype)
      disagree("dtype", dtype_name(DType(rec.dtype)), dtype_name(DType(ref.dtype)));
    if (rec.causal != ref.causal) disagree("causal", int(rec.causal), int(ref.causal));
    if (rec.return_lse != ref.return_lse)
      disagree("return_lse", int(rec.return_lse), int(ref.return_lse));
    if (std::memcmp(&rec.scale, &ref.scale, sizeof(float)) != 0)
      disagree("scale", rec.scale, ref.scale);
    if (rec.strategy != ref.strategy)
      disagree("strategy", strategy_name(Strategy(rec.strategy)),
               strategy_name(Strategy(ref.strategy)));
    if (rec.allow_mixed != ref.allow_mixed)
      disagree("allow_mixed_kernels", int(rec.allow_mixed), int(ref.allow_mixed));
    if (rec.backward_order != ref.backward_order)
      disagree("backward_order", int(rec.backward_order), int(ref.backward_order));
    if (rec.batch != ref.batch) disagree("batch", rec.batch, ref.batch);
    if (rec.window_left != ref.window_left) disagree("window_left", rec.window_left, ref.window_left);
    if (rec.window_right != ref.window_right)
      disagree("window_right", rec.window_right, ref.window_right);
    if (rec.documents != ref.documents || rec.docs_digest != ref.docs_digest)
      disagree("documents", cat(rec.documents, " (digest ", rec.docs_digest, ")"),
               cat(ref.documents, " (digest ", ref.docs_digest, ")"));
  }
  std::vector<std::int64_t> q_lens(P), kv_lens(P);
  for (int j = 0; j < P; ++j) {
    q_lens[j] = all[j].q_len;
    kv_lens[j] = all[j].kv_len;
  }
  // Every rank has the same lengths now, so every rank reaches the same verdict.
  if (std::string p = detail::size_problem(shape, q_lens, kv_lens); !p.empty())
    throw Error(ErrorCode::invalid_argument, cat("uaa::Plan::create: ", p));
  if (options.strategy == Strategy::ulysses)
    if (std::string p = detail::ulysses_problem(q_lens, kv_lens, shape.q_heads); !p.empty())
      throw Error(ErrorCode::invalid_argument, "uaa::Plan::create: " + p);
  ErrorCode fit = ErrorCode::invalid_argument;
  if (std::string p = detail::docs_fit_problem(docs, shape, options, detail::sum(q_lens),
                                               detail::sum(kv_lens), &fit);
      !p.empty())
    throw Error(fit, cat("uaa::Plan::create: ", p));
  return Plan(detail::build(comm, shape, options, std::move(q_lens), std::move(kv_lens), docs));
}

Plan Plan::from_lengths(Communicator& comm, const AttentionShape& shape,
                        std::vector<std::int64_t> q_lens, std::vector<std::int64_t> kv_lens,
                        const PlanOptions& options) {
  return from_lengths(comm, shape, std::move(q_lens), std::move(kv_lens), Documents{}, options);
}

Plan Plan::from_lengths(Communicator& comm, const AttentionShape& shape,
                        std::vector<std::int64_t> q_lens, std::vector<std::int64_t> kv_lens,
                        const Documents& docs, const PlanOptions& options) {
  const int me = comm.rank(), P = comm.size();
  auto fail = [&](ErrorCode code, const std::string& what) {
    throw Error(code, cat("uaa::Plan::from_lengths: rank ", me, ": ", what));
  };
  // A binding's own finding comes first: the values it passed with it mean nothing.
  if (options.caller_problem != nullptr) fail(ErrorCode::invalid_argument, options.caller_problem);
  if (static_cast<int>(q_lens.size()) != P)
    fail(ErrorCode::invalid_argument, cat(q_lens.size(), " q lengths for ", P, " ranks"));
  if (static_cast<int>(kv_lens.size()) != P)
    fail(ErrorCode::invalid_argument, cat(kv_lens.size(), " kv lengths for ", P, " ranks"));
  for (int j = 0; j < P; ++j) {
    if (q_lens[j] < 0) fail(ErrorCode::invalid_argument, cat("q length of rank ", j, " is ", q_lens[j]));
    if (kv_lens[j] < 0) fail(ErrorCode::invalid_argument, cat("kv length of rank ", j, " is ", kv_lens[j]));
  }
  if (std::string p = detail::shape_problem(shape); !p.empty()) fail(ErrorCode::invalid_argument, p);
  if (std::string p = detail::options_problem(options); !p.empty()) fail(ErrorCode::invalid_argument, p);
  if (std::string p = detail::size_problem(shape, q_lens, kv_lens); !p.empty())
    fail(ErrorCode::invalid_argument, p);
  if (options.strategy == Strategy::ulysses)
    if (std::string p = detail::ulysses_problem(q_lens, kv_lens, shape.q_heads); !p.empty())
      fail(ErrorCode::invalid_argument, p);
  if (std::string p = detail::docs_problem(docs); !p.empty()) fail(ErrorCode::invalid_argument, p);
  ErrorCode fit = ErrorCode::invalid_argument;
  if (std::string p = detail::docs_fit_problem(docs, shape, options, detail::sum(q_lens),
                                               detail::sum(kv_lens), &fit);
      !p.empty())
    fail(fit, p);
  ErrorCode code = ErrorCode::unsupported;
  const std::string local = detail::local_problem(shape, code);
  auto d = detail::build(comm, shape, options, std::move(q_lens), std::move(kv_lens), docs);
  if (!local.empty()) {  // reported by the first forward() on every rank (see plan.h)
    d->failed = true;
    d->error_code = code;
    d->error_message = cat("uaa::Plan::from_lengths: rank ", me, ": ", local);
  }
  return Plan(std::move(d));
}

int Plan::ranks() const { return data_->ranks; }
int Plan::rank() const { return data_->rank; }
const AttentionShape& Plan::shape() const { return data_->shape; }
const PlanOptions& Plan::options() const { return data_->options; }
Communicator& Plan::communicator() const { return *data_->comm; }
const std::vector<std::int64_t>& Plan::q_lens() const { return data_->q_lens; }
const std::vector<std::int64_t>& Plan::kv_lens() const { return data_->kv_lens; }
std::int64_t Plan::q_tokens() const { return data_->q_lens[rank()]; }
std::int64_t Plan::kv_tokens() const { return data_->kv_lens[rank()]; }
std::int64_t Plan::q_total() const { return data_->q_start.back(); }
std::int64_t Plan::kv_total() const { return data_->kv_start.back(); }
std::int64_t Plan::batch() const { return data_->shape.batch; }
const Documents& Plan::documents() const { return data_->docs; }

Documents Documents::from_cu_seqlens(const std::vector<std::int64_t>& cu_q,
                                     const std::vector<std::int64_t>& cu_kv) {
  auto lengths = [](const std::vector<std::int64_t>& cu, const char* name) {
    std::vector<std::int64_t> out;
    if (cu.empty()) return out;
    if (cu[0] != 0)
      throw Error(ErrorCode::invalid_argument,
                  cat("uaa::Documents::from_cu_seqlens: ", name, "[0] is ", cu[0], ", not 0"));
    for (std::size_t i = 1; i < cu.size(); ++i) {
      if (cu[i] < cu[i - 1])
        throw Error(ErrorCode::invalid_argument,
                    cat("uaa::Documents::from_cu_seqlens: ", name, "[", i, "] = ", cu[i],
                        " is below ", name, "[", i - 1, "] = ", cu[i - 1]));
      out.push_back(cu[i] - cu[i - 1]);
    }
    return out;
  };
  return Documents{lengths(cu_q, "cu_q"), lengths(cu_kv, "cu_kv")};
}

namespace {
const detail::RankWork& work_of(const detail::PlanData& d, int r, const char* what) {
  if (r < 0 || r >= d.ranks)
    throw Error(ErrorCode::invalid_argument,
                cat("uaa::Plan::", what, ": rank ", r, " is outside [0, ", d.ranks, ")"));
  return d.work[static_cast<std::size_t>(r)];
}
}  // namespace

std::int64_t Plan::q_head_begin(int r) const { return work_of(*data_, r, "q_head_begin").q_heads.begin; }
std::int64_t Plan::q_head_end(int r) const { return work_of(*data_, r, "q_head_end").q_heads.end; }
std::int64_t Plan::kv_head_begin(int r) const { return work_of(*data_, r, "kv_head_begin").kv_heads.begin; }
std::int64_t Plan::kv_head_end(int r) const { return work_of(*data_, r, "kv_head_end").kv_heads.end; }
WorkRange Plan::work(int r) const {
  const detail::RankWork& w = work_of(*data_, r, "work");
  return {w.first_head, w.first_row, w.end_head, w.end_row};
}
std::int64_t Plan::staging_bytes() const {
  return data_->forward.stage_in_bytes + data_->forward.stage_out_bytes;
}
std::uint64_t Plan::fingerprint() const { return data_->fingerprint; }

std::int64_t Plan::bytes_sent() const { return data_->forward.bytes_sent(); }
std::int64_t Plan::backward_bytes_sent(bool saved) const {
  if (data_->options.strategy != Strategy::uaa) return 0;
  return detail::backward_program(*data_).bytes_sent(saved);
}
std::int64_t Plan::backward_bytes_received(bool saved) const {
  if (data_->options.strategy != Strategy::uaa) return 0;
  return detail::backward_program(*data_).bytes_received(saved);
}
std::int64_t Plan::saved_bytes() const {
  return data_->options.strategy == Strategy::uaa ? data_->forward.stage_in_bytes : 0;
}
std::int64_t Plan::bytes_received() const { return data_->forward.bytes_received(); }

const char* strategy_name(Strategy s) {
  switch (s) {
    case Strategy::uaa: return "uaa";
    case Strategy::ulysses: return "ulysses";
    case Strategy::ulysses_pad: return "ulysses_pad";
    case Strategy::allgather_kv: return "allgather_kv";
  }
  return "unknown";
}

bool parse_strategy(const std::string& name, Strategy* out) {
  for (Strategy s : {Strategy::uaa, Strategy::ulysses, Strategy::ulysses_pad, Strategy::allgather_kv})
    if (name == strategy_name(s)) {
      *out = s;
      return true;
    }
  return false;
}

std::string Plan::describe() const {
  const AttentionShape& s = data_->shape;
  const int r = rank();
  return cat("plan ", ranks(), " ranks, q_lens ", detail::list(q_lens()), " (total ", q_total(),
             "), kv_lens ", detail::list(kv_lens()), " (total ", kv_total(), "), heads ", s.q_heads,
             "/", s.kv_heads, " x ", s.head_dim, " ", dtype_name(s.dtype),
             s.causal ? " causal" : "",
             s.batch > 1 ? cat(", batch ", s.batch) : std::string(),
             s.window_left >= 0 || s.window_right >= 0
                 ? cat(", window (", s.window_left, ",", s.window_right, ")") : std::string(),
             data_->docs.q.size() > 1 ? cat(", ", data_->docs.q.size(), " documents") : std::string(),
             ", strategy ", strategy_name(data_->options.strategy), "; rank ", r,
             " computes (head, row)  [(", work(r).first_head, ",", work(r).first_row, "), (",
             work(r).end_head, ",", work(r).end_row, ")) reading kv heads [", kv_head_begin(r), ",",
             kv_head_end(r), ")");
}

}  // namespace uaa
