// uaa/plan.h — an immutable description of one sequence-parallel attention layout.
//
// A plan holds every rank's query and key/value token counts, the attention shape and options, the
// split of heads over ranks and every per-peer count and displacement of both exchanges. Build it once
// per layout and reuse it for every layer and step: calls made with a plan exchange no metadata.
//
//   uaa::AttentionShape shape{.q_heads = 24, .kv_heads = 8, .head_dim = 128, .causal = true};
//   // Collective: one all-gather of a small record; every rank may hold any number of tokens.
//   uaa::Plan plan = uaa::Plan::create(*comm, shape, my_q_tokens, my_kv_tokens);
//   // Local: no communication, when every rank already knows all lengths (must be identical on all
//   // ranks; a disagreement is detected by the first forward() call).
//   uaa::Plan same = uaa::Plan::from_lengths(*comm, shape, {1000, 1001, 0}, {1000, 1001, 0});
//
// Work: the (query head, global query row) pairs, head-major, are split into one contiguous range
// per rank (work(r)) of about equal attention work, with no padding. When q_heads divides by the
// rank count the ranges are whole heads (plain Ulysses). Otherwise a head's rows may be shared by two
// ranks — 30 heads on 4 ranks are 7.5 heads each, not 8/8/7/7 — and with more ranks than heads every
// rank still gets rows. Cuts inside a head fall on multiples of 48 query rows. With GQA
// (q_heads = g * kv_heads) query head h reads key/value head h / g; a rank receives exactly the
// key/value heads its rows read (a shared head's keys and values go to both of its ranks).
//
// Causal convention: global query position i may attend global key position j iff
// j <= i + (kv_total - q_total) (bottom-right aligned, as in FlashAttention 2.1+). With
// q_total == kv_total this is the usual j <= i. Rows that may attend no key (q_total > kv_total)
// produce zeros and a log-sum-exp of -inf.
//
// Documents, batches and windows. Attention never crosses documents: a plan may describe
//   - packed documents (`Documents`, the cu_seqlens of FlashAttention's varlen API, THD in
//     TransformerEngine): the global sequence is the documents one after another, cut over the ranks
//     by the per-rank lengths as always, anywhere (a document may lie on one rank, span several, or
//     be shorter than a rank's chunk; lengths 0 are allowed). Keys/values may have their own
//     documents (cross attention): query document d attends key document d only;
//   - a batch (AttentionShape::batch = B): B sequences, each cut over the ranks by the same per-rank
//     lengths ([B][S_local][H][D] on every rank; tensor views give the batch stride). Documents, if
//     any, apply to every sequence of the batch;
//   - a sliding window (window_left, window_right) inside each document, alone or with causal.
// The causal and window conventions apply per document (positions counted from each document's
// start, bottom-right aligned per document). A document's output and gradients are bitwise those of
// the same document run alone, for every partition over ranks. The work split balances the visible
// (query, key) pairs, so a rank holding one long causal document and one holding many short ones
// do equal work; cuts inside a head fall on document starts or on multiples of 48 rows from a
// document's start. Documents and batches need the uaa strategy; windows work with every strategy.
//
// Strategies: every one produces the same output. `uaa` (the default) is the subject of this library;
// the others exist so that users can compare, in the same API and command, with what they would run
// instead:
//   uaa          uneven per-peer counts, no padding; the rank's own block never travels.
//   ulysses      plain equal-split Ulysses: every rank must hold total/P query and key/value tokens
//                and q_heads must divide by P (else invalid_argument); every block, the rank's own
//                included, goes through the exchange. Bitwise equal to uaa.
//   ulysses_pad  the common workaround: every rank's shard is padded to Sp = max(ceil(S/P), longest
//                shard) tokens and the query heads to a multiple of P (zero data); equal counts; the
//                padded rows and heads travel and are computed, then dropped. Padded key rows are left
//                out of the softmax by handing the kernel only the real key rows (instead of masking
//                them), which spares it at most (P-1)/S of the attention work. Equal to uaa within the
//                kernel's tolerance (bitwise on the kernels shipped today).
//   allgather_kv each rank keeps its queries and all heads, all-gathers K and V, attends its own
//                rows (Megatron's "all_gather" context parallelism). Bitwise equal to uaa.
//
// A Plan is a cheap-to-copy handle to immutable data: share it freely across threads.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "uaa/communicator.h"
#include "uaa/types.h"

namespace uaa {

// The attention work of one rank (heads count over the batch: head b * q_heads + h is head h of
// sequence b): global query rows [first_row, q_total) of head first_head, every
// row of the heads after it up to end_head, and rows [0, end_row) of head end_head. Empty when
// (first_head, first_row) == (end_head, end_row).
struct WorkRange {
  std::int64_t first_head = 0, first_row = 0, end_head = 0, end_row = 0;
};

enum class Strategy : std::uint8_t { uaa = 0, ulysses = 1, ulysses_pad = 2, allgather_kv = 3 };

const char* strategy_name(Strategy strategy);  // "uaa", "ulysses", "ulysses_pad", "allgather_kv"
// Parses a name written by strategy_name(); false if unknown.
bool parse_strategy(const std::string& name, Strategy* out);

// The fields every rank must agree on.
struct AttentionShape {
  std::int64_t q_heads = 0;   // Hq >= 1
  std::int64_t kv_heads = 0;  // Hkv >= 1 dividing Hq; 0 means "same as q_heads" (MHA)
  std::int64_t head_dim = 0;  // D in [1, kMaxHeadDim]
  DType dtype = DType::f32;   // element type of q, k, v and out
  bool causal = false;        // see the causal convention above
  float scale = 0.0f;         // softmax scale; 0 means 1/sqrt(head_dim)
  bool return_lse = false;    // forward() also returns the log-sum-exp of every (token, head)
  std::int64_t batch = 1;     // B >= 1 sequences per call, each cut by the same per-rank lengths
  // Sliding window: query i (aligned position i' = i + kv_len - q_len within its document) sees key
  // j iff i' - window_left <= j <= i' + window_right; -1: no bound on that side (FlashAttention's
  // window_size convention). causal caps the right side at 0.
  std::int64_t window_left = -1, window_right = -1;
};

// Packed documents of one sequence, in order: global lengths (cu_seqlens differences). Every rank
// passes the same lists (they are part of the plan's fingerprint).
struct Documents {
  std::vector<std::int64_t> q;   // query lengths, summing to the query total
  std::vector<std::int64_t> kv;  // key/value lengths, same count, summing to the kv total;
                                 // empty: the same as q (self attention)
  // From cumulative offsets [0, n0, n0 + n1, ...] (FlashAttention's cu_seqlens_q / cu_seqlens_k).
  // Throws uaa::Error(invalid_argument) if an offset decreases or the list does not start at 0.
  static Documents from_cu_seqlens(const std::vector<std::int64_t>& cu_q,
                                   const std::vector<std::int64_t>& cu_kv = {});
};

// The order in which backward() sums dK/dV over the query rows of a head that two ranks share.
//   canonical  the single-rank order: the later rank continues the earlier rank's sums (a carry
//              message). Gradients are bitwise the single-rank run's for every partition. Costs one
//              message per shared head when every rank also holds other work; when a rank's rows
//              lie inside one head (more ranks than query heads) those ranks run one after another.
//   by_rank    each rank sums its own rows; the key owner adds the per-rank sums in rank order. No
//              waiting, deterministic run to run and for every thread count, but when a head is
//              shared the last bits depend on where the ranks' rows are cut (bitwise the
//              single-rank run only when no head is shared, e.g. q_heads divisible by the ranks).
enum class BackwardOrder : std::uint8_t { canonical = 0, by_rank = 1 };

// Choices that are not part of the attention itself; every rank must make the same ones (they are
// part of the plan's fingerprint).
struct PlanOptions {
  Strategy strategy = Strategy::uaa;  // how the work is distributed (see above); benchmarks
  // Ranks whose processes run different kernel variants (e.g. UAA_ISA=avx2 on one rank) are
  // refused by default with ErrorCode::mismatch, because the bitwise equality of P-rank and
  // 1-rank results holds only when every rank runs the same kernel. true allows them: results
  // then agree with the float64 reference within the kernels' tolerance, not bitwise.
  bool allow_mixed_kernels = false;
  BackwardOrder backward_order = BackwardOrder::canonical;  // see above
  // For bindings (Python): a problem the binding found in its own arguments before it could build
  // the shape. When set, create() raises uaa::Error(invalid_argument, "uaa::Plan::create: rank r:
  // <caller_problem>") on every rank, so one rank's bad argument does not leave its peers waiting;
  // from_lengths() (no communication) raises it on this rank. Checked before any other value.
  const char* caller_problem = nullptr;
};

inline constexpr std::int64_t kMaxHeadDim = 256;

class Plan;
namespace detail {
struct PlanData;
const PlanData& plan_data(const Plan& plan);
}  // namespace detail

class Plan {
 public:
  // Collective over `comm`: exactly one all-gather of a fixed-size record per rank. Throws the same
  // uaa::Error on every rank if any rank's input is invalid or the ranks disagree on the shape.
  static Plan create(Communicator& comm, const AttentionShape& shape, std::int64_t q_tokens,
                     std::int64_t kv_tokens, const PlanOptions& options = {});
  // The same for packed documents (see above). Ranks that pass different documents get
  // ErrorCode::mismatch on every rank; documents that do not sum to the totals, negative lengths
  // or unequal counts get ErrorCode::invalid_argument on every rank.
  static Plan create(Communicator& comm, const AttentionShape& shape, std::int64_t q_tokens,
                     std::int64_t kv_tokens, const Documents& docs, const PlanOptions& options = {});

  // No communication: all ranks' lengths are given (one entry per rank, identical on every rank).
  // A value that is wrong in itself (negative length, bad shape) throws at once: every rank is given
  // the same lengths, so every rank throws. A problem of this process only (its kernel cannot run
  // the dtype) does not throw here: the plan is returned unusable and its first forward() raises
  // that problem on every rank, so no rank is left waiting for one that gave up alone.
  static Plan from_lengths(Communicator& comm, const AttentionShape& shape,
                           std::vector<std::int64_t> q_lens, std::vector<std::int64_t> kv_lens,
                           const PlanOptions& options = {});
  static Plan from_lengths(Communicator& comm, const AttentionShape& shape,
                           std::vector<std::int64_t> q_lens, std::vector<std::int64_t> kv_lens,
                           const Documents& docs, const PlanOptions& options = {});

  int ranks() const;
  int rank() const;
  const AttentionShape& shape() const;  // normalized: kv_heads and scale filled in
  const PlanOptions& options() const;
  Communicator& communicator() const;   // the one it was built with (kept alive by the plan)
  const std::vector<std::int64_t>& q_lens() const;
  const std::vector<std::int64_t>& kv_lens() const;
  std::int64_t q_tokens() const;   // this rank's
  std::int64_t kv_tokens() const;  // this rank's
  std::int64_t q_total() const;   // of one sequence of the batch
  std::int64_t kv_total() const;
  std::int64_t batch() const;     // shape().batch
  // The documents of one sequence: as given, with kv filled in; one document of the totals when
  // none were given.
  const Documents& documents() const;
  WorkRange work(int rank) const;               // the uaa strategy's split (see above); rank in [0, ranks())
  std::int64_t q_head_begin(int rank) const;    // query heads of which `rank` computes some rows
  std::int64_t q_head_end(int rank) const;
  std::int64_t kv_head_begin(int rank) const;   // kv heads received by `rank`
  std::int64_t kv_head_end(int rank) const;

  // Bytes this rank sends to / receives from other ranks in the exchanges of one forward() call
  // (the strategy's, padding included; the 64-byte agreement is not counted).
  std::int64_t bytes_sent() const;
  std::int64_t bytes_received() const;
  // The same for one backward() call (uaa/backward.h): saved mode moves dO rows in and dQ rows and
  // per-head dK/dV partial sums out; recompute mode also moves the q/k/v rows in again. Partial
  // sums of a head shared by two ranks also travel between them (counted here).
  std::int64_t backward_bytes_sent(bool saved) const;
  std::int64_t backward_bytes_received(bool saved) const;
  // Bytes a SavedForward holds for this plan on this rank (the q/k/v rows received from others).
  std::int64_t saved_bytes() const;
  // A 64-bit digest of everything the ranks must agree on (lengths, shape, options).
  std::uint64_t fingerprint() const;
  // One-line human-readable summary.
  std::string describe() const;

  // Bytes of staging this rank's workspace holds for a forward() call of this plan (its receive and
  // output blocks; the message path adds send/receive buffers of at most the bytes exchanged).
  std::int64_t staging_bytes() const;

 private:
  friend const detail::PlanData& detail::plan_data(const Plan&);
  explicit Plan(std::shared_ptr<const detail::PlanData> data) : data_(std::move(data)) {}
  std::shared_ptr<const detail::PlanData> data_;
};

}  // namespace uaa
