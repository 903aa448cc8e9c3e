// Exchange programs (internal): what one rank does in one kind of call, as data.
//
// A plan compiles each kind of call into a Program for its rank: exchange steps (per peer, an
// ordered list of strided copies of [tokens][heads][row] blocks between the caller's tensors and
// the rank's staging buffers) and compute steps (kernel calls over segments that name the same
// places). Programs name no transport: executors (src/exec/) run them with messages or with
// single-copy peer reads/writes, and a GPU executor would run them with grouped send/recv and
// device copies. Generators are pure functions of the plan geometry and the rank (no MPI), so
// every property of the data movement is unit-tested in one process (tests/unit/program_test.cpp).
//
// Places. A Place names where a [tokens][heads][row_bytes] block lives on one rank:
//   - a caller tensor (q, k, v, out, lse): element (t, h) at the caller's view with local token
//     `token + t` and head `head + h` (the caller's strides; lse rows are one float per head);
//   - a staging buffer (stage_in, stage_out): rows at byte `offset`, element (t, h) at
//     offset + (t * pitch + h) * row_bytes, where pitch is the place's pitch or, when that is 0,
//     the block's own heads (dense);
//   - pad: padding of the comparison strategies: reads as zeros, writes are dropped.
// stage_in holds what this rank receives and its kernels read (q/k/v rows of other ranks);
// stage_out holds what its kernels write for other ranks (output and lse rows). Areas in staging
// start on 64-byte boundaries.
//
// Parts. A Part moves one block: `src` on the sending rank, `dst` on the receiving rank, both with
// the part's tokens x heads x row_bytes. For every pair (r, j), r's send list to j and j's receive
// list from r are the same parts in the same order (tested): messages can be matched in order, and
// a peer-memory executor can compute a remote address from the part alone.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "plan/layout.h"

namespace uaa::detail {

// Backward calls add the caller's dout/dq/dk/dv tensors, `delta` (this rank's rowsum(dO∘O),
// [q_tokens][q_heads] floats, addressed like lse) and `saved` (the forward's stage_in kept for the
// backward: a SavedForward, or in recompute mode a workspace area filled again by the backward).
enum class Slot : std::uint8_t {
  q, k, v, out, lse, stage_in, stage_out, pad, dout, dq, dk, dv, delta, saved
};
const char* slot_name(Slot s);
inline bool is_tensor(Slot s) { return s <= Slot::lse || (s >= Slot::dout && s <= Slot::delta); }
inline bool is_staging(Slot s) {
  return s == Slot::stage_in || s == Slot::stage_out || s == Slot::saved;
}
// Caller tensors whose rows are one float per head (token stride in floats, head stride 1).
inline bool is_row_stat(Slot s) { return s == Slot::lse || s == Slot::delta; }

// 32 bytes and a Part 80: a rank's program lists O(P) parts, and at 65,536 ranks their size is most
// of what building a plan costs (memory first touched; narrower fields measured ~10% faster).
struct Place {
  Slot slot = Slot::pad;
  std::int32_t pitch = 0;            // staging: heads per token row (0: the block's heads)
  std::int64_t token = 0, head = 0;  // caller tensors: local token and head index
  std::int64_t offset = 0;           // staging: byte offset of the block
};

struct Part {
  std::int64_t tokens = 0;
  std::int32_t heads = 0, row_bytes = 0;  // heads <= 2^31 - 1 (plans check), row <= 1 KiB
  Place src, dst;  // src on the sender, dst on the receiver
  std::int64_t bytes() const { return tokens * heads * row_bytes; }
};
static_assert(sizeof(Place) == 32 && sizeof(Part) == 80);

// A caller tensor's block at local token `token`, head `head`.
inline Place tensor_place(Slot s, std::int64_t token, std::int64_t head) {
  Place p;
  p.slot = s;
  p.token = token;
  p.head = head;
  return p;
}

// A staging block whose rows are dense ([tokens][heads][row], no gaps) is one contiguous run: the
// message executor sends it from / receives it into staging directly; other parts are packed.
inline bool is_dense_staging(const Place& p, std::int64_t heads) {
  return is_staging(p.slot) && (p.pitch == 0 || p.pitch == heads);
}
// Bytes a packed part takes in the executor's pack/unpack areas (each part 64-byte aligned).
inline std::int64_t packed_bytes(const Part& x) { return (x.bytes() + 63) / 64 * 64; }

// Parts [begin, end) of a step's part list exchanged with `peer` (peer may be the rank itself:
// then src and dst are both local and executors copy).
struct PeerParts {
  int peer = 0;
  std::uint32_t begin = 0, end = 0;
};

struct ExchangeStep {
  std::vector<Part> send_parts, recv_parts;
  std::vector<PeerParts> send, recv;  // ordered by peer; no entry for a peer with no parts
  std::int64_t bytes_to_peers() const;    // sent to ranks other than `self`
  std::int64_t bytes_from_peers() const;  // received from ranks other than `self`
  int self = 0;
};

// One kernel call: the rows of q heads [q_head_begin, + q_heads) as segments in token order, the
// first at row q_first of the q_total rows the causal alignment counts; keys/values likewise (kv
// heads from kv_head_begin), the first at key 0 of kv_total. uaa and the padded strategies use
// global positions; allgather_kv numbers its own rows from 0 with q_total = its row count and
// kv_total cut at its last row's causal horizon, which gives every row the same visible keys.
struct QuerySegment {
  Place q, out, lse;             // lse.slot == pad: no lse
  std::int64_t tokens = 0;
  std::int64_t dense_heads = 0;  // staging places: heads per dense row (q/out of this piece)
};
struct KeySegment {
  Place k, v;
  std::int64_t tokens = 0;
  std::int64_t dense_heads = 0;  // staging places: kv heads per dense row
};
// Documents inside a step. Attention never crosses documents, so a step over the rows of several
// documents runs one kernel call per document: segments [q_begin, q_end) and [kv_begin, kv_end) of
// the step's lists (which are cut at document boundaries), rows counted from the document's start
// (q_first of q_total; keys 0..kv_total), so tiles start at each document's start. kv_first: the
// document's first key in the step's key numbering (where its dK/dV sums go in a partial block).
struct DocSpan {
  std::uint32_t q_begin = 0, q_end = 0, kv_begin = 0, kv_end = 0;
  std::int64_t q_first = 0, q_total = 0, kv_first = 0, kv_total = 0;
};
struct ComputeStep {
  std::int64_t q_head_begin = 0, q_heads = 0, kv_head_begin = 0;
  std::int64_t q_first = 0, q_total = 0, kv_total = 0;
  bool causal = false;
  std::int64_t window_left = -1, window_right = -1;
  std::vector<QuerySegment> q;
  std::vector<KeySegment> kv;
  std::vector<DocSpan> docs;  // empty: one document (the fields above)
};

// A whole call for one rank: exchange `in`, compute every step, exchange `out` (either exchange may
// be empty). stage_in_bytes / stage_out_bytes: the staging this rank needs.
struct Program {
  ExchangeStep in, out;
  std::vector<ComputeStep> compute;
  std::int64_t stage_in_bytes = 0, stage_out_bytes = 0;
  // What the message executor packs/unpacks (parts whose side is not dense staging), in bytes,
  // the larger of the two exchanges (filled by finalize(): executors never recount per call).
  std::int64_t pack_bytes = 0, unpack_bytes = 0;
  std::int64_t bytes_sent() const { return in.bytes_to_peers() + out.bytes_to_peers(); }
  std::int64_t bytes_received() const { return in.bytes_from_peers() + out.bytes_from_peers(); }
};

// The backward call of one rank (uaa strategy; docs/ARCHITECTURE.md "Backward").
//
//   in      dO, lse and delta rows of the rank's work (recompute mode: also the forward's q/k/v
//           rows, into `saved` at the forward's stage_in offsets)
//   phase1  kernels up to the carries' meeting point: the piece that ends inside a head first,
//           then whole heads (the head at the meeting point cut at a 48-row multiple)
//   carry1  send the partial dK/dV sums of a head whose later rows the next rank holds (when the
//           piece that ends early ran in phase1); receive the one this rank continues
//   phase2  the rest of the whole heads (a cut head continued in place), then the piece that
//           continues a head from the received partial sums
//   carry2  send a partial sum produced in phase2 (a rank whose rows lie inside one head)
//   fold    a rank completing the first q head of a GQA group adds the group's later heads it also
//           completes into it, in ascending order (the prefix of the owner's sum: same bits)
//   out     dQ rows to the token owners; each completed head's dK/dV sums, sliced by key owner
//   reduce  on the key owner: per kv head, the sum over its q heads in ascending order -> dk/dv
struct BackwardQuerySegment {
  Place q, dout, lse, delta, dq;
  std::int64_t tokens = 0;
  std::int64_t dense_heads = 0;  // staging places: heads per dense row
};
struct BackwardStep {
  std::int64_t q_head_begin = 0, q_heads = 0, kv_head_begin = 0;
  std::int64_t q_first = 0, q_total = 0, kv_total = 0;
  bool causal = false;
  std::int64_t window_left = -1, window_right = -1;
  std::vector<BackwardQuerySegment> q;
  std::vector<KeySegment> kv;
  // Empty: one document. Else one kernel call per span, each writing its document's keys of the
  // partial blocks (continuing the carry there); keys of documents no span covers keep the carry
  // (head 0) or are zeroed, as a kernel does for keys no row sees.
  std::vector<DocSpan> docs;
  // fp32 [q_heads][kv_total][head_dim] partial sums (stage_out) and the optional carry for head 0
  // ([kv_total][head_dim] fp32 in stage_in; pad: none).
  Place dk_partial, dv_partial, dk_carry, dv_carry;
};
// One term of the canonical dK/dV sum: fp32 [kv_tokens][head_dim] blocks of one q head.
struct ReduceTerm {
  Place dk, dv;
};
struct ReduceStep {
  std::int64_t kv_tokens = 0;  // this rank's
  // Terms of kv head g: terms[term_begin[g] .. term_begin[g + 1]), in ascending q head order.
  std::vector<std::uint32_t> term_begin;
  std::vector<ReduceTerm> terms;
};
// into += from over [kv_total][head_dim] fp32 (the partial sums of two q heads of one group).
struct FoldTerm {
  Place dk_into, dv_into, dk_from, dv_from;
};
struct BackwardProgram {
  ExchangeStep in_saved, in_recompute, carry1, carry2, out;
  std::vector<BackwardStep> phase1, phase2;
  std::vector<FoldTerm> fold;  // in order, after carry2 and before out
  ReduceStep reduce;
  std::int64_t stage_in_bytes = 0, stage_out_bytes = 0, saved_bytes = 0;
  std::int64_t pack_bytes = 0, unpack_bytes = 0;  // the largest of its exchanges (finalize)
  std::int64_t bytes_sent(bool saved) const;
  std::int64_t bytes_received(bool saved) const;
};

// What a generator needs of a plan (all ranks' lengths; normalized shape).
//
// Batches are heads: a plan of B sequences is generated as one sequence with B * q_heads query
// heads and B * kv_heads key/value heads (head b * H + h is head h of sequence b; GQA groups stay
// inside a sequence because q_heads = group * kv_heads), and split_batches() then cuts every part
// and step that touches a caller tensor at sequence boundaries, so each names one sequence's
// [tokens][heads] block (the executor resolves head b * H + h through the view's batch stride).
struct Geometry {
  std::vector<std::int64_t> q_lens, kv_lens;
  std::int64_t q_heads = 0, kv_heads = 0, head_dim = 0, elem_bytes = 0;  // over the whole batch
  bool causal = false, with_lse = false;
  std::int64_t batch = 1;
  std::int64_t window_left = -1, window_right = -1;
  // Document starts of one sequence (prefix sums, documents + 1 entries); empty: one document.
  std::vector<std::int64_t> q_doc_start, kv_doc_start;
};
// The work split's input for a geometry.
WorkInput work_input(const Geometry& g);

// Generators, one per strategy (plan.h describes them). Precondition: validated geometry;
// ulysses additionally needs what ulysses_problem() checks.
struct RankWork;
Program compile_uaa_forward(const Geometry& g, const std::vector<RankWork>& work, int rank);
Program compile_padded_forward(const Geometry& g, int rank);  // ulysses and ulysses_pad
Program compile_allgather_kv_forward(const Geometry& g, int rank);
// canonical: the bitwise partition-invariant order (carries between ranks sharing a head);
// false: PlanOptions::backward_order == by_rank (no carries; a shared head's per-rank sums are
// added at the key owner in rank order).
BackwardProgram compile_uaa_backward(const Geometry& g, const std::vector<RankWork>& work, int rank,
                                     bool canonical = true);

// Cuts a step's segments at document boundaries and fills its spans (program.cpp). The segments
// must cover global query rows [c.q_first, ...) and keys [0, c.kv_total) in order; no-op for a plan
// of one document.
void split_documents(const Geometry& g, ComputeStep& c);
void split_documents(const Geometry& g, BackwardStep& c);
// Batched plans: cuts parts and steps at sequence boundaries (see Geometry). No-op when batch == 1.
void split_batches(const Geometry& g, Program& p);
void split_batches(const Geometry& g, BackwardProgram& p);

// Fills the derived sizes of a generated program (every generator ends with it).
void finalize(Program& p);
void finalize(BackwardProgram& p);
// Bytes the message executor packs (send) or unpacks (receive) for one exchange step.
std::int64_t packed_need(const ExchangeStep& s, bool send);

// A readable dump of a program (tests print it on failure; `uaa plan --program` shows it).
std::string describe(const Program& p);
std::string describe(const BackwardProgram& p);

}  // namespace uaa::detail
