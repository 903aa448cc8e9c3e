// Attention problems for multi-rank tests: the whole (small) problem is a formula of the seed
// (tests/common/test_data.h), so every rank can build its own shard, run the whole problem alone, and
// compute references for its own rows.
//
// Buffers mimic a caller's: rows sit where the chosen layout puts them, every other element holds a
// fill value (NaN in inputs, so a read of padding poisons the result; a sentinel in outputs, so a
// stray write is seen). Elements are f32 or bf16 (shape.dtype); bf16 problems draw their inputs as
// bf16 values, so the float64 reference sees exactly what the library sees.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "uaa/attention.h"
#include "uaa/communicator.h"
#include "uaa/plan.h"

namespace uaa::test {

struct Problem {
  AttentionShape shape;  // as the caller passes it (kv_heads / scale may be 0)
  std::vector<std::int64_t> q_lens, kv_lens;
  std::uint64_t seed = 0;
  std::vector<float> q, k, v;  // whole problem, contiguous [tokens][heads][dim], dtype-exact values

  std::int64_t hq() const { return shape.q_heads; }
  std::int64_t hkv() const { return shape.kv_heads == 0 ? shape.q_heads : shape.kv_heads; }
  std::int64_t dim() const { return shape.head_dim; }
  float scale() const;  // the effective softmax scale
  std::int64_t q_total() const;
  std::int64_t kv_total() const;
  std::int64_t q_first(int rank) const;   // global index of rank's first query token
  std::int64_t kv_first(int rank) const;
  std::string str() const;
};

Problem make_problem(const AttentionShape& shape, std::vector<std::int64_t> q_lens,
                     std::vector<std::int64_t> kv_lens, std::uint64_t seed);

// Where the rows of a [tokens][heads][dim] tensor live in the caller's buffer.
enum class Layout {
  contiguous,         // [T][H][D]
  head_major,         // [H][T][D]
  padded,             // [T][H][D] with gaps between heads and between tokens
  head_major_padded,  // [H][T][D] with gaps between tokens and between heads
};

// (bf16 <-> f32 conversion: uaa/bf16.h.)
float round_to(DType dtype, float f);  // the nearest value of `dtype`

// Fill patterns (raw bits of one element): a NaN for inputs, a distinctive NaN for outputs.
enum class Fill { input_nan, output_sentinel };

struct StridedBuffer {
  DType dtype = DType::f32;
  std::vector<std::uint32_t> raw;    // f32 elements (bits), when dtype is f32
  std::vector<std::uint16_t> raw16;  // bf16 elements (bits), when dtype is bf16
  std::int64_t tokens = 0, heads = 0, dim = 0, token_stride = 0, head_stride = 0;
  std::uint32_t fill_bits = 0;

  std::int64_t size() const;
  void* data();  // null when the buffer is empty, as a caller with no tokens may pass
  const void* data() const;
  float get(std::int64_t i) const;
  void set(std::int64_t i, float v);  // v must be a value of dtype
  ConstTensor cview() const;
  Tensor view();
  std::vector<float> dense() const;  // rows gathered into [tokens][heads][dim]
  // True if every element that belongs to no row still holds exactly its fill bits.
  bool gaps_hold() const;
  // Element-for-element bit equality of the whole buffer (rows and gaps).
  bool same_bits_as(const StridedBuffer& o) const { return raw == o.raw && raw16 == o.raw16; }
};

StridedBuffer make_buffer(DType dtype, Layout layout, std::int64_t tokens, std::int64_t heads,
                          std::int64_t dim, Fill fill);
void write_rows(StridedBuffer& b, const float* dense);

// The lse sentinel (lse is always f32).
float output_sentinel();
bool same_bits(float a, float b);

struct Layouts {
  Layout q = Layout::contiguous, k = Layout::contiguous, v = Layout::contiguous,
         out = Layout::contiguous;
  std::int64_t lse_pad = 0;  // extra elements between tokens in lse (0: lse_token_stride = 0)
};

struct RunResult {
  std::vector<float> out;  // [q_tokens][Hq][D]
  std::vector<float> lse;  // [q_tokens][Hq] when the plan returns it
  bool out_gaps_intact = true, lse_gaps_intact = true;
};

// This rank's caller-style buffers for one forward() call.
struct CallBuffers {
  StridedBuffer q, k, v, out;
  std::vector<float> lse;
  std::int64_t lse_stride = 0;  // as passed in AttentionArgs
  AttentionArgs args();
  RunResult result(bool with_lse) const;
};

CallBuffers make_call_buffers(const Problem& pb, int rank, const Layouts& layouts, bool with_lse);

// forward() on this rank's shard, over the plan's communicator. Throws what forward() throws.
RunResult run_shard(const Plan& plan, const Problem& pb, const Layouts& layouts, Workspace& ws);
// The whole problem through the library on a one-rank communicator, contiguous buffers.
RunResult run_whole(Communicator& self, const Problem& pb, Workspace& ws);

// Float64 reference and a plain fp32 implementation for global query rows [first, first + n):
// out [n][Hq][D], lse [n][Hq].
void reference_rows(const Problem& pb, std::int64_t first, std::int64_t n, std::vector<double>& out,
                    std::vector<double>& lse);
void plain_fp32_rows(const Problem& pb, std::int64_t first, std::int64_t n, std::vector<float>& out,
                     std::vector<float>& lse);

}  // namespace uaa::test
