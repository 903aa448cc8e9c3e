// Plain-data view of one attention call for the flash kernels (internal).
//
// The per-ISA translation units (flash_*.cpp, compiled with per-file -m flags) see only this header,
// <cstdint>/<cstddef> and intrinsics: no std templates and no inline functions shared with the rest
// of the library, so the linker can never pick an AVX-512 copy of a shared inline function for code
// that runs on a CPU without it. flash_kernels.cpp (baseline flags) builds this from KernelProblem,
// flash_backward_kernels.cpp builds BwdProblem (the backward's, flash_bwd_impl.h) from BackwardProblem.
#pragma once

#include <cstddef>
#include <cstdint>

namespace uaa::detail::flash {

// Tile sizes and layout constants, shared by every ISA so that all variants tile alike.
struct Traits {
  // Keys per tile. Key tiles start at global key positions that are multiples of kKeyTile: the
  // reduction order of a row depends on this constant only (the exactness contract). 64 keys are
  // 4 zmm / 8 ymm of scores; 128 measured no faster (the per-tile softmax is already ~5%).
  static constexpr std::int64_t kKeyTile = 64;
  // Query rows per work item (one thread, one head). Any value works for exactness; 48 keeps the
  // packed Q tile, the scores and the output accumulator (D = 128) inside L1 + L2.
  static constexpr std::int64_t kQueryTile = 48;
  // Packed rows are padded to this many floats (one zmm) so every microkernel runs whole vectors.
  static constexpr std::int64_t kPad = 16;
  static_assert(kKeyTile % 64 == 0, "score rows must be whole zmm/ymm/xmm groups");
  static_assert(kKeyTile % 2 == 0, "bf16 P·V packs key pairs");
  static_assert(kQueryTile >= 6, "microkernels block 6 rows");
  static_assert(kQueryTile % 2 == 0, "the bf16 backward pairs rows within a query tile");
};

struct Segment {
  const void* data;          // element [t][h][d] at data + t*token_stride + h*head_stride + d
  std::int64_t begin;        // global index of its first token
  std::int64_t tokens;
  std::int64_t token_stride;  // elements
  std::int64_t head_stride;   // elements
};

struct OutSegment {
  void* data;
  std::int64_t token_stride, head_stride;
  float* lse;  // may be null
  std::int64_t lse_token_stride;
};

// Byte offsets into the scratch buffer (all 64-byte aligned).
struct ScratchLayout {
  std::size_t k_packed = 0, v_packed = 0;  // one kv head: all key tiles
  std::size_t k_tile_bytes = 0, v_tile_bytes = 0;
  std::size_t v_bad = 0;                   // one byte per key tile: its V holds Inf/NaN
  std::size_t per_thread = 0;              // start of thread 0's block
  std::size_t thread_stride = 0;           // bytes per thread block
  std::size_t q_tile = 0, scores = 0, p_bf16 = 0, acc = 0, row_max = 0, row_sum = 0, alpha = 0;
  std::size_t total = 0;
};

struct Problem {
  bool bf16 = false;  // element type of q, k, v and out (else fp32)
  std::int64_t head_dim = 0, padded_dim = 0;  // padded_dim: head_dim rounded up to Traits::kPad
  std::int64_t q_heads = 0, q_head_begin = 0, kv_head_begin = 0, group = 1;
  const Segment* q = nullptr;
  const Segment* k = nullptr;
  const Segment* v = nullptr;
  const OutSegment* out = nullptr;
  std::int64_t q_segments = 0, kv_segments = 0;
  std::int64_t q_first = 0, q_count = 0;  // the rows handed over: [q_first, q_first + q_count)
  std::int64_t q_total = 0, kv_total = 0;  // global counts
  float scale = 1.0f;
  bool causal = false;
  std::int64_t window_left = -1, window_right = -1;  // as KernelProblem (negative: unbounded)
  int threads = 1;
  char* scratch = nullptr;
  ScratchLayout layout;
};

// ---- Backward (flash_bwd_impl.h) -----------------------------------------------------------

// Per-(row, head) statistics of a query segment: element [t][h] at data + t*token_stride + h.
struct StatSegment {
  const float* data;
  std::int64_t token_stride;  // floats
};

// Byte offsets into the backward's scratch buffer (all 64-byte aligned). Query rows are indexed
// from q_first (row i at i - q_first), query tiles from floor(q_first / kQueryTile).
struct BwdScratchLayout {
  // One kv head, every key tile t at t * kv_tile_bytes: Kᵀ and Vᵀ (for S = Q·Kᵀ and dP = dO·Vᵀ:
  // fp32 [D][kKeyTile], or bf16 pairs of head dims [ceil(D/2)][kKeyTile][2]) and K rows (for
  // dQ = dS·K: fp32 [kKeyTile][Dp], or bf16 key pairs [kKeyTile/2][Dp][2]); zero past kv_total.
  std::size_t kv_packed = 0, kv_tile_bytes = 0;
  std::size_t kt_off = 0, vt_off = 0, krow_off = 0;  // within one tile's block
  // One q head, all rows of the step: Q and dO [rows][Dp] fp32 (fp32 products only; else 0 bytes),
  // lse·log2(e) and delta [rows], the fp32 dQ accumulator [rows][Dp], one 64-byte ticket per query
  // tile.
  std::size_t q_rows = 0, do_rows = 0, lse2 = 0, delta = 0, dq_acc = 0, tickets = 0;
  // run_bwd_avx512bf16 with bf16 inputs only (else 0 bytes): Q and dO as bf16 pairs of head dims
  // [rows][ceil(D/2)][2] (for S and dP), and as bf16 pairs of rows, per local query tile u at
  // u·kQueryTile·Dp elements, [kQueryTile/2][Dp][2] with row pair f = rows 2f, 2f + 1 counted from
  // the tile's first row of the step (for dK = dSᵀ·Q and dV = Pᵀ·dO; rows past the step are 0).
  std::size_t q_pairs = 0, do_pairs = 0, q_rowpairs = 0, do_rowpairs = 0;
  std::size_t per_thread = 0;     // start of thread 0's block
  std::size_t thread_stride = 0;  // bytes per thread block
  // Per thread: P (scores, then probabilities) and dP (then dS) [kQueryTile][kKeyTile] fp32; dK and
  // dV accumulators of one key tile [kKeyTile][Dp]. bf16 products only (else 0 bytes): P and dS
  // rounded to bf16 as row pairs [kQueryTile/2][kKeyTile][2] (for dV and dK), and dS rounded to
  // bf16 [kQueryTile][kKeyTile] (key pairs, for dQ).
  std::size_t p = 0, ds = 0, dk_acc = 0, dv_acc = 0;
  std::size_t p_rowpairs = 0, ds_rowpairs = 0, ds_bf16 = 0;
  std::size_t total = 0;
};

struct BwdProblem {
  bool bf16 = false;  // element type of q, dout, k, v and dq (else fp32)
  std::int64_t head_dim = 0, padded_dim = 0;
  std::int64_t q_heads = 0, q_head_begin = 0, kv_head_begin = 0, group = 1;
  const Segment* q = nullptr;     // q_segments each: q, dout, lse, delta, dq
  const Segment* dout = nullptr;  // (dout[s].begin == q[s].begin)
  const StatSegment* lse = nullptr;
  const StatSegment* delta = nullptr;
  const OutSegment* dq = nullptr;  // lse fields unused
  const Segment* k = nullptr;      // kv_segments each: k, v
  const Segment* v = nullptr;
  std::int64_t q_segments = 0, kv_segments = 0;
  std::int64_t q_first = 0, q_count = 0;   // the rows handed over: [q_first, q_first + q_count)
  std::int64_t q_total = 0, kv_total = 0;  // global counts
  float scale = 1.0f;
  bool causal = false;
  std::int64_t window_left = -1, window_right = -1;  // as BackwardProblem (negative: unbounded)
  int threads = 1;
  char* scratch = nullptr;
  BwdScratchLayout layout;
  float* dk_partial = nullptr;  // [q_heads][kv_total][head_dim], heads partial_head_stride apart
  float* dv_partial = nullptr;
  std::int64_t partial_head_stride = 0;  // floats (never 0 here: the wrapper resolves the default)
  const float* dk_carry = nullptr;  // [kv_total][head_dim] or null (local head 0 only)
  const float* dv_carry = nullptr;
  bool ordered_dq = true;  // false: dQ contributions in arrival order (benchmarks only)
};

// Entry points, one per ISA translation unit.
void run_portable(const Problem& p);
void run_avx2(const Problem& p);
void run_avx512(const Problem& p);
void run_avx512bf16(const Problem& p);  // bf16 via vdpbf16ps; needs bf16-pair packing (see layout)

void run_bwd_portable(const BwdProblem& p);
void run_bwd_avx2(const BwdProblem& p);
void run_bwd_avx512(const BwdProblem& p);
void run_bwd_avx512bf16(const BwdProblem& p);

}  // namespace uaa::detail::flash
