// What the two baseline-flag units that wrap the flash kernels share (flash_kernels.cpp for the
// forward, flash_backward_kernels.cpp for the backward): the ISA of a variant, scratch alignment,
// and the segment tables they build from the kernel interface. Never included by a per-ISA unit
// (flash_problem.h says why those see no shared inline code).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "kernels/cpu/flash_problem.h"
#include "kernels/kernel.h"

namespace uaa::detail::flash_glue {

enum class Isa { portable, avx2, avx512, avx512bf16 };

constexpr std::size_t align64(std::size_t n) { return (n + 63) & ~std::size_t{63}; }

// The variant multiplies bf16 pairs with vdpbf16ps (else it widens bf16 to fp32 when packing).
inline bool uses_bf16_pairs(Isa isa, DType dtype) {
  return isa == Isa::avx512bf16 && dtype == DType::bf16;
}

inline int threads_of(int threads) { return threads < 1 ? 1 : threads; }

// head_dim rounded up to whole vectors of the packed rows.
inline std::int64_t padded_dim(std::int64_t head_dim) {
  return (head_dim + flash::Traits::kPad - 1) / flash::Traits::kPad * flash::Traits::kPad;
}

// The key and value segment tables, keys numbered from 0 in segment order.
inline void key_tables(std::span<const TokenSegment> k, std::span<const TokenSegment> v,
                       flash::Segment* k_out, flash::Segment* v_out) {
  std::int64_t begin = 0;
  for (std::size_t i = 0; i < k.size(); ++i) {
    k_out[i] = {k[i].data, begin, k[i].tokens, k[i].token_stride, k[i].head_stride};
    v_out[i] = {v[i].data, begin, v[i].tokens, v[i].token_stride, v[i].head_stride};
    begin += k[i].tokens;
  }
}

}  // namespace uaa::detail::flash_glue
