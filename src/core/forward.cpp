// The Ulysses step: validate → pack → exchange q/k/v → attention → exchange out → unpack.
//
// Errors on one rank must not leave its peers waiting, and mismatched calls must not mix data: every
// call starts with a handshake, an all-gather of one fixed-size call header per rank (verdict on its
// arguments, plan fingerprint, call index). Every rank then holds every header and raises the same
// error before any payload moves or anything is written to the caller's buffers. Being fixed-size,
// the handshake cannot be derailed by ranks that disagree on the payload sizes.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <vector>

#include "common/strings.h"
#include "core/steps.h"
#include "core/workspace.h"
#include "kernels/kernel.h"
#include "plan/plan_data.h"
#include "uaa/attention.h"
#include "uaa/error.h"

namespace uaa {
namespace {

using detail::cat;
using detail::Layout;

// What peers read of the sender, for transports that read peers' memory (Communicator::
// can_read_peers): its q, k, v (strides in elements) and its output blocks. Addresses are the
// sender's. (Nobody reads a peer's out or lse: each rank writes its own.)
struct PeerView {
  std::uint64_t q, k, v, out_send;
  std::int64_t q_ts, q_hs, k_ts, k_hs, v_ts, v_hs;
};

struct CallHeader {  // 512 bytes per rank per call
  std::uint64_t magic;
  std::uint64_t fingerprint;  // of the plan the sender called with
  std::uint64_t call_index;   // forward() calls the sender made on this communicator before
  std::int32_t rank;
  std::int32_t status;        // 0 ok, else 1 + ErrorCode
  PeerView view;              // filled when the transport reads peers' memory
  char message[400];          // the sender's error message, if any
};
static_assert(sizeof(CallHeader) == 512);
constexpr std::uint64_t kCallMagic = 0x326c6c6163616175ull;  // "uaacall2"

using detail::Clock;
using detail::ms_since;

// Byte range [lo, hi) spanned by a strided view (empty if it has no rows).
struct Extent {
  const std::byte* lo = nullptr;
  const std::byte* hi = nullptr;
  bool empty() const { return lo == hi; }
  bool overlaps(const Extent& o) const { return !empty() && !o.empty() && lo < o.hi && o.lo < hi; }
};

Extent extent_of(const void* data, std::int64_t tokens, std::int64_t heads, std::int64_t dim,
                 std::int64_t ts, std::int64_t hs, std::size_t es) {
  if (tokens == 0 || heads == 0 || dim == 0) return {};
  const auto* p = static_cast<const std::byte*>(data);
  const std::int64_t last = (tokens - 1) * ts + (heads - 1) * hs + dim;
  return {p, p + last * static_cast<std::int64_t>(es)};
}

// Checks one tensor argument against what the plan expects; returns the problem or "".
std::string view_problem(const char* name, const ConstTensor& t, std::int64_t tokens,
                         std::int64_t heads, const AttentionShape& s) {
  if (t.dtype != s.dtype)
    return cat(name, ".dtype ", dtype_name(t.dtype), " but the plan has ", dtype_name(s.dtype));
  if (t.tokens != tokens)
    return cat(name, ".tokens ", t.tokens, " but the plan gives this rank ", tokens);
  if (t.heads != heads) return cat(name, ".heads ", t.heads, " but the plan has ", heads);
  if (t.head_dim != s.head_dim)
    return cat(name, ".head_dim ", t.head_dim, " but the plan has ", s.head_dim);
  if (t.token_stride < 0 || t.head_stride < 0)
    return cat(name, " strides (", t.token_stride, ", ", t.head_stride, ") must be >= 0");
  if (t.data == nullptr && tokens * heads > 0) return cat(name, ".data is null");
  return {};
}

// True if the rows of a [tokens][heads][dim] view with these strides are pairwise disjoint.
bool rows_disjoint(std::int64_t tokens, std::int64_t heads, std::int64_t dim, std::int64_t ts,
                   std::int64_t hs) {
  if (tokens == 0 || heads == 0) return true;  // no rows, nothing to overlap
  struct Axis {
    std::int64_t stride, count;
  };
  Axis a{ts, tokens}, b{hs, heads};
  if (a.count <= 1) a.stride = 0;
  if (b.count <= 1) b.stride = 0;
  if (a.stride > b.stride) std::swap(a, b);
  std::int64_t span = dim;  // elements covered by one row
  for (const Axis& x : {a, b}) {
    if (x.count <= 1) continue;
    if (x.stride < span) return false;
    span = (x.count - 1) * x.stride + span;
  }
  return true;
}

std::string args_problem(const Communicator& comm, const detail::PlanData& plan,
                         const AttentionArgs& a) {
  const AttentionShape& s = plan.shape;
  const Layout& L = plan.layout;
  if (comm.id() != plan.comm_id)
    return cat("the communicator passed (", comm.transport(), ", ", comm.size(),
               " ranks) is not the one the plan was built with");
  const std::int64_t q_tokens = plan.q_lens[L.rank], kv_tokens = plan.kv_lens[L.rank];
  std::string p;
  if (!(p = view_problem("q", a.q, q_tokens, s.q_heads, s)).empty()) return p;
  if (!(p = view_problem("k", a.k, kv_tokens, s.kv_heads, s)).empty()) return p;
  if (!(p = view_problem("v", a.v, kv_tokens, s.kv_heads, s)).empty()) return p;
  if (!(p = view_problem("out", a.out, q_tokens, s.q_heads, s)).empty()) return p;
  if (!rows_disjoint(q_tokens, s.q_heads, s.head_dim, a.out.token_stride, a.out.head_stride))
    return cat("out strides (", a.out.token_stride, ", ", a.out.head_stride,
               ") make output rows overlap (head_dim ", s.head_dim, ")");
  const std::size_t es = dtype_size(s.dtype);
  const Extent out = extent_of(a.out.data, q_tokens, s.q_heads, s.head_dim, a.out.token_stride,
                               a.out.head_stride, es);
  const ConstTensor* inputs[] = {&a.q, &a.k, &a.v};
  const char* names[] = {"q", "k", "v"};
  for (int i = 0; i < 3; ++i) {
    const ConstTensor& t = *inputs[i];
    if (out.overlaps(extent_of(t.data, t.tokens, t.heads, t.head_dim, t.token_stride,
                               t.head_stride, es)))
      return cat("out overlaps ", names[i], " in memory");
  }
  if (s.return_lse && a.lse == nullptr && q_tokens > 0)
    return "lse is null but the plan has return_lse";
  if (!s.return_lse && a.lse != nullptr)
    return "lse is given but the plan was built without return_lse";
  if (a.lse) {
    const std::int64_t lts = detail::lse_token_stride(a, s);
    if (q_tokens > 1 && lts < s.q_heads)
      return cat("lse_token_stride ", a.lse_token_stride, " is smaller than q_heads ", s.q_heads);
    const Extent lse = extent_of(a.lse, q_tokens, s.q_heads, 1, lts, 1, sizeof(float));
    if (lse.overlaps(out)) return "lse overlaps out in memory";
    for (int i = 0; i < 3; ++i) {
      const ConstTensor& t = *inputs[i];
      if (lse.overlaps(extent_of(t.data, t.tokens, t.heads, t.head_dim, t.token_stride,
                                 t.head_stride, es)))
        return cat("lse overlaps ", names[i], " in memory");
    }
  }
  return {};
}

// Throws the error all ranks agree on, if any. Every rank inspects the same headers in the same
// order, so every rank raises the same error with the same message.
void check_headers(int ranks, const CallHeader* all) {
  for (int j = 0; j < ranks; ++j)
    if (all[j].magic != kCallMagic || all[j].rank != j)
      throw Error(ErrorCode::mismatch,
                  cat("uaa::forward: malformed call header from rank ", j,
                      " (a rank called another collective on this communicator)"));
  for (int j = 1; j < ranks; ++j)
    if (all[j].fingerprint != all[0].fingerprint)
      throw Error(ErrorCode::mismatch,
                  cat("uaa::forward: ranks called with different plans: rank ", j,
                      " plan fingerprint ", std::hex, all[j].fingerprint, " but rank 0 ",
                      all[0].fingerprint));
  for (int j = 1; j < ranks; ++j)
    if (all[j].call_index != all[0].call_index)
      throw Error(ErrorCode::mismatch,
                  cat("uaa::forward: ranks are out of step: rank ", j, " is at call ",
                      all[j].call_index, " but rank 0 at call ", all[0].call_index));
  int failed = 0, first = -1;
  for (int j = 0; j < ranks; ++j)
    if (all[j].status != 0 && failed++ == 0) first = j;
  if (first >= 0) {
    std::string msg(all[first].message, strnlen(all[first].message, sizeof all[first].message));
    if (failed > 1) msg += cat(" (and ", failed - 1, " more rank(s) rejected their input)");
    throw Error(static_cast<ErrorCode>(all[first].status - 1), msg);
  }
}

}  // namespace

Workspace::Workspace() : buffers_(std::make_unique<Buffers>()) {}
Workspace::~Workspace() = default;
Workspace::Workspace(Workspace&&) noexcept = default;
Workspace& Workspace::operator=(Workspace&&) noexcept = default;
std::int64_t Workspace::grow_count() const { return buffers_->grows; }
std::int64_t Workspace::bytes_reserved() const {
  const Buffers& b = *buffers_;
  return b.headers.size() + b.qkv_send.size() + b.qkv_recv.size() + b.out_send.size() +
         b.out_recv.size() + b.scratch.size();
}

namespace {

PeerView view_of(const AttentionArgs& a, const std::byte* out_send) {
  auto addr = [](const void* p) { return static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(p)); };
  PeerView v{};
  v.q = addr(a.q.data);
  v.k = addr(a.k.data);
  v.v = addr(a.v.data);
  v.out_send = addr(out_send);
  v.q_ts = a.q.token_stride;
  v.q_hs = a.q.head_stride;
  v.k_ts = a.k.token_stride;
  v.k_hs = a.k.head_stride;
  v.v_ts = a.v.token_stride;
  v.v_hs = a.v.head_stride;
  return v;
}

// [n0][n1][run] bytes at `base`, n0 blocks s0 apart, n1 runs s1 apart (strides in bytes).
StridedBytes strided(std::uint64_t base, std::int64_t n0, std::int64_t s0, std::int64_t n1,
                     std::int64_t s1, std::int64_t run) {
  return {static_cast<std::uintptr_t>(base), n0, s0, n1, s1, run};
}
std::uint64_t at(const void* p, std::int64_t offset_bytes) {
  return static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(p) + offset_bytes);
}

// The q/k/v exchange as reads: straight from each peer's q, k, v into this rank's receive blocks
// (the same layout the message path receives), one copy per byte and no packing.
void read_qkv_from_peers(Communicator& xc, const detail::PlanData& plan, const CallHeader* headers,
                         Workspace::Buffers& B) {
  const Layout& L = plan.layout;
  const AttentionShape& s = plan.shape;
  const int me = L.rank;
  const std::int64_t es = static_cast<std::int64_t>(dtype_size(s.dtype)), row = s.head_dim * es;
  const detail::RankWork& work = L.work[me];
  const std::int64_t nkv = work.kv_heads.size();
  auto& reads = B.reads;
  reads.clear();
  for (int j = 0; j < L.ranks; ++j) {
    if (j == me) continue;
    const PeerView& pv = headers[j].view;
    std::byte* block = B.qkv_recv.data() + L.qkv_recv.displs[j];
    const detail::QkvBlock& b = L.qkv_recv_block[j];
    const detail::RowRange theirs = L.q_tokens(j);
    for (int i = 0; i < work.pieces; ++i) {
      const detail::WorkPiece& p = work.piece[i];
      const detail::RowRange rows = detail::rows_held(p, theirs);
      const std::int64_t n = rows.size(), nh = p.heads.size();
      if (n == 0) continue;
      const std::int64_t first = (rows.begin - theirs.begin) * pv.q_ts + p.heads.begin * pv.q_hs;
      reads.push_back({j, strided(pv.q + first * es, n, pv.q_ts * es, nh, pv.q_hs * es, row),
                       strided(at(block, b.q[i]), n, nh * row, nh, row, row)});
    }
    const std::int64_t nk = plan.kv_lens[j];
    if (nk == 0 || nkv == 0) continue;
    reads.push_back({j, strided(pv.k + work.kv_heads.begin * pv.k_hs * es, nk, pv.k_ts * es, nkv,
                                pv.k_hs * es, row),
                     strided(at(block, b.k), nk, nkv * row, nkv, row, row)});
    reads.push_back({j, strided(pv.v + work.kv_heads.begin * pv.v_hs * es, nk, pv.v_ts * es, nkv,
                                pv.v_hs * es, row),
                     strided(at(block, b.v), nk, nkv * row, nkv, row, row)});
  }
  xc.read_peers(reads);
}

// The output exchange as reads: each peer's output block for this rank, straight into the
// caller's out and lse (no unpacking).
void read_out_from_peers(Communicator& xc, const detail::PlanData& plan, const AttentionArgs& args,
                         const CallHeader* headers, Workspace::Buffers& B) {
  const Layout& L = plan.layout;
  const AttentionShape& s = plan.shape;
  const int me = L.rank;
  const std::int64_t es = static_cast<std::int64_t>(dtype_size(s.dtype)), row = s.head_dim * es;
  const detail::RowRange mine = L.q_tokens(me);
  const std::int64_t lse_ts = detail::lse_token_stride(args, s);
  const Tensor& out = args.out;
  auto& reads = B.reads;
  reads.clear();
  for (int j = 0; j < L.ranks; ++j) {
    if (j == me) continue;
    const std::uint64_t block = headers[j].view.out_send + L.out_displ_at_peer[j];
    const detail::OutBlock& ob = L.out_recv_block[j];
    const detail::RankWork& w = L.work[j];
    for (int i = 0; i < w.pieces; ++i) {
      const detail::WorkPiece& p = w.piece[i];
      const detail::RowRange rows = detail::rows_held(p, mine);
      const std::int64_t n = rows.size(), nh = p.heads.size(), t0 = rows.begin - mine.begin;
      if (n == 0) continue;
      reads.push_back({j, strided(block + ob.o[i], n, nh * row, nh, row, row),
                       strided(at(out.data, (t0 * out.token_stride + p.heads.begin * out.head_stride) * es),
                               n, out.token_stride * es, nh, out.head_stride * es, row)});
      if (args.lse) {
        const std::int64_t lse_row = nh * static_cast<std::int64_t>(sizeof(float));
        reads.push_back({j, strided(block + ob.lse[i], n, lse_row, 1, 0, lse_row),
                         strided(at(args.lse + t0 * lse_ts + p.heads.begin, 0), n,
                                 lse_ts * static_cast<std::int64_t>(sizeof(float)), 1, 0, lse_row)});
      }
    }
  }
  xc.read_peers(reads);
}

void forward_impl(Communicator& comm, const Plan& plan_handle, const AttentionArgs& args,
                  Workspace& ws, PhaseTimes* times) {
  const auto t_start = Clock::now();
  const detail::PlanData& plan = plan_handle.data();
  const Layout& L = plan.layout;
  const AttentionShape& s = plan.shape;
  const int me = L.rank;

  // The exchange always runs on the plan's communicator, so a rank handed the wrong one can still
  // tell its peers instead of leaving them waiting.
  std::shared_ptr<Communicator> owner = plan.comm.lock();
  if (!owner)
    throw Error(ErrorCode::invalid_argument,
                cat("uaa::forward: rank ", comm.rank(),
                    ": the communicator the plan was built with no longer exists"));
  Communicator& xc = *owner;

  const std::string problem = args_problem(comm, plan, args);
  CallHeader header{};
  header.magic = kCallMagic;
  header.fingerprint = plan.fingerprint;
  header.call_index = xc.next_call_index();
  header.rank = me;
  if (!problem.empty()) {
    header.status = 1 + static_cast<int>(ErrorCode::invalid_argument);
    const std::string msg = cat("uaa::forward: rank ", me, ": ", problem);
    std::strncpy(header.message, msg.c_str(), sizeof header.message - 1);
  }

  // Buffers first: with peer reads the handshake publishes where this rank's output blocks are.
  Workspace::Buffers& B = ws.buffers();
  const bool peer_reads = s.strategy == Strategy::uaa && L.ranks > 1 && xc.can_read_peers();
  if (s.strategy == Strategy::uaa) {
    B.reserve(B.qkv_recv, L.qkv_recv.total);
    B.reserve(B.out_send, L.out_send.total);
    if (!peer_reads) {
      B.reserve(B.qkv_send, L.qkv_send.total);
      B.reserve(B.out_recv, L.out_recv.total);
    }
  }
  if (peer_reads && problem.empty()) header.view = view_of(args, B.out_send.data());
  B.reserve(B.headers, static_cast<std::int64_t>(L.ranks * sizeof(CallHeader)));
  auto* headers = reinterpret_cast<CallHeader*>(B.headers.data());
  const auto t_handshake = Clock::now();
  xc.allgather(&header, sizeof header, headers);
  check_headers(L.ranks, headers);
  const double handshake_ms = ms_since(t_handshake);

  const bool sync = times && times->sync_exchanges;
  if (s.strategy != Strategy::uaa) {
    detail::StepTimes st;
    if (s.strategy == Strategy::allgather_kv)
      detail::run_allgather_kv(xc, plan, args, B, sync, st);
    else
      detail::run_padded(xc, plan, args, B, sync, st);
    if (times) {
      times->handshake = handshake_ms;
      times->pack = st.pack;
      times->exchange_qkv = st.exchange_qkv;
      times->attention = st.attention;
      times->exchange_out = st.exchange_out;
      times->unpack = st.unpack;
      times->wait = st.wait;
      times->total = ms_since(t_start);
    }
    return;
  }

  // Pack: one copy of my tokens per destination: of each of its work pieces the rows I hold, and
  // the key/value heads it reads.
  const auto t_pack = Clock::now();
  const std::size_t es = dtype_size(s.dtype);
  const std::int64_t row = s.head_dim * static_cast<std::int64_t>(es);
  const detail::RowRange mine = L.q_tokens(me);
  std::byte* send = B.qkv_send.data();
  for (int j = 0; j < L.ranks && !peer_reads; ++j) {
    if (j == me) continue;
    std::byte* block = send + L.qkv_send.displs[j];
    const detail::QkvBlock& b = L.qkv_send_block[j];
    const detail::RankWork& w = L.work[j];
    for (int i = 0; i < w.pieces; ++i) {
      const detail::WorkPiece& p = w.piece[i];
      const detail::RowRange rows = detail::rows_held(p, mine);
      if (rows.size() == 0) continue;
      detail::copy_heads_in(args.q, rows.begin - mine.begin, rows.end - mine.begin,
                            p.heads.begin, p.heads.size(), es, block + b.q[i],
                            p.heads.size() * row);
    }
    const std::int64_t nkv = w.kv_heads.size();
    detail::copy_heads_in(args.k, w.kv_heads.begin, nkv, es, block + b.k, nkv * row);
    detail::copy_heads_in(args.v, w.kv_heads.begin, nkv, es, block + b.v, nkv * row);
  }
  const double pack_ms = ms_since(t_pack);

  double wait_ms = 0;
  detail::sync_point(xc, sync, B, wait_ms);
  const auto t_x1 = Clock::now();
  std::byte* recv = B.qkv_recv.data();
  if (peer_reads) {
    read_qkv_from_peers(xc, plan, headers, B);
  } else {
    xc.alltoallv(send, L.qkv_send.counts, L.qkv_send.displs, recv, L.qkv_recv.counts,
                 L.qkv_recv.displs, L.qkv_max_total);
  }
  const double x1_ms = ms_since(t_x1);

  // Attention, one kernel call per work piece, over all tokens of its rows; my own tokens are read
  // from and written to the caller.
  const auto t_attn = Clock::now();
  const detail::RankWork& work = L.work[me];
  const detail::HeadRange kvh = work.kv_heads;
  const std::int64_t lse_ts = detail::lse_token_stride(args, s);
  // Segment lists live in the workspace: no allocation after the first call.
  B.qseg.resize(L.ranks);
  B.kseg.resize(L.ranks);
  B.vseg.resize(L.ranks);
  B.oseg.resize(L.ranks);
  for (int j = 0; j < L.ranks && work.pieces > 0; ++j) {  // keys and values: the same for all pieces
    if (j == me) {
      const auto* k = static_cast<const std::byte*>(args.k.data);
      const auto* v = static_cast<const std::byte*>(args.v.data);
      B.kseg[j] = {k ? k + kvh.begin * args.k.head_stride * es : nullptr, plan.kv_lens[j],
                   args.k.token_stride, args.k.head_stride};
      B.vseg[j] = {v ? v + kvh.begin * args.v.head_stride * es : nullptr, plan.kv_lens[j],
                   args.v.token_stride, args.v.head_stride};
      continue;
    }
    const std::byte* block = recv + L.qkv_recv.displs[j];
    const detail::QkvBlock& b = L.qkv_recv_block[j];
    B.kseg[j] = {block + b.k, plan.kv_lens[j], kvh.size() * s.head_dim, s.head_dim};
    B.vseg[j] = {block + b.v, plan.kv_lens[j], kvh.size() * s.head_dim, s.head_dim};
  }
  for (int i = 0; i < work.pieces; ++i) {
    const detail::WorkPiece& p = work.piece[i];
    const std::int64_t nh = p.heads.size();
    for (int j = 0; j < L.ranks; ++j) {
      const detail::RowRange rows = detail::rows_held(p, L.q_tokens(j));
      const std::int64_t n = rows.size();
      if (j == me) {
        const std::int64_t t0 = n ? rows.begin - mine.begin : 0;
        const auto* q = static_cast<const std::byte*>(args.q.data);
        auto* o = static_cast<std::byte*>(args.out.data);
        B.qseg[j] = {n ? q + (t0 * args.q.token_stride + p.heads.begin * args.q.head_stride) * es
                       : nullptr,
                     n, args.q.token_stride, args.q.head_stride};
        B.oseg[j] = {n ? o + (t0 * args.out.token_stride + p.heads.begin * args.out.head_stride) * es
                       : nullptr,
                     args.out.token_stride, args.out.head_stride,
                     args.lse && n ? args.lse + t0 * lse_ts + p.heads.begin : nullptr, lse_ts};
        continue;
      }
      const std::byte* block = recv + L.qkv_recv.displs[j];
      B.qseg[j] = {block + L.qkv_recv_block[j].q[i], n, nh * s.head_dim, s.head_dim};
      std::byte* oblock = B.out_send.data() + L.out_send.displs[j];
      float* lse = s.return_lse
                       ? reinterpret_cast<float*>(oblock + L.out_send_block[j].lse[i])
                       : nullptr;
      B.oseg[j] = {oblock + L.out_send_block[j].o[i], nh * s.head_dim, s.head_dim, lse, nh};
    }
    // Rank order is token order: the segments of this piece cover rows [p.rows) exactly.
    detail::KernelProblem kp = detail::kernel_problem(s, B, nh, p.heads.begin, kvh.begin,
                                                      L.q_start.back(), L.kv_start.back());
    kp.q_first = p.rows.begin;
    detail::run_kernel(kp, B);
  }
  const double attn_ms = ms_since(t_attn);

  detail::sync_point(xc, sync, B, wait_ms);
  const auto t_x2 = Clock::now();
  if (peer_reads) {
    // Every kernel is done (so every block I read is written) and every peer has read my inputs;
    // after my reads, a second barrier keeps each rank's blocks alive until all have read them.
    detail::barrier(xc, B);
    read_out_from_peers(xc, plan, args, headers, B);
    detail::barrier(xc, B);
  } else {
    xc.alltoallv(B.out_send.data(), L.out_send.counts, L.out_send.displs, B.out_recv.data(),
                 L.out_recv.counts, L.out_recv.displs, L.out_max_total);
  }
  const double x2_ms = ms_since(t_x2);

  // Unpack: peer j computed, of each of its pieces, the rows I hold.
  const auto t_unpack = Clock::now();
  for (int j = 0; j < L.ranks && !peer_reads; ++j) {
    if (j == me) continue;
    const std::byte* block = B.out_recv.data() + L.out_recv.displs[j];
    const detail::RankWork& w = L.work[j];
    for (int i = 0; i < w.pieces; ++i) {
      const detail::WorkPiece& p = w.piece[i];
      const detail::RowRange rows = detail::rows_held(p, mine);
      const std::int64_t n = p.heads.size();
      if (rows.size() == 0) continue;
      const std::int64_t t0 = rows.begin - mine.begin, t1 = rows.end - mine.begin;
      detail::copy_heads_out(block + L.out_recv_block[j].o[i], n * row, args.out, t0, t1,
                             p.heads.begin, n, es);
      if (args.lse) {
        const auto* lse = reinterpret_cast<const float*>(block + L.out_recv_block[j].lse[i]);
        for (std::int64_t t = t0; t < t1; ++t)
          std::memcpy(args.lse + t * lse_ts + p.heads.begin, lse + (t - t0) * n,
                      n * sizeof(float));
      }
    }
  }
  const double unpack_ms = ms_since(t_unpack);

  if (times) {
    times->handshake = handshake_ms;
    times->pack = pack_ms;
    times->exchange_qkv = x1_ms;
    times->attention = attn_ms;
    times->exchange_out = x2_ms;
    times->unpack = unpack_ms;
    times->wait = wait_ms;
    times->total = ms_since(t_start);
  }
}

}  // namespace

void forward(Communicator& comm, const Plan& plan, const AttentionArgs& args, Workspace& ws,
             PhaseTimes* times) {
  try {
    forward_impl(comm, plan, args, ws, times);
  } catch (const Error& e) {
    // Transport errors name the operation and the missing ranks; add which plan was running.
    if (e.code() != ErrorCode::timeout && e.code() != ErrorCode::comm_failure) throw;
    throw Error(e.code(), cat("uaa::forward (plan ", std::hex, plan.fingerprint(), std::dec, ": ",
                              plan.ranks(), " ranks, ", plan.q_total(), " q / ", plan.kv_total(),
                              " kv tokens): ", e.what()));
  }
}

}  // namespace uaa
