// backward(): validate, agree, execute the plan's backward program (program.h) by messages.
//
// 1. Validate the arguments and set the call up (threads, kernels, the program, workspace memory)
//    locally; any problem becomes this rank's vote.
// 2. Agree: every rank raises the same error before any byte moves or any gradient is written.
// 3. Execute: delta = rowsum(dO∘O) of the own rows; in; phase1; carry1; phase2; carry2; fold; out;
//    a checkpoint (every rank is through its exchanges); reduce (the canonical sum over the q heads
//    of each kv head, written into dk/dv).
#include <algorithm>
#include <array>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <thread>

#include "comm/control_plane.h"
#include "common/clock.h"
#include "common/strings.h"
#include "core/agreement.h"
#include "core/saved.h"
#include "core/validate.h"
#include "core/workspace.h"
#include "exec/executor.h"
#include "kernels/kernel.h"
#include "plan/plan_data.h"
#include "uaa/backward.h"
#include "uaa/bf16.h"
#include "uaa/error.h"
#include "uaa/threads.h"

namespace uaa {
namespace detail {

SavedData& saved_data(SavedForward& s) { return *s.data_; }
const SavedData& saved_data(const SavedForward& s) { return *s.data_; }

namespace {

std::int64_t lse_stride(const BackwardArgs& a, const AttentionShape& s) {
  return a.lse_token_stride == 0 ? s.q_heads : a.lse_token_stride;
}

std::string args_problem(const PlanData& plan, const BackwardArgs& a) {
  if (a.caller_problem != nullptr) return a.caller_problem;  // a binding's own finding
  const AttentionShape& s = plan.shape;
  const std::int64_t nq = plan.q_lens[plan.rank], nkv = plan.kv_lens[plan.rank];
  std::string p;
  struct View {
    const char* name;
    ConstTensor t;
    std::int64_t tokens, heads;
  };
  const View inputs[] = {{"q", a.q, nq, s.q_heads},        {"k", a.k, nkv, s.kv_heads},
                         {"v", a.v, nkv, s.kv_heads},      {"out", a.out, nq, s.q_heads},
                         {"dout", a.dout, nq, s.q_heads}};
  const View outputs[] = {{"dq", a.dq, nq, s.q_heads},
                          {"dk", a.dk, nkv, s.kv_heads},
                          {"dv", a.dv, nkv, s.kv_heads}};
  for (const View& v : inputs)
    if (!(p = view_problem(v.name, v.t, v.tokens, v.heads, s)).empty()) return p;
  for (const View& v : outputs) {
    if (!(p = view_problem(v.name, v.t, v.tokens, v.heads, s)).empty()) return p;
    if (!rows_disjoint(v.t, s.batch))
      return cat(v.name, " strides ", strides_str(v.t, s.batch), " make its rows overlap (head_dim ",
                 s.head_dim, ")");
  }
  if (a.lse == nullptr && nq > 0)
    return "lse is null: backward needs the forward's lse (AttentionArgs::lse)";
  Extent lse;
  if (!(p = lse_problem(a.lse, a.lse_token_stride, nq, s.q_heads, &lse, s.batch,
                        a.lse_batch_stride)).empty())
    return p;
  for (int i = 0; i < 3; ++i) {
    const Extent e = extent_of(outputs[i].t, s.batch);
    for (int j = 0; j < i; ++j)
      if (e.overlaps(extent_of(outputs[j].t, s.batch)))
        return cat(outputs[i].name, " overlaps ", outputs[j].name, " in memory");
    for (const View& v : inputs)
      if (e.overlaps(extent_of(v.t, s.batch)))
        return cat(outputs[i].name, " overlaps ", v.name, " in memory");
    if (e.overlaps(lse)) return cat(outputs[i].name, " overlaps lse in memory");
  }
  return {};
}

struct Setup {
  int threads = 1;
  const AttentionKernel* kernel = nullptr;
  const BackwardKernel* bkernel = nullptr;
  const BackwardProgram* prog = nullptr;
  Bindings bindings;
};

// delta[t][b * Hq + h] = Σ_d dO·O in fp32, d ascending (row-local: the same bits on every
// partition).
void compute_delta(const BackwardArgs& a, const AttentionShape& s, float* delta) {
  const std::int64_t D = s.head_dim;
  const bool bf = s.dtype == DType::bf16;
  const std::int64_t obs = batch_stride_of(a.out), dbs = batch_stride_of(a.dout);
  for (std::int64_t b = 0; b < s.batch; ++b)
  for (std::int64_t t = 0; t < a.out.tokens; ++t)
    for (std::int64_t h = 0; h < s.q_heads; ++h) {
      float acc = 0.0f;
      const std::int64_t oo = b * obs + t * a.out.token_stride + h * a.out.head_stride;
      const std::int64_t od = b * dbs + t * a.dout.token_stride + h * a.dout.head_stride;
      if (bf) {
        const auto* o = static_cast<const std::uint16_t*>(a.out.data) + oo;
        const auto* d = static_cast<const std::uint16_t*>(a.dout.data) + od;
        for (std::int64_t i = 0; i < D; ++i) acc += f32_from_bf16(d[i]) * f32_from_bf16(o[i]);
      } else {
        const auto* o = static_cast<const float*>(a.out.data) + oo;
        const auto* d = static_cast<const float*>(a.dout.data) + od;
        for (std::int64_t i = 0; i < D; ++i) acc += d[i] * o[i];
      }
      delta[(t * s.batch + b) * s.q_heads + h] = acc;
    }
}

// dk/dv of the own key tokens: per kv head, the terms in ascending q head order (zeros if none).
void run_reduce(const ReduceStep& red, const Bindings& b, const AttentionShape& s) {
  const std::int64_t D = s.head_dim, f32_row = D * static_cast<std::int64_t>(sizeof(float));
  const bool bf = s.dtype == DType::bf16;
  std::array<float, kMaxHeadDim> acc;  // one row (no allocation per call)
  for (std::int64_t g = 0; g < s.kv_heads * s.batch; ++g) {  // heads over the batch (program.h)
    const std::uint32_t t0 = red.term_begin[g], t1 = red.term_begin[g + 1];
    for (int which = 0; which < 2; ++which) {
      for (std::int64_t t = 0; t < red.kv_tokens; ++t) {
        std::fill(acc.begin(), acc.begin() + D, 0.0f);
        for (std::uint32_t k = t0; k < t1; ++k) {
          const Place& p = which == 0 ? red.terms[k].dk : red.terms[k].dv;
          const auto* row = reinterpret_cast<const float*>(resolve(b, p, 1, f32_row).base + t * f32_row);
          if (k == t0)
            std::memcpy(acc.data(), row, static_cast<std::size_t>(f32_row));
          else
            for (std::int64_t i = 0; i < D; ++i) acc[i] += row[i];
        }
        std::byte* at = resolve(b, tensor_place(which == 0 ? Slot::dk : Slot::dv, t, g), 1, D * b.elem_bytes).base;
        if (bf) {
          auto* o = reinterpret_cast<std::uint16_t*>(at);
          for (std::int64_t i = 0; i < D; ++i) o[i] = bf16_from_f32(acc[i]);
        } else {
          std::memcpy(at, acc.data(), static_cast<std::size_t>(f32_row));
        }
      }
    }
  }
}

// Fault injection for tests (docs/FAILURE_MODEL.md): UAA_INJECT_FAULT=backward_stall makes this
// process stop for UAA_INJECT_STALL_SECONDS (default 5) before its `out` exchange, as a rank that
// hangs after the agreement would.
void maybe_stall() {
  const char* f = std::getenv("UAA_INJECT_FAULT");
  if (f == nullptr || std::strcmp(f, "backward_stall") != 0) return;
  const char* s = std::getenv("UAA_INJECT_STALL_SECONDS");
  const double seconds = s ? std::atof(s) : 5.0;
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
}

// The group prefixes this rank pre-adds (program.h, fold), in order.
void run_fold(const std::vector<FoldTerm>& fold, const Bindings& b, const AttentionShape& s,
              std::int64_t kv_total) {
  const std::int64_t f32_row = s.head_dim * static_cast<std::int64_t>(sizeof(float));
  const std::int64_t n = kv_total * s.head_dim;
  for (const FoldTerm& f : fold) {
    for (int which = 0; which < 2; ++which) {
      auto* into = reinterpret_cast<float*>(
          resolve(b, which == 0 ? f.dk_into : f.dv_into, 1, f32_row).base);
      const auto* from = reinterpret_cast<const float*>(
          resolve(b, which == 0 ? f.dk_from : f.dv_from, 1, f32_row).base);
      for (std::int64_t e = 0; e < n; ++e) into[e] += from[e];
    }
  }
}

// A step with document spans: the partial sums of keys no span covers are what a kernel writes
// for keys no row sees: the carry (local head 0) or zero.
void fill_uncovered_keys(const BackwardStep& c, const Bindings& b, const AttentionShape& s) {
  const std::int64_t D = s.head_dim, f32_row = D * static_cast<std::int64_t>(sizeof(float));
  for (int which = 0; which < 2; ++which) {
    auto* partial = reinterpret_cast<float*>(
        resolve(b, which == 0 ? c.dk_partial : c.dv_partial, 1, f32_row).base);
    const Place& carry_place = which == 0 ? c.dk_carry : c.dv_carry;
    const float* carry = carry_place.slot == Slot::pad
                             ? nullptr
                             : reinterpret_cast<const float*>(resolve(b, carry_place, 1, f32_row).base);
    for (std::int64_t h = 0; h < c.q_heads; ++h) {
      float* block = partial + h * c.kv_total * D;
      const float* from = h == 0 ? carry : nullptr;
      if (from == block) continue;  // continued in place: already the carry
      auto fill = [&](std::int64_t k0, std::int64_t k1) {
        if (k1 <= k0) return;
        const auto n = static_cast<std::size_t>((k1 - k0) * D);
        if (from) std::memcpy(block + k0 * D, from + k0 * D, n * sizeof(float));
        else std::memset(block + k0 * D, 0, n * sizeof(float));
      };
      std::int64_t at = 0;
      for (const DocSpan& d : c.docs) {
        fill(at, d.kv_first);
        at = d.kv_first + d.kv_total;
      }
      fill(at, c.kv_total);
    }
  }
}

void run_steps(const std::vector<BackwardStep>& steps, const PlanData& plan, const Setup& su,
               WorkspaceBuffers& B) {
  for (const BackwardStep& c : steps) {
    if (!c.docs.empty()) fill_uncovered_keys(c, su.bindings, plan.shape);
    for_each_document(c, [&](const DocSpan& d) {
      BackwardProblem bp = backward_problem(c, d, su.bindings, plan.shape, su.threads, B);
      bp.scratch = B.scratch.data();
      su.bkernel->run(bp);
    });
  }
}

void backward_impl(const Plan& plan_handle, const BackwardArgs& args, Workspace& ws,
                   const SavedData* saved, BackwardTimes* times) {
  const auto t_start = Clock::now();
  const PlanData& plan = plan_data(plan_handle);
  const AttentionShape& s = plan.shape;
  Communicator& comm = *plan.comm;
  ControlPlane& cp = control_plane(comm);
  WorkspaceBuffers& B = workspace_buffers(ws);
  const int me = plan.rank;
  const char* mode = saved ? "saved" : "recompute";

  // 1. Validate and set up, locally.
  std::string problem;
  ErrorCode code = ErrorCode::invalid_argument;
  Setup su;
  auto fail = [&](ErrorCode c, const std::string& what) {
    code = c;
    problem = cat("uaa::backward (", mode, "): rank ", me, ": ", what);
  };
  if (plan.failed) {
    code = plan.error_code;
    problem = plan.error_message;
  } else if (plan.options.strategy != Strategy::uaa) {
    fail(ErrorCode::unsupported, cat("backward needs the uaa strategy (the plan has ",
                                     strategy_name(plan.options.strategy), ")"));
  } else if (!s.return_lse) {
    fail(ErrorCode::invalid_argument,
         "the plan was built without return_lse (backward recomputes the softmax from the "
         "forward's lse: build the plan with AttentionShape::return_lse = true)");
  } else if (std::string p = args_problem(plan, args); !p.empty()) {
    fail(ErrorCode::invalid_argument, p);
  } else if (saved && !saved->valid) {
    fail(ErrorCode::invalid_argument,
         "the SavedForward holds no completed forward (pass it to forward(plan, args, ws, saved) "
         "first; a failed forward leaves it empty)");
  } else if (saved && saved->fingerprint != plan.fingerprint) {
    fail(ErrorCode::invalid_argument,
         cat("the SavedForward was filled by another plan (fingerprint ", std::hex,
             saved->fingerprint, ", this plan ", plan.fingerprint, std::dec, ")"));
  } else {
    std::int64_t wanted = 0;
    try {
      su.threads = num_threads();
      su.kernel = &select_kernel();
      su.bkernel = &backward_kernel_for(*su.kernel);
      if (!su.bkernel->supports(s.dtype))
        throw Error(ErrorCode::unsupported, cat("backward kernel ", su.bkernel->name(),
                                                " does not support ", dtype_name(s.dtype)));
      su.prog = &backward_program(plan);
      const BackwardProgram& prog = *su.prog;
      wanted = prog.stage_in_bytes;
      B.reserve(B.stage_in, wanted);
      wanted = prog.stage_out_bytes;
      B.reserve(B.stage_out, wanted);
      if (!saved) {
        wanted = prog.saved_bytes;
        B.reserve(B.recompute, wanted);
      }
      wanted = prog.pack_bytes;
      B.reserve(B.pack, wanted);
      wanted = prog.unpack_bytes;
      B.reserve(B.unpack, wanted);
      wanted = plan.q_lens[me] * s.batch * s.q_heads * static_cast<std::int64_t>(sizeof(float));
      B.reserve(B.delta, wanted);
      Bindings& b = su.bindings;
      b.q = args.q;
      b.k = args.k;
      b.v = args.v;
      b.lse = const_cast<float*>(args.lse);  // only read: lse is a source place here
      b.lse_token_stride = lse_stride(args, s);
      b.dout = args.dout;
      b.dq = args.dq;
      b.dk = args.dk;
      b.dv = args.dv;
      b.delta = reinterpret_cast<float*>(B.delta.data());
      b.delta_token_stride = s.batch * s.q_heads;  // [q_tokens][batch][q_heads]
      bind_batch(b, s, plan.q_lens[me], args.lse_batch_stride);
      b.delta_batch_stride = s.q_heads;  // used only when batched
      b.stage_in = B.stage_in.data();
      b.stage_out = B.stage_out.data();
      b.saved = saved ? const_cast<std::byte*>(saved->buffer.data()) : B.recompute.data();
      b.elem_bytes = static_cast<std::int64_t>(dtype_size(s.dtype));
      std::int64_t scratch = 0;
      for (const auto* steps : {&prog.phase1, &prog.phase2})
        for (const BackwardStep& c : *steps)
          for_each_document(c, [&](const DocSpan& d) {
            scratch = std::max(scratch, static_cast<std::int64_t>(su.bkernel->scratch_bytes(
                                            backward_problem(c, d, b, s, su.threads, B))));
          });
      wanted = scratch;
      B.reserve(B.scratch, scratch);
    } catch (const Error& e) {
      fail(e.code(), e.what());
    } catch (const std::bad_alloc&) {
      fail(ErrorCode::out_of_memory,
           cat("could not allocate ", wanted, " bytes of workspace for the backward"));
    }
  }

  // 2. Agree.
  Vote vote;
  vote.kind = VoteKind::backward;
  vote.fingerprint = plan.fingerprint;
  vote.kernel = su.kernel ? kernel_vote_id(su.kernel->name()) : 0;
  if (!problem.empty()) {
    vote.failed = true;
    vote.code = code;
    vote.message = problem;
  }
  const auto t_agree = Clock::now();
  raise_agreed_error(cp.agree(vote), {"uaa::backward", true, !plan.options.allow_mixed_kernels});
  B.last_peer_memory = false;
  const double agree_ms = ms_since(t_agree);

  // 3. Execute.
  const BackwardProgram& prog = *su.prog;
  const Bindings& b = su.bindings;
  ExchangeTimes tx;
  auto t0 = Clock::now();
  compute_delta(args, s, b.delta);
  const double prepare_ms = ms_since(t0);
  t0 = Clock::now();
  run_exchange_by_messages(comm, saved ? prog.in_saved : prog.in_recompute, b, B, tx);
  const double in_ms = ms_since(t0);
  t0 = Clock::now();
  run_steps(prog.phase1, plan, su, B);
  double kernel_ms = ms_since(t0);
  t0 = Clock::now();
  run_exchange_by_messages(comm, prog.carry1, b, B, tx);
  double carry_ms = ms_since(t0);
  t0 = Clock::now();
  run_steps(prog.phase2, plan, su, B);
  kernel_ms += ms_since(t0);
  t0 = Clock::now();
  run_exchange_by_messages(comm, prog.carry2, b, B, tx);
  carry_ms += ms_since(t0);
  t0 = Clock::now();
  run_fold(prog.fold, b, s, plan.kv_start.back());
  const double fold_ms = ms_since(t0);
  maybe_stall();
  t0 = Clock::now();
  run_exchange_by_messages(comm, prog.out, b, B, tx);
  const double out_ms = ms_since(t0);
  // Every rank has finished its exchanges before any rank writes dk/dv: a rank whose peers gave up
  // (a deadline, an MPI error) learns it here instead of returning normally with its messages
  // already delivered (seen with MPICH), and dk/dv stay untouched on every rank.
  t0 = Clock::now();
  checkpoint(cp, "uaa::backward", plan.fingerprint, plan.rank);
  const double final_agree_ms = ms_since(t0);
  t0 = Clock::now();
  run_reduce(prog.reduce, b, s);
  const double reduce_ms = ms_since(t0);
  if (times) {
    times->handshake = agree_ms + final_agree_ms;
    times->prepare = prepare_ms;
    times->exchange_in = in_ms;
    times->kernel = kernel_ms;
    times->carry = carry_ms;
    times->exchange_out = out_ms;
    times->reduce = reduce_ms + fold_ms;
    times->total = ms_since(t_start);
  }
}


}  // namespace
}  // namespace detail

SavedForward::SavedForward() : data_(std::make_unique<detail::SavedData>()) {}
SavedForward::~SavedForward() = default;
SavedForward::SavedForward(SavedForward&&) noexcept = default;
SavedForward& SavedForward::operator=(SavedForward&&) noexcept = default;
bool SavedForward::valid() const { return data_ && data_->valid; }
std::uint64_t SavedForward::plan_fingerprint() const { return data_ && data_->valid ? data_->fingerprint : 0; }
std::int64_t SavedForward::bytes() const { return data_ ? data_->buffer.size() : 0; }

void backward(const Plan& plan, const BackwardArgs& args, Workspace& ws, BackwardTimes* times) {
  detail::with_plan_context("uaa::backward", plan,
                            [&] { detail::backward_impl(plan, args, ws, nullptr, times); });
}
void backward(const Plan& plan, const BackwardArgs& args, Workspace& ws, const SavedForward& saved,
              BackwardTimes* times) {
  detail::with_plan_context("uaa::backward", plan, [&] {
    detail::backward_impl(plan, args, ws, &detail::saved_data(saved), times);
  });
}

const char* backward_kernel_name() {
  return detail::backward_kernel_for(detail::select_kernel()).name();
}

}  // namespace uaa
