// uaa/backward.h — gradients of the Ulysses Anything Attention call.
//
//   uaa::AttentionShape shape{.q_heads = 24, .kv_heads = 8, .head_dim = 128, .return_lse = true};
//   uaa::Plan plan = uaa::Plan::create(*comm, shape, my_q_tokens, my_kv_tokens);
//   uaa::Workspace ws;
//   uaa::SavedForward saved;                 // optional: what the backward needs, head-sharded
//   uaa::forward(plan, fwd_args, ws, saved); // fills `saved` (fwd_args.lse is required)
//   ...
//   uaa::BackwardArgs b;                     // the same q, k, v, out, lse as the forward, plus
//   b.dout = ...; b.dq = ...; b.dk = ...; b.dv = ...;  // the caller's token-sharded dO and dQ/dK/dV
//   uaa::backward(plan, b, ws, saved);       // saved mode: moves only dO in and dQ/dK/dV out
//   uaa::backward(plan, b, ws);              // recompute mode: moves q/k/v rows in again
//
// Both are collective over the plan's communicator. The plan must have return_lse (the backward
// recomputes the softmax from the forward's lse) and the uaa strategy.
//
// Exactness: dq, dk and dv are bitwise identical for every number of ranks, every split of the
// tokens and every thread count, and equal to the single-rank run (when every rank runs the same
// kernel variant). The sum behind dK/dV over query rows and over the query heads of a GQA group
// has one canonical order, fixed by global positions: per query head an fma chain over rows in
// ascending order (a head whose rows two ranks share is continued by the later rank from the
// earlier rank's partial sum), then the heads of the group added in ascending order by the rank
// that owns the key token. docs/ARCHITECTURE.md ("Backward") describes it and its costs.
//
// Errors: as forward() (the same agreement opens the call). Bad input — a plan without
// return_lse, a missing lse, wrong shapes or dtypes, gradient buffers that overlap each other or an
// input, a SavedForward from another plan or from a forward that did not complete — gets the same
// uaa::Error on every rank, naming the rank and the values, with dq/dk/dv untouched everywhere.
#pragma once

#include <cstdint>
#include <memory>

#include "uaa/attention.h"
#include "uaa/plan.h"
#include "uaa/types.h"

namespace uaa {

class SavedForward;
namespace detail {
struct SavedData;
SavedData& saved_data(SavedForward& s);
const SavedData& saved_data(const SavedForward& s);
}  // namespace detail

// What a forward() call keeps for the backward in saved mode: the q/k/v rows it received from the
// other ranks, in the layout its kernels read (Plan::saved_bytes() bytes). Reused across calls
// (grows on the first call only). The caller still passes q, k, v, out and lse to backward(): the
// rank's own rows are read from there, never copied.
class SavedForward {
 public:
  SavedForward();
  ~SavedForward();
  SavedForward(SavedForward&&) noexcept;
  SavedForward& operator=(SavedForward&&) noexcept;

  bool valid() const;                   // filled by a forward() that completed on every rank
  std::uint64_t plan_fingerprint() const;  // the plan of that forward (0 if none)
  std::int64_t bytes() const;           // bytes held

 private:
  friend detail::SavedData& detail::saved_data(SavedForward&);
  friend const detail::SavedData& detail::saved_data(const SavedForward&);
  std::unique_ptr<detail::SavedData> data_;
};

struct BackwardArgs {
  ConstTensor q, k, v;   // the forward's inputs
  ConstTensor out;       // the forward's output
  const float* lse = nullptr;          // the forward's lse, [q_tokens][Hq] (required)
  std::int64_t lse_token_stride = 0;   // elements; 0 means Hq
  std::int64_t lse_batch_stride = 0;   // batched plans, as AttentionArgs::lse_batch_stride
  ConstTensor dout;      // [q_tokens][Hq][D] gradient of the loss with respect to out
  Tensor dq;             // [q_tokens][Hq][D]
  Tensor dk, dv;         // [kv_tokens][Hkv][D]
  const char* caller_problem = nullptr;  // as AttentionArgs::caller_problem (for bindings)
};

// Per-phase wall times of one backward() call in milliseconds, as seen by this rank.
struct BackwardTimes {
  double handshake = 0;   // the opening agreement and set-up, and the closing checkpoint
  double prepare = 0;     // delta = rowsum(dO∘O) of the own tokens
  double exchange_in = 0; // dO (and in recompute mode q/k/v) rows to the ranks computing them
  double kernel = 0;      // the backward kernels (both phases)
  double carry = 0;       // partial dK/dV sums of shared heads passed to the next rank
  double exchange_out = 0;  // dQ rows and per-head dK/dV sums to the token owners
  double reduce = 0;      // the canonical sum over the heads of each kv head, into dk/dv (with the
                          // pre-adding of a GQA group's heads before the output exchange)
  double total = 0;
};

// Forward that also fills `saved` for backward(plan, ..., saved). Same contract as forward().
void forward(const Plan& plan, const AttentionArgs& args, Workspace& ws, SavedForward& saved,
             PhaseTimes* times = nullptr);

// Recompute mode.
void backward(const Plan& plan, const BackwardArgs& args, Workspace& ws,
              BackwardTimes* times = nullptr);
// Saved mode: `saved` from forward(plan, ..., saved) on this plan with the same q, k, v.
void backward(const Plan& plan, const BackwardArgs& args, Workspace& ws, const SavedForward& saved,
              BackwardTimes* times = nullptr);

// Name of the backward kernel this process uses.
const char* backward_kernel_name();

}  // namespace uaa
