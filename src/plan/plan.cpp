#include <algorithm>
#include <cmath>
#include <cstring>

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
  if (s.kv_heads < 0) return cat("kv_heads ", s.kv_heads, " must be >= 1 (or 0 for q_heads)");
  const std::int64_t kv = s.kv_heads == 0 ? s.q_heads : s.kv_heads;
  if (s.q_heads % kv != 0)
    return cat("q_heads ", s.q_heads, " is not a multiple of kv_heads ", kv);
  if (s.head_dim < 1 || s.head_dim > kMaxHeadDim)
    return cat("head_dim ", s.head_dim, " is outside [1, ", kMaxHeadDim, "]");
  if (s.dtype != DType::f32 && s.dtype != DType::bf16)
    return cat("dtype ", static_cast<int>(s.dtype), " is not a known dtype");
  if (!std::isfinite(s.scale)) return cat("scale ", s.scale, " is not finite");
  if (static_cast<int>(s.strategy) > static_cast<int>(Strategy::allgather_kv))
    return cat("strategy ", static_cast<int>(s.strategy), " is not a known strategy");
  return {};
}

// Returns "" when every byte count of every exchange fits comfortably in 64 bits, else the problem.
// (Counts are int64 bytes; an absurd length must be an error, not a signed overflow.)
std::string size_problem(const AttentionShape& s, const std::vector<std::int64_t>& q,
                         const std::vector<std::int64_t>& kv) {
  __int128 tokens = 0;
  for (std::int64_t n : q) tokens += n;
  for (std::int64_t n : kv) tokens += 2 * static_cast<__int128>(n);
  const std::int64_t heads = std::max(s.q_heads, s.kv_heads);
  const __int128 bytes = tokens * heads * s.head_dim * static_cast<std::int64_t>(dtype_size(s.dtype));
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

std::uint64_t fingerprint_of(const AttentionShape& s, const std::vector<std::int64_t>& q,
                             const std::vector<std::int64_t>& kv) {
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
  f.add(static_cast<std::uint8_t>(s.strategy));
  return f.h;
}

std::shared_ptr<PlanData> build(Communicator& comm, const AttentionShape& shape,
                                std::vector<std::int64_t> q_lens,
                                std::vector<std::int64_t> kv_lens) {
  auto d = std::make_shared<PlanData>();
  d->shape = normalized(shape);
  d->q_lens = std::move(q_lens);
  d->kv_lens = std::move(kv_lens);
  LayoutInput in;
  in.q_lens = d->q_lens;
  in.kv_lens = d->kv_lens;
  in.q_heads = d->shape.q_heads;
  in.kv_heads = d->shape.kv_heads;
  in.head_dim = d->shape.head_dim;
  in.elem_bytes = static_cast<std::int64_t>(dtype_size(d->shape.dtype));
  in.with_lse = d->shape.return_lse;
  in.causal = d->shape.causal;
  in.rank = comm.rank();
  d->layout = compute_layout(in);
  if (d->shape.strategy == Strategy::ulysses || d->shape.strategy == Strategy::ulysses_pad)
    d->padded = compute_padded_layout(in);
  if (d->shape.strategy == Strategy::allgather_kv) d->gather = compute_gather_layout(in);
  d->fingerprint = fingerprint_of(d->shape, d->q_lens, d->kv_lens);
  d->comm_id = comm.id();
  d->comm = comm.weak_from_this();
  return d;
}

// Fixed-size record that Plan::create all-gathers: this rank's lengths, its view of the shape, and
// its local verdict, so that every rank can raise the same error.
struct PlanRecord {
  std::uint64_t magic;
  std::int64_t q_len, kv_len, q_heads, kv_heads, head_dim, ranks;
  float scale;
  std::uint8_t dtype, causal, return_lse, error;  // error: 0 ok, else 1 + ErrorCode
  std::uint8_t strategy;
  char message[192];
};
constexpr std::uint64_t kPlanRecordMagic = 0x316e616c70616175ull;  // "uaaplan1"

}  // namespace
}  // namespace detail

using detail::cat;

Plan Plan::create(Communicator& comm, const AttentionShape& shape, std::int64_t q_tokens,
                  std::int64_t kv_tokens) {
  const int me = comm.rank(), P = comm.size();
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
  mine.strategy = static_cast<std::uint8_t>(shape.strategy);

  std::string problem;
  ErrorCode code = ErrorCode::invalid_argument;
  if (q_tokens < 0) {
    problem = cat("q_tokens ", q_tokens, " is negative");
  } else if (kv_tokens < 0) {
    problem = cat("kv_tokens ", kv_tokens, " is negative");
  } else if (!(problem = detail::shape_problem(shape)).empty()) {
  } else {
    // Kernel selection can fail locally (a bad UAA_KERNEL on one rank): report it through the
    // record like any other local problem instead of leaving the peers in the all-gather.
    try {
      if (!detail::kernel_supports(shape.dtype)) {
        code = ErrorCode::unsupported;
        problem = cat("dtype ", dtype_name(shape.dtype), " is not supported by kernel ",
                      detail::select_kernel().name());
      }
    } catch (const Error& e) {
      code = e.code();
      problem = e.what();
    }
  }
  if (!problem.empty()) {
    mine.error = static_cast<std::uint8_t>(1 + static_cast<int>(code));
    const std::string msg = cat("uaa::Plan::create: rank ", me, ": ", problem);
    std::strncpy(mine.message, msg.c_str(), sizeof mine.message - 1);
  }

  std::vector<detail::PlanRecord> all(P);
  comm.allgather(&mine, sizeof mine, all.data());

  // Every rank walks the same records in the same order, so every rank raises the same error.
  int failed = 0;
  const detail::PlanRecord* first_failed = nullptr;
  for (const auto& rec : all) {
    if (rec.magic != detail::kPlanRecordMagic)
      throw Error(ErrorCode::internal, "uaa::Plan::create: corrupt plan record received");
    if (rec.error != 0) {
      ++failed;
      if (!first_failed) first_failed = &rec;
    }
  }
  if (first_failed) {
    std::string msg = first_failed->message;
    if (failed > 1) msg += cat(" (and ", failed - 1, " more rank(s) rejected their input)");
    throw Error(static_cast<ErrorCode>(first_failed->error - 1), msg);
  }
  const detail::PlanRecord& ref = all[0];
  for (int j = 1; j < P; ++j) {
    const detail::PlanRecord& rec = all[j];
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
  }
  std::vector<std::int64_t> q_lens(P), kv_lens(P);
  for (int j = 0; j < P; ++j) {
    q_lens[j] = all[j].q_len;
    kv_lens[j] = all[j].kv_len;
  }
  // Every rank has the same lengths now, so every rank reaches the same verdict.
  if (std::string p = detail::size_problem(shape, q_lens, kv_lens); !p.empty())
    throw Error(ErrorCode::invalid_argument, cat("uaa::Plan::create: ", p));
  // A property of all lengths together: every rank sees the same ones and raises the same error.
  if (shape.strategy == Strategy::ulysses)
    if (std::string p = detail::ulysses_problem(q_lens, kv_lens, shape.q_heads); !p.empty())
      throw Error(ErrorCode::invalid_argument, "uaa::Plan::create: " + p);
  return Plan(detail::build(comm, shape, std::move(q_lens), std::move(kv_lens)));
}

Plan Plan::from_lengths(Communicator& comm, const AttentionShape& shape,
                        std::vector<std::int64_t> q_lens, std::vector<std::int64_t> kv_lens) {
  const int me = comm.rank(), P = comm.size();
  auto fail = [&](ErrorCode code, const std::string& what) {
    throw Error(code, cat("uaa::Plan::from_lengths: rank ", me, ": ", what));
  };
  if (static_cast<int>(q_lens.size()) != P)
    fail(ErrorCode::invalid_argument, cat(q_lens.size(), " q lengths for ", P, " ranks"));
  if (static_cast<int>(kv_lens.size()) != P)
    fail(ErrorCode::invalid_argument, cat(kv_lens.size(), " kv lengths for ", P, " ranks"));
  for (int j = 0; j < P; ++j) {
    if (q_lens[j] < 0) fail(ErrorCode::invalid_argument, cat("q length of rank ", j, " is ", q_lens[j]));
    if (kv_lens[j] < 0) fail(ErrorCode::invalid_argument, cat("kv length of rank ", j, " is ", kv_lens[j]));
  }
  if (std::string p = detail::shape_problem(shape); !p.empty()) fail(ErrorCode::invalid_argument, p);
  if (std::string p = detail::size_problem(shape, q_lens, kv_lens); !p.empty())
    fail(ErrorCode::invalid_argument, p);
  if (shape.strategy == Strategy::ulysses)
    if (std::string p = detail::ulysses_problem(q_lens, kv_lens, shape.q_heads); !p.empty())
      fail(ErrorCode::invalid_argument, p);
  if (!detail::kernel_supports(shape.dtype))
    fail(ErrorCode::unsupported, cat("dtype ", dtype_name(shape.dtype), " is not supported by kernel ",
                                     detail::select_kernel().name()));
  return Plan(detail::build(comm, shape, std::move(q_lens), std::move(kv_lens)));
}

int Plan::ranks() const { return data_->layout.ranks; }
int Plan::rank() const { return data_->layout.rank; }
const AttentionShape& Plan::shape() const { return data_->shape; }
const std::vector<std::int64_t>& Plan::q_lens() const { return data_->q_lens; }
const std::vector<std::int64_t>& Plan::kv_lens() const { return data_->kv_lens; }
std::int64_t Plan::q_tokens() const { return data_->q_lens[rank()]; }
std::int64_t Plan::kv_tokens() const { return data_->kv_lens[rank()]; }
std::int64_t Plan::q_total() const { return data_->layout.q_start.back(); }
std::int64_t Plan::kv_total() const { return data_->layout.kv_start.back(); }
std::int64_t Plan::q_head_begin(int r) const { return data_->layout.work.at(r).q_heads.begin; }
std::int64_t Plan::q_head_end(int r) const { return data_->layout.work.at(r).q_heads.end; }
std::int64_t Plan::kv_head_begin(int r) const { return data_->layout.work.at(r).kv_heads.begin; }
std::int64_t Plan::kv_head_end(int r) const { return data_->layout.work.at(r).kv_heads.end; }
WorkRange Plan::work(int r) const {
  const detail::RankWork& w = data_->layout.work.at(r);
  return {w.first_head, w.first_row, w.end_head, w.end_row};
}
std::uint64_t Plan::fingerprint() const { return data_->fingerprint; }

namespace {
std::int64_t peer_bytes(const detail::ExchangeSide& side, int me) {
  std::int64_t n = 0;
  for (std::size_t j = 0; j < side.counts.size(); ++j)
    if (static_cast<int>(j) != me) n += side.counts[j];
  return n;
}
}  // namespace

std::int64_t Plan::bytes_sent() const {
  const detail::PlanData& d = *data_;
  const int me = rank();
  switch (d.shape.strategy) {
    case Strategy::ulysses:
    case Strategy::ulysses_pad:
      return peer_bytes(d.padded.qkv_send, me) + peer_bytes(d.padded.out_send, me);
    case Strategy::allgather_kv:
      return peer_bytes(d.gather.send, me);
    case Strategy::uaa:
      break;
  }
  return peer_bytes(d.layout.qkv_send, me) + peer_bytes(d.layout.out_send, me);
}

std::int64_t Plan::bytes_received() const {
  const detail::PlanData& d = *data_;
  const int me = rank();
  switch (d.shape.strategy) {
    case Strategy::ulysses:
    case Strategy::ulysses_pad:
      return peer_bytes(d.padded.qkv_recv, me) + peer_bytes(d.padded.out_recv, me);
    case Strategy::allgather_kv:
      return peer_bytes(d.gather.recv, me);
    case Strategy::uaa:
      break;
  }
  return peer_bytes(d.layout.qkv_recv, me) + peer_bytes(d.layout.out_recv, me);
}

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
             s.causal ? " causal" : "", ", strategy ", strategy_name(s.strategy), "; rank ", r,
             " computes (head, row)  [(", work(r).first_head, ",", work(r).first_row, "), (",
             work(r).end_head, ",", work(r).end_row, ")) reading kv heads [", kv_head_begin(r), ",",
             kv_head_end(r), ")");
}

}  // namespace uaa
