// uaa/attention.h — the Ulysses Anything Attention call.
//
//   uaa::Workspace ws;                       // reused across calls; grows on the first call only
//   uaa::AttentionArgs args;
//   args.q = uaa::contiguous(q.data(), plan.q_tokens(), 24, 128);    // [S_local][Hq][D]
//   args.k = uaa::contiguous(k.data(), plan.kv_tokens(), 8, 128);    // [Skv_local][Hkv][D]
//   args.v = uaa::contiguous(v.data(), plan.kv_tokens(), 8, 128);
//   args.out = uaa::contiguous(o.data(), plan.q_tokens(), 24, 128);  // [S_local][Hq][D]
//   uaa::forward(plan, args, ws);            // collective over the plan's communicator
//
// What happens: the plan's program for this rank runs. q, k, v rows go to the ranks that compute
// their heads (uneven counts, no padding), attention runs on those (head, row) ranges, and the
// output goes back to the ranks that own the tokens; the rank's own rows never travel. The result is
// bitwise identical for every number of ranks and every split of the tokens: P ranks produce exactly
// what one rank produces for the whole sequence (when every rank runs the same kernel variant).
//
// Errors: each call opens with an agreement (64 bytes per rank, O(log P) messages) in which every
// rank reports its verdict on its arguments and set-up (workspace memory, thread count, kernel). Any
// problem on any rank (wrong token count, heads, strides, dtype, overlapping output, a failed
// allocation, a bad UAA_NUM_THREADS) makes forward() throw the same uaa::Error on *every* rank,
// naming the rank and the values; the caller's out/lse are then untouched on every rank and the
// communicator stays usable. Ranks that call with different plans, out of step (one skipped a call),
// or with different kernel variants get ErrorCode::mismatch on every rank. A failure after the
// agreement (a transport error, a deadline) reaches every rank as the failing rank's error; see
// docs/FAILURE_MODEL.md.
//
// Output rows must be nested: with the two strides sorted, the smaller one is at least head_dim and
// the larger one at least the extent of the smaller axis (true of every dense or padded layout).
#pragma once

#include <cstdint>
#include <memory>

#include "uaa/communicator.h"
#include "uaa/plan.h"
#include "uaa/types.h"

namespace uaa {

class Workspace;
namespace detail {
struct WorkspaceBuffers;
WorkspaceBuffers& workspace_buffers(Workspace& ws);
}  // namespace detail

struct AttentionArgs {
  ConstTensor q;          // [plan.q_tokens()][Hq][D]
  ConstTensor k;          // [plan.kv_tokens()][Hkv][D]
  ConstTensor v;          // [plan.kv_tokens()][Hkv][D]
  Tensor out;             // [plan.q_tokens()][Hq][D]; must not overlap q, k, v
  float* lse = nullptr;   // [q_tokens][Hq] log-sum-exp (natural log) of the scaled scores;
                          // required iff the plan has return_lse, else must be null
  std::int64_t lse_token_stride = 0;  // elements between tokens in lse; 0 means Hq
  std::int64_t lse_batch_stride = 0;  // batched plans: elements between sequences; 0 means
                                      // q_tokens * the token stride ([B][q_tokens][Hq])
  // For bindings (the Python package): a problem the caller found in its own arguments that no
  // view above can express (an array of another element type, a non-contiguous head_dim, ...).
  // When set, this rank takes part in the call's agreement with it as its verdict, so every rank
  // raises uaa::Error(invalid_argument, "uaa::forward: rank r: <caller_problem>") and nothing is
  // written, as for any other bad argument. The views are then not read.
  const char* caller_problem = nullptr;
};

// Per-phase wall times of one call, in milliseconds, as seen by this rank. An exchange phase also
// holds the time spent waiting for slower peers to arrive, unless sync_exchanges is set.
struct PhaseTimes {
  // Input, for benchmarks: when true, forward() first waits for every rank (a one-byte all-gather)
  // before each exchange and reports that wait in `wait`, so the exchange phases measure data
  // movement only, not the skew of the phase before them. Costs one extra collective per exchange.
  bool sync_exchanges = false;
  double handshake = 0;  // the call's agreement (verdicts, plan, call index, kernel) and set-up
  double pack = 0, exchange_qkv = 0, attention = 0, exchange_out = 0, unpack = 0, total = 0;
  double wait = 0;       // time in the sync_exchanges waits (0 without it)
};

// Buffers reused across calls. One workspace serves one call at a time; use one per thread.
class Workspace {
 public:
  Workspace();
  ~Workspace();
  Workspace(Workspace&&) noexcept;
  Workspace& operator=(Workspace&&) noexcept;

  std::int64_t bytes_reserved() const;  // total bytes held
  std::int64_t grow_count() const;      // how many times a buffer had to grow (allocation count)


 private:
  friend detail::WorkspaceBuffers& detail::workspace_buffers(Workspace&);
  std::unique_ptr<detail::WorkspaceBuffers> buffers_;
};

// Collective over the communicator the plan was built with.
void forward(const Plan& plan, const AttentionArgs& args, Workspace& ws, PhaseTimes* times = nullptr);

// What the last forward() call with `ws` did, for reports.
struct CallReport {
  bool peer_memory = false;  // data moved by single-copy peer reads/writes (else messages)
};
CallReport last_call(const Workspace& ws);

// Name of the attention kernel forward() uses in this process (chosen once, best first).
const char* kernel_name();

}  // namespace uaa
