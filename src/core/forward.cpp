// forward(): validate, agree, execute.
//
// 1. Validate the arguments and set the call up (thread count, kernel, workspace memory), all
//    locally and without throwing: any problem becomes this rank's vote.
// 2. Agree (src/comm/control_plane.h): one 64-byte vote per rank, O(log P) messages. Every rank
//    gets the same verdict and raises the same error (a bad value, a failed allocation, different
//    plans, ranks out of step, different kernel variants) before any byte moves or any output is
//    written.
// 3. Execute the plan's program for this rank: by messages, or on one node by single-copy peer
//    writes/reads between checkpoints (agreements that also carry any local failure of the copies).
#include <algorithm>
#include <chrono>
#include <cstring>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

#include "comm/control_plane.h"
#include "common/clock.h"
#include "common/strings.h"
#include "core/agreement.h"
#include "core/validate.h"
#include "core/saved.h"
#include "core/workspace.h"
#include "exec/executor.h"
#include "kernels/kernel.h"
#include "plan/plan_data.h"
#include "uaa/attention.h"
#include "uaa/error.h"
#include "uaa/threads.h"

namespace uaa {
namespace detail {

WorkspaceBuffers& workspace_buffers(Workspace& ws) { return *ws.buffers_; }

namespace {

std::int64_t lse_token_stride(const AttentionArgs& a, const AttentionShape& s) {
  return a.lse_token_stride == 0 ? s.q_heads : a.lse_token_stride;
}

std::string args_problem(const PlanData& plan, const AttentionArgs& a) {
  if (a.caller_problem != nullptr) return a.caller_problem;  // a binding's own finding
  const AttentionShape& s = plan.shape;
  const std::int64_t q_tokens = plan.q_lens[plan.rank], kv_tokens = plan.kv_lens[plan.rank];
  std::string p;
  if (!(p = view_problem("q", a.q, q_tokens, s.q_heads, s)).empty()) return p;
  if (!(p = view_problem("k", a.k, kv_tokens, s.kv_heads, s)).empty()) return p;
  if (!(p = view_problem("v", a.v, kv_tokens, s.kv_heads, s)).empty()) return p;
  if (!(p = view_problem("out", a.out, q_tokens, s.q_heads, s)).empty()) return p;
  if (!rows_disjoint(a.out, s.batch))
    return cat("out strides ", strides_str(a.out, s.batch), " make output rows overlap (head_dim ",
               s.head_dim, ")");
  const Extent out = extent_of(a.out, s.batch);
  const ConstTensor* inputs[] = {&a.q, &a.k, &a.v};
  const char* names[] = {"q", "k", "v"};
  for (int i = 0; i < 3; ++i)
    if (out.overlaps(extent_of(*inputs[i], s.batch))) return cat("out overlaps ", names[i], " in memory");
  if (s.return_lse && a.lse == nullptr && q_tokens > 0)
    return "lse is null but the plan has return_lse";
  if (!s.return_lse && a.lse != nullptr)
    return "lse is given but the plan was built without return_lse";
  if (a.lse) {
    Extent lse;
    if (!(p = lse_problem(a.lse, a.lse_token_stride, q_tokens, s.q_heads, &lse, s.batch,
                          a.lse_batch_stride)).empty())
      return p;
    if (lse.overlaps(out)) return "lse overlaps out in memory";
    for (int i = 0; i < 3; ++i)
      if (lse.overlaps(extent_of(*inputs[i], s.batch))) return cat("lse overlaps ", names[i], " in memory");
  }
  return {};
}

// Vote flag: some rank's workspace staging is not what its peers last saw (peer-memory path).
constexpr std::uint16_t kFlagPublishStaging = 1;

// The agreement sequence at which staging addresses were last published on each communicator
// (identical on every rank: every rank publishes at the same agreement).
std::mutex g_published_mutex;
std::unordered_map<std::uint64_t, std::uint64_t> g_published;

std::uint64_t last_publication(std::uint64_t comm_id) {
  std::lock_guard<std::mutex> lock(g_published_mutex);
  auto it = g_published.find(comm_id);
  return it == g_published.end() ? ~0ull : it->second;
}
void set_last_publication(std::uint64_t comm_id, std::uint64_t sequence) {
  std::lock_guard<std::mutex> lock(g_published_mutex);
  g_published[comm_id] = sequence;
}

// Everything a call sets up before it votes.
struct Setup {
  int threads = 1;
  const AttentionKernel* kernel = nullptr;
  bool peer_memory = false;
  Bindings bindings;
};


void run_compute(const Program& prog, const PlanData& plan, const Setup& su, WorkspaceBuffers& B) {
  for (const ComputeStep& c : prog.compute)
    for_each_document(c, [&](const DocSpan& d) {
      KernelProblem kp = kernel_problem(c, d, su.bindings, plan.shape, su.threads, B);
      kp.scratch = B.scratch.data();
      su.kernel->run(kp);
    });
}

void forward_impl(const Plan& plan_handle, const AttentionArgs& args, Workspace& ws,
                  PhaseTimes* times, SavedData* saved) {
  const auto t_start = Clock::now();
  const PlanData& plan = plan_data(plan_handle);
  const AttentionShape& s = plan.shape;
  const Program& prog = plan.forward;
  Communicator& comm = *plan.comm;
  ControlPlane& cp = control_plane(comm);
  WorkspaceBuffers& B = workspace_buffers(ws);
  const int me = plan.rank;
  // With a SavedForward, the q/k/v rows received land in its buffer and stay there for backward().
  AlignedBuffer& stage_in = saved ? saved->buffer : B.stage_in;

  // 1. Validate and set up, locally.
  std::string problem;
  ErrorCode code = ErrorCode::invalid_argument;
  Setup su;
  su.peer_memory = plan.options.strategy == Strategy::uaa && plan.ranks > 1 && comm.can_read_peers();
  if (plan.failed) {
    code = plan.error_code;
    problem = plan.error_message;
  } else if (saved && plan.options.strategy != Strategy::uaa) {
    code = ErrorCode::unsupported;
    problem = cat("uaa::forward: rank ", me, ": a SavedForward needs the uaa strategy (the plan has ",
                  strategy_name(plan.options.strategy), ")");
  } else if (!(problem = args_problem(plan, args)).empty()) {
    problem = cat("uaa::forward: rank ", me, ": ", problem);
  } else {
    std::int64_t wanted = 0;
    try {
      su.threads = num_threads();
      su.kernel = &select_kernel();
      wanted = prog.stage_in_bytes;
      if (saved && saved->buffer.size() < prog.stage_in_bytes) saved->valid = false;  // regrown
      B.reserve(stage_in, prog.stage_in_bytes);
      wanted = prog.stage_out_bytes;
      B.reserve(B.stage_out, prog.stage_out_bytes);
      if (!su.peer_memory) {
        wanted = prog.pack_bytes;
        B.reserve(B.pack, wanted);
        wanted = prog.unpack_bytes;
        B.reserve(B.unpack, wanted);
      }
      Bindings& b = su.bindings;
      b.q = args.q;
      b.k = args.k;
      b.v = args.v;
      b.out = args.out;
      b.lse = args.lse;
      b.lse_token_stride = lse_token_stride(args, s);
      b.stage_in = stage_in.data();
      b.stage_out = B.stage_out.data();
      b.elem_bytes = static_cast<std::int64_t>(dtype_size(s.dtype));
      bind_batch(b, s, plan.q_lens[me], args.lse_batch_stride);
      std::int64_t scratch = 0;
      for (const ComputeStep& c : prog.compute)
        for_each_document(c, [&](const DocSpan& d) {
          scratch = std::max(scratch, static_cast<std::int64_t>(su.kernel->scratch_bytes(
                                          kernel_problem(c, d, b, s, su.threads, B))));
        });
      wanted = scratch;
      B.reserve(B.scratch, scratch);
    } catch (const Error& e) {
      code = e.code();
      problem = cat("uaa::forward: rank ", me, ": ", e.what());
    } catch (const std::bad_alloc&) {
      code = ErrorCode::out_of_memory;
      problem = cat("uaa::forward: rank ", me, ": could not allocate ", wanted,
                    " bytes of workspace (the plan needs ", plan_handle.staging_bytes(),
                    " bytes of staging on this rank)");
    }
  }

  // 2. Agree.
  Vote vote;
  vote.kind = VoteKind::forward;
  vote.fingerprint = plan.fingerprint;
  vote.kernel = su.kernel ? kernel_vote_id(su.kernel->name()) : 0;
  if (!problem.empty()) {
    vote.failed = true;
    vote.code = code;
    vote.message = problem;
  } else if (su.peer_memory &&
             (B.published_comm != comm.id() || B.published_in != stage_in.data() ||
              B.published_out != B.stage_out.data() ||
              B.published_sequence != last_publication(comm.id()))) {
    vote.flags = kFlagPublishStaging;
  }
  const auto t_agree = Clock::now();
  const Verdict verdict = cp.agree(vote);
  raise_agreed_error(verdict, {"uaa::forward", true, !plan.options.allow_mixed_kernels});
  B.last_peer_memory = su.peer_memory;
  if (saved) saved->valid = false;  // until this call completes
  double agree_ms = ms_since(t_agree);

  // 3. Execute.
  const bool sync = times && times->sync_exchanges;
  double wait_ms = 0;
  auto sync_point = [&] {
    if (!sync) return;
    const auto t0 = Clock::now();
    checkpoint(cp, "uaa::forward", plan.fingerprint, plan.rank);
    wait_ms += ms_since(t0);
  };
  ExchangeTimes tin, tout;
  double x1_ms = 0, x2_ms = 0, attn_ms = 0;
  if (su.peer_memory) {
    // Staging addresses: published when some rank's staging is new to its peers; otherwise one
    // checkpoint. Either way a rank that gave up in the agreement (a deadline) never sends its part
    // of this round, so nobody writes into the memory of a rank that has left.
    auto t0 = Clock::now();
    if (verdict.flags & kFlagPublishStaging) {
      const std::uint64_t mine[2] = {reinterpret_cast<std::uintptr_t>(stage_in.data()),
                                     reinterpret_cast<std::uintptr_t>(B.stage_out.data())};
      B.gather.resize(2 * static_cast<std::size_t>(plan.ranks));
      comm.allgather(mine, sizeof mine, B.gather.data());
      B.peer_stage_in.resize(plan.ranks);
      B.peer_stage_out.resize(plan.ranks);
      for (int j = 0; j < plan.ranks; ++j) {
        B.peer_stage_in[j] = B.gather[2 * j];
        B.peer_stage_out[j] = B.gather[2 * j + 1];
      }
      B.published_comm = comm.id();
      B.published_in = stage_in.data();
      B.published_out = B.stage_out.data();
      B.published_sequence = verdict.sequence_min;
      set_last_publication(comm.id(), verdict.sequence_min);
    } else {
      checkpoint(cp, "uaa::forward", plan.fingerprint, plan.rank);
    }
    agree_ms += ms_since(t0);
    sync_point();
    t0 = Clock::now();
    // Writes into the peers' stage_in; a peer runs its kernel only after every rank has written.
    checkpoint(cp, "uaa::forward", plan.fingerprint, plan.rank, write_in_parts(comm, prog.in, su.bindings, B.peer_stage_in.data(), B));
    x1_ms = ms_since(t0);
    t0 = Clock::now();
    run_compute(prog, plan, su, B);
    attn_ms = ms_since(t0);
    sync_point();
    t0 = Clock::now();
    checkpoint(cp, "uaa::forward", plan.fingerprint, plan.rank);  // every stage_out is complete
    // Reads out of the peers' stage_out; the last checkpoint keeps each rank's staging alive (the
    // rank inside the call) until every rank has read it.
    checkpoint(cp, "uaa::forward", plan.fingerprint, plan.rank, read_out_parts(comm, prog.out, su.bindings, B.peer_stage_out.data(), B));
    x2_ms = ms_since(t0);
  } else {
    sync_point();
    auto t0 = Clock::now();
    run_exchange_by_messages(comm, prog.in, su.bindings, B, tin);
    x1_ms = ms_since(t0) - tin.pack - tin.unpack;
    t0 = Clock::now();
    run_compute(prog, plan, su, B);
    attn_ms = ms_since(t0);
    sync_point();
    t0 = Clock::now();
    run_exchange_by_messages(comm, prog.out, su.bindings, B, tout);
    x2_ms = ms_since(t0) - tout.pack - tout.unpack;
  }
  if (saved) {
    saved->valid = true;
    saved->fingerprint = plan.fingerprint;
  }
  if (times) {
    times->handshake = agree_ms;
    times->pack = tin.pack + tout.pack;
    times->exchange_qkv = x1_ms;
    times->attention = attn_ms;
    times->exchange_out = x2_ms;
    times->unpack = tin.unpack + tout.unpack;
    times->wait = wait_ms;
    times->total = ms_since(t_start);
  }
}

}  // namespace
}  // namespace detail

Workspace::Workspace() : buffers_(std::make_unique<detail::WorkspaceBuffers>()) {}
Workspace::~Workspace() = default;
Workspace::Workspace(Workspace&&) noexcept = default;
Workspace& Workspace::operator=(Workspace&&) noexcept = default;
std::int64_t Workspace::grow_count() const { return buffers_->grows; }
std::int64_t Workspace::bytes_reserved() const {
  const detail::WorkspaceBuffers& b = *buffers_;
  return b.stage_in.size() + b.stage_out.size() + b.pack.size() + b.unpack.size() +
         b.scratch.size() + b.recompute.size() + b.delta.size();
}

CallReport last_call(const Workspace& ws) {
  CallReport r;
  r.peer_memory = detail::workspace_buffers(const_cast<Workspace&>(ws)).last_peer_memory;
  return r;
}


void forward(const Plan& plan, const AttentionArgs& args, Workspace& ws, PhaseTimes* times) {
  detail::with_plan_context("uaa::forward", plan,
                            [&] { detail::forward_impl(plan, args, ws, times, nullptr); });
}
void forward(const Plan& plan, const AttentionArgs& args, Workspace& ws, SavedForward& saved,
             PhaseTimes* times) {
  detail::with_plan_context("uaa::forward", plan, [&] {
    detail::forward_impl(plan, args, ws, times, &detail::saved_data(saved));
  });
}

}  // namespace uaa
