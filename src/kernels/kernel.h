// The narrow interface between the Ulysses step and a local attention kernel (internal).
//
// A kernel computes softmax(scale * Q Kᵀ) V for `q_heads` query heads over a sequence handed to it as
// segments in global token order (segment j holds rank j's tokens: the received blocks, and for the
// own rank the caller's buffers). Output segment i belongs to query segment i.
//
// The query segments may cover only a range of rows [q_first, q_first + their tokens) of the global
// query sequence (a plan splits a head's rows between ranks when heads do not divide, see
// plan/layout.h); q_total stays the global count that the causal alignment uses.
//
// Exactness contract (what makes a P-rank run bitwise equal to a 1-rank run): the arithmetic for one
// (head, query row) depends only on that row, the global key positions and the tile size — never on
// segment boundaries, head split, which other rows are computed, or thread count. Kernels tile query
// rows from q_first; plans start row ranges only at multiples of kQueryRowGranule, so a kernel whose
// query tile divides the granule sees exactly the tiles of the 1-rank run.
//
// Masks (causal, sliding window): a row sees the keys [first_visible_key, last_visible_key] (below),
// an interval that is a function of the row. The kernels walk, for each row, exactly the key tiles
// that interval meets (global tiles, ascending), so a tile the row sees nothing of is never part of
// its online softmax (no −inf − −inf, and the same bits as if the tile did not exist for that row),
// whichever other rows of its query tile see that tile. Keys outside the interval inside a visited
// tile are masked per element, and a non-finite K or V value there never reaches the row.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "uaa/types.h"

namespace uaa::detail {

// Row ranges of a split head start at multiples of this (global query rows). The flash kernels'
// query tile (48 rows) divides it.
inline constexpr std::int64_t kQueryRowGranule = 48;

struct TokenSegment {
  const void* data = nullptr;  // element [t][h][d] at data + t*token_stride + h*head_stride + d
  std::int64_t tokens = 0;
  std::int64_t token_stride = 0;  // elements
  std::int64_t head_stride = 0;   // elements
};

struct OutSegment {
  void* data = nullptr;  // [tokens of the matching q segment][q_heads][head_dim]
  std::int64_t token_stride = 0;
  std::int64_t head_stride = 0;
  float* lse = nullptr;  // optional, [tokens][q_heads] with head stride 1
  std::int64_t lse_token_stride = 0;
};

struct KernelProblem {
  DType dtype = DType::f32;
  std::int64_t head_dim = 0;
  std::int64_t q_heads = 0;        // heads computed here (local head h = global q_head_begin + h)
  std::int64_t q_head_begin = 0;   // global index of local head 0
  std::int64_t kv_head_begin = 0;  // global index of the first kv head present in k and v
  std::int64_t group = 1;          // q_heads_total / kv_heads_total: q head g reads kv head g / group
  std::span<const TokenSegment> q, k, v;
  std::span<const OutSegment> out;  // same count as q
  std::int64_t q_first = 0;  // global index of the first row of q segment 0
  std::int64_t q_total = 0, kv_total = 0;  // global counts (causal alignment, key tiles)
  float scale = 1.0f;
  bool causal = false;  // key j visible to query i iff j <= i + kv_total - q_total
  // Sliding window (local attention) in key positions relative to the query's aligned position
  // i' = i + kv_total - q_total: key j is visible to query i iff i' - window_left <= j <= i' + window_right;
  // -1: no bound on that side. causal additionally caps the right side at 0 (j <= i').
  std::int64_t window_left = -1, window_right = -1;
  int threads = 1;      // threads the kernel may use; scratch_bytes and run read this one value
                        // (never uaa::num_threads(), which another thread may change between them)
  void* scratch = nullptr;  // scratch_bytes(problem) bytes, 64-byte aligned
};

class AttentionKernel {
 public:
  virtual ~AttentionKernel() = default;
  virtual const char* name() const = 0;
  virtual bool supports(DType dtype) const = 0;
  virtual std::size_t scratch_bytes(const KernelProblem& p) const = 0;
  virtual void run(const KernelProblem& p) const = 0;
};

// ---- Backward ------------------------------------------------------------------------------
//
// Gradients of one compute step of the backward program: the rows of q heads
// [q_head_begin, + q_heads) over global query rows [q_first, q_first + their tokens), against all
// kv_total keys. With P = softmax(scale·QKᵀ) recomputed from q, k and the forward's lse:
//   dV = Pᵀ·dO,  dP = dO·Vᵀ,  dS = P∘(dP − delta)·scale,  dQ = dS·K,  dK = dSᵀ·Q
// where delta = rowsum(dO∘O) per (row, head) is computed by the caller (the owner of the token).
//
// Outputs:
//   dq: every row of the step, in the dtype (complete: dQ needs only this row and all keys);
//   dk_partial / dv_partial: fp32 [q_heads][kv_total][head_dim] (heads partial_head_stride floats
//     apart, dense by default): for each local q head its contribution over this step's rows only
//     (the GQA sum over q heads and the sum over rows held by other ranks are done by the caller,
//     see below). Keys no row of the step sees get carry or 0. Floats between heads are untouched.
//
// Exactness contract (what makes backward bitwise partition-invariant):
//   - dq[i][h] = a chain over key positions in ascending order (fma steps, or on the avx512bf16
//     variant with bf16 inputs vdpbf16ps steps over key pairs (t0 + 2f, t0 + 2f + 1) of each key
//     tile); per (row, head) arithmetic depends only on that row, the global key positions and the
//     tile sizes.
//   - dk_partial[h][j] (likewise dv) = dk_carry[j] (local head 0 only, when given) or +0, followed
//     by a chain over this step's rows in ascending order (fma steps, or vdpbf16ps steps over row
//     pairs counted from each query tile's first row, as flash_bwd_impl.h states). Rows are taken
//     in whole query tiles counted from global row 0 (kQueryRowGranule divides into them): a tile
//     that sees no key of j's key tile is skipped, otherwise its rows take part, where a row that
//     cannot see j (causal or window mask) adds an exact zero product, or is left out when it sees
//     no key of j's key tile at all (the same chain; which rows are left out depends only on
//     global row and key positions). Hence the chain over rows [0, n) equals the chain over rows [m, n)
//     started from carry = the chain over rows [0, m), for m a multiple of kQueryRowGranule: a head
//     split between ranks gives the single-rank bits when the later rank starts from the earlier
//     rank's partial (plan/backward program).
//   - none of it depends on the thread count (dq's key order is kept across threads).
struct StatSegment {
  const float* data = nullptr;  // [tokens][q_heads] floats, head stride 1
  std::int64_t token_stride = 0;
};

struct BackwardProblem {
  DType dtype = DType::f32;
  std::int64_t head_dim = 0;
  std::int64_t q_heads = 0, q_head_begin = 0, kv_head_begin = 0, group = 1;  // as KernelProblem
  std::span<const TokenSegment> q, dout;     // same count, same tokens per segment
  std::span<const StatSegment> lse, delta;   // same count: the forward's lse (natural log), delta
  std::span<const OutSegment> dq;            // same count (lse fields unused); written
  std::span<const TokenSegment> k, v;
  std::int64_t q_first = 0, q_total = 0, kv_total = 0;
  float scale = 1.0f;
  bool causal = false;
  // Sliding window (local attention) in key positions relative to the query's aligned position
  // i' = i + kv_total - q_total: key j is visible to query i iff i' - window_left <= j <= i' + window_right;
  // -1: no bound on that side. causal additionally caps the right side at 0 (j <= i').
  std::int64_t window_left = -1, window_right = -1;
  int threads = 1;
  void* scratch = nullptr;  // backward_scratch_bytes(problem) bytes, 64-byte aligned
  float* dk_partial = nullptr;  // [q_heads][kv_total][head_dim] fp32 (may be null when kv_total == 0)
  float* dv_partial = nullptr;
  // Floats between consecutive local q heads in dk_partial / dv_partial; 0 means kv_total * head_dim
  // (dense). Lets a caller write one document's keys into a larger per-head block.
  std::int64_t partial_head_stride = 0;
  // [kv_total][head_dim] (dense, whatever partial_head_stride): start of local head 0's chain, or
  // null. May be dk_partial itself (a rank continuing its own head in a later step): read before
  // written, per key.
  const float* dk_carry = nullptr;
  const float* dv_carry = nullptr;
  // Benchmarks only: false lets threads add their dQ contributions in any order (the fastest
  // non-deterministic variant, to measure what the ordered chain costs). Results then depend on
  // thread timing.
  bool ordered_dq = true;
};

class BackwardKernel {
 public:
  virtual ~BackwardKernel() = default;
  virtual const char* name() const = 0;
  virtual bool supports(DType dtype) const = 0;
  virtual std::size_t scratch_bytes(const BackwardProblem& p) const = 0;
  virtual void run(const BackwardProblem& p) const = 0;
};

// The backward kernel paired with a forward kernel: the flash variant of the same ISA (the
// reference and tiled forward kernels pair with flash_portable's backward).
const BackwardKernel& backward_kernel_for(const AttentionKernel& forward);
// Flash backward variants this CPU runs, best first, ignoring UAA_ISA (tests run each).
std::span<const BackwardKernel* const> flash_backward_kernels_supported();

// Whole-sequence float64 reference backward on contiguous fp32 tensors, for tests and --check:
// q, dout [Sq][Hq][D]; k, v [Skv][Hkv][D] -> dq [Sq][Hq][D], dk, dv [Skv][Hkv][D] (float64).
// Recomputes the forward in float64; rows that see no key give zero gradients. Window as in
// KernelProblem.
void reference_attention_backward(const float* q, const float* k, const float* v,
                                  const float* dout, std::int64_t Sq, std::int64_t Skv,
                                  std::int64_t Hq, std::int64_t Hkv, std::int64_t D, float scale,
                                  bool causal, double* dq, double* dk, double* dv,
                                  std::int64_t window_left = -1, std::int64_t window_right = -1);

// The kernel this process uses: chosen once, best first (dispatch.cpp). Environment:
//   UAA_KERNEL=reference|tiled|flash|<a flash variant name>   overrides the choice;
//   UAA_ISA=avx512bf16|avx512|avx2|portable                     caps the ISA of the flash kernels.
const AttentionKernel& select_kernel();
bool kernel_supports(DType dtype);

const AttentionKernel& reference_kernel();   // float64 accumulation, slow, for tests
const AttentionKernel& tiled_f32_kernel();   // portable tiled online-softmax fp32

// Flash kernels (src/kernels/cpu/flash_*), fp32 and bf16, KernelProblem::threads threads.
// Calling one the CPU cannot run is undefined: use flash_kernels_supported().
const AttentionKernel& flash_avx512bf16_kernel();  // AVX-512 + AVX512_BF16 (vdpbf16ps for bf16)
const AttentionKernel& flash_avx512_kernel();      // AVX-512F/BW/DQ/VL + FMA
const AttentionKernel& flash_avx2_kernel();        // AVX2 + FMA
const AttentionKernel& flash_portable_kernel();    // any CPU (vector extensions, no FMA)

// The flash variants this CPU runs, best first, ignoring UAA_ISA (tests run every one of them).
std::span<const AttentionKernel* const> flash_kernels_supported();

// Whole-sequence float64 reference on contiguous fp32 tensors, for tests and --check:
// q [Sq][Hq][D], k, v [Skv][Hkv][D] -> out [Sq][Hq][D], lse [Sq][Hq] (lse may be null). Rows that
// see no key give out 0, lse -inf. Window as in KernelProblem.
void reference_attention(const float* q, const float* k, const float* v, std::int64_t Sq,
                         std::int64_t Skv, std::int64_t Hq, std::int64_t Hkv, std::int64_t D,
                         float scale, bool causal, double* out, double* lse,
                         std::int64_t window_left = -1, std::int64_t window_right = -1);

// First and last key a query may see (global positions); first > last when none. A negative window
// side is unbounded; written so that huge windows cannot overflow.
inline std::int64_t first_visible_key(std::int64_t query, std::int64_t q_total,
                                      std::int64_t kv_total, std::int64_t window_left) {
  const std::int64_t aligned = query + kv_total - q_total;
  if (window_left < 0 || aligned <= window_left) return 0;
  return aligned - window_left;
}
inline std::int64_t last_visible_key(std::int64_t query, std::int64_t q_total,
                                     std::int64_t kv_total, bool causal,
                                     std::int64_t window_right = -1) {
  const std::int64_t right = causal ? 0 : window_right;
  if (right < 0 || right >= q_total - query) return kv_total - 1;  // i' + right >= kv_total
  return query + kv_total - q_total + right;
}

}  // namespace uaa::detail
