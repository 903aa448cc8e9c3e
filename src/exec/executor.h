// Executors (internal): run a rank's Program (src/program/program.h) over a transport.
//
//   - run_exchange_by_messages: every part becomes one message (Communicator::exchange); parts whose
//     side is a dense staging block travel straight from/into staging, the others are packed into
//     or unpacked from the workspace's pack/unpack areas. A part to or from the rank itself is a
//     local copy.
//   - run_exchange_by_peer_memory: single-copy process_vm_writev/readv between this rank's tensors
//     and the peers' staging (the side that holds the tensor performs the copy: the sender writes
//     q/k/v rows into the receiver's stage_in, the receiver reads output rows out of the sender's
//     stage_out). Only staging addresses are needed, and they change only when a workspace grows,
//     so calls in steady state publish no addresses.
//   - run_compute: one kernel call per compute step, segments resolved from the same places.
// The bytes a program names are the same whichever executor moves them.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/workspace.h"
#include "kernels/kernel.h"
#include "program/program.h"
#include "uaa/attention.h"
#include "uaa/communicator.h"
#include "uaa/plan.h"

namespace uaa::detail {

// Where the places of a program are in this process for one call.
struct Bindings {
  ConstTensor q, k, v;
  Tensor out;
  float* lse = nullptr;
  std::int64_t lse_token_stride = 0;  // elements
  std::byte* stage_in = nullptr;
  std::byte* stage_out = nullptr;
  std::int64_t elem_bytes = 4;
  // Backward calls only.
  ConstTensor dout;
  Tensor dq, dk, dv;
  float* delta = nullptr;  // [q_tokens][q_heads], token stride delta_token_stride
  std::int64_t delta_token_stride = 0;
  std::byte* saved = nullptr;
  // Batched plans: heads per sequence of the q-like (q, out, lse, dout, dq, delta) and kv-like
  // tensors; a tensor place's head b * heads + h is head h of sequence b, at the view's
  // batch_stride (0: not batched). Row statistics have their own batch strides.
  std::int64_t q_heads = 0, kv_heads = 0;
  std::int64_t lse_batch_stride = 0, delta_batch_stride = 0;
};

// A [tokens][heads][row] block's address and strides in bytes.
struct BlockAddress {
  std::byte* base = nullptr;
  std::int64_t token_stride = 0, head_stride = 0;
};
// Precondition: p.slot != pad.
BlockAddress resolve(const Bindings& b, const Place& p, std::int64_t heads, std::int64_t row_bytes);

// Copies one part whose two places are both in this process (pad source: zeros; pad dest: dropped).
void copy_local(const Bindings& b, const Part& part);

struct ExchangeTimes {
  double pack = 0, transfer = 0, unpack = 0;
};
void run_exchange_by_messages(Communicator& comm, const ExchangeStep& step, const Bindings& b,
                              WorkspaceBuffers& B, ExchangeTimes& t);

// Peer memory: writes the `in` step's parts (this rank's tensors -> peers' stage_in) or reads the
// `out` step's parts (peers' stage_out -> this rank's tensors). peer_in/peer_out: every rank's
// staging bases. Returns "" or this rank's error (nothing is left in flight either way).
std::string write_in_parts(Communicator& comm, const ExchangeStep& in, const Bindings& b,
                           const std::uint64_t* peer_stage_in, WorkspaceBuffers& B);
std::string read_out_parts(Communicator& comm, const ExchangeStep& out, const Bindings& b,
                           const std::uint64_t* peer_stage_out, WorkspaceBuffers& B);

// The one document of a step without document spans.
template <typename Step>
DocSpan whole_step(const Step& c) {
  return DocSpan{0, static_cast<std::uint32_t>(c.q.size()), 0, static_cast<std::uint32_t>(c.kv.size()),
                 c.q_first, c.q_total, 0, c.kv_total};
}

// Calls f(document) for each kernel call of a step: one per document span, else the whole step.
template <typename Step, typename F>
void for_each_document(const Step& c, F f) {
  if (c.docs.empty()) f(whole_step(c));
  for (const DocSpan& d : c.docs) f(d);
}

// Batched plans (shape.batch > 1): the heads per sequence and lse's batch stride (given, or
// q_tokens × lse_token_stride); no-op otherwise. Call after lse_token_stride is set.
void bind_batch(Bindings& b, const AttentionShape& s, std::int64_t q_tokens,
                std::int64_t lse_batch_stride);

// The backward kernel problem of one document of a step (segments in B's lists; scratch not set).
BackwardProblem backward_problem(const BackwardStep& c, const DocSpan& doc, const Bindings& b,
                                 const AttentionShape& s, int threads, WorkspaceBuffers& B);

// The kernel problem of one document of a compute step, with segments in B's lists (pointers valid
// until the next call that uses B's lists). scratch is not set.
KernelProblem kernel_problem(const ComputeStep& c, const DocSpan& doc, const Bindings& b,
                             const AttentionShape& s, int threads, WorkspaceBuffers& B);

}  // namespace uaa::detail
