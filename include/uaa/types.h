// uaa/types.h — element types and strided tensor views.
//
// Tensors are [tokens][heads][head_dim] with the head_dim axis contiguous and the two other strides
// given explicitly, in elements (not bytes). Token-major ([S][H][D], the layout projections produce)
// and head-major ([H][S][D]) are both expressible; `contiguous()` builds the token-major view.
//
//   std::vector<float> q(S_local * H * D);
//   uaa::ConstTensor qv = uaa::contiguous(q.data(), S_local, H, D);
#pragma once

#include <cstddef>
#include <cstdint>

namespace uaa {

enum class DType : std::uint8_t {
  f32 = 0,   // IEEE binary32
  bf16 = 1,  // bfloat16 storage, fp32 arithmetic (needs a kernel that supports it)
};

std::size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);

// Read-only view of a [tokens][heads][head_dim] tensor. With a batched plan (AttentionShape::batch
// B > 1) the view holds B such tensors, sequence b at data + b * batch_stride: [B][tokens][heads][D]
// and [tokens][B][heads][D] are both expressible.
struct ConstTensor {
  const void* data = nullptr;  // may be null only when tokens * heads == 0
  std::int64_t tokens = 0;
  std::int64_t heads = 0;
  std::int64_t head_dim = 0;
  std::int64_t token_stride = 0;  // elements between token t and t+1 (same head)
  std::int64_t head_stride = 0;   // elements between head h and h+1 (same token)
  DType dtype = DType::f32;
  std::int64_t batch_stride = 0;  // elements between sequence b and b+1 of a batched plan;
                                  // 0 means tokens * token_stride ([B][tokens][heads][D])
};

// Writable view of a [tokens][heads][head_dim] tensor; its rows must not overlap.
struct Tensor {
  void* data = nullptr;
  std::int64_t tokens = 0;
  std::int64_t heads = 0;
  std::int64_t head_dim = 0;
  std::int64_t token_stride = 0;
  std::int64_t head_stride = 0;
  DType dtype = DType::f32;
  std::int64_t batch_stride = 0;  // as ConstTensor's

  operator ConstTensor() const {
    return {data, tokens, heads, head_dim, token_stride, head_stride, dtype, batch_stride};
  }
};

inline ConstTensor contiguous(const void* data, std::int64_t tokens, std::int64_t heads,
                              std::int64_t head_dim, DType dtype = DType::f32) {
  return {data, tokens, heads, head_dim, heads * head_dim, head_dim, dtype};
}
inline Tensor contiguous(void* data, std::int64_t tokens, std::int64_t heads, std::int64_t head_dim,
                         DType dtype = DType::f32) {
  return {data, tokens, heads, head_dim, heads * head_dim, head_dim, dtype};
}

}  // namespace uaa
