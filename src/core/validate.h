// Argument checks shared by forward() and backward() (internal): a view's extent without
// overflow, its agreement with the plan, and whether its rows overlap.
#pragma once

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <string>
#include <utility>

#include "common/strings.h"
#include "uaa/plan.h"
#include "uaa/types.h"

namespace uaa::detail {

// Byte range [lo, hi) spanned by a strided view (empty if it has no rows), computed without
// overflow: `valid` is false when the view's extent does not fit the address space.
struct Extent {
  std::uintptr_t lo = 0, hi = 0;
  bool valid = true;
  bool empty() const { return lo == hi; }
  bool overlaps(const Extent& o) const { return !empty() && !o.empty() && lo < o.hi && o.lo < hi; }
};

inline Extent extent_of(const void* data, std::int64_t tokens, std::int64_t heads, std::int64_t dim,
                 std::int64_t ts, std::int64_t hs, std::size_t es, std::int64_t batch = 1,
                 std::int64_t bs = 0) {
  if (tokens == 0 || heads == 0 || dim == 0 || batch == 0) return {};
  const __int128 last = (static_cast<__int128>(batch) - 1) * bs +
                        (static_cast<__int128>(tokens) - 1) * ts +
                        (static_cast<__int128>(heads) - 1) * hs + dim;
  const __int128 bytes = last * static_cast<__int128>(es);
  const auto lo = reinterpret_cast<std::uintptr_t>(data);
  if (bytes > (static_cast<__int128>(1) << 62) ||
      static_cast<__int128>(lo) + bytes > static_cast<__int128>(UINTPTR_MAX))
    return {lo, lo, false};
  return {lo, lo + static_cast<std::uintptr_t>(bytes), true};
}

// A view's stride between the sequences of a batch (ConstTensor::batch_stride; 0: dense).
inline std::int64_t batch_stride_of(const ConstTensor& t) {
  return t.batch_stride != 0 ? t.batch_stride : t.tokens * t.token_stride;
}

// "(token stride, head stride)", with ", batch <stride>" for a batched plan.
inline std::string strides_str(const ConstTensor& t, std::int64_t batch) {
  return batch > 1 ? cat("(", t.token_stride, ", ", t.head_stride, ", batch ", batch_stride_of(t), ")")
                   : cat("(", t.token_stride, ", ", t.head_stride, ")");
}

// Checks one tensor argument against what the plan expects; returns the problem or "".
inline std::string view_problem(const char* name, const ConstTensor& t, std::int64_t tokens,
                         std::int64_t heads, const AttentionShape& s) {
  if (t.dtype != s.dtype)
    return cat(name, ".dtype ", dtype_name(t.dtype), " but the plan has ", dtype_name(s.dtype));
  if (t.tokens != tokens)
    return cat(name, ".tokens ", t.tokens, " but the plan gives this rank ", tokens);
  if (t.heads != heads) return cat(name, ".heads ", t.heads, " but the plan has ", heads);
  if (t.head_dim != s.head_dim)
    return cat(name, ".head_dim ", t.head_dim, " but the plan has ", s.head_dim);
  if (t.token_stride < 0 || t.head_stride < 0)
    return cat(name, " strides (", t.token_stride, ", ", t.head_stride, ") must be >= 0");
  if (t.batch_stride < 0) return cat(name, ".batch_stride ", t.batch_stride, " must be >= 0");
  if (t.batch_stride != 0 && s.batch == 1)
    return cat(name, ".batch_stride ", t.batch_stride, " is set but the plan has no batch");
  if (t.data == nullptr && tokens * heads > 0) return cat(name, ".data is null");
  if (!extent_of(t.data, tokens, heads, s.head_dim, t.token_stride, t.head_stride,
                 dtype_size(s.dtype), s.batch, batch_stride_of(t)).valid)
    return cat(name, " strides ", strides_str(t, s.batch), " over ", tokens, " tokens and ", heads,
               " heads", s.batch > 1 ? cat(" of ", s.batch, " sequences") : std::string(),
               " reach past the address space");
  return {};
}

// True if the rows of a [batch][tokens][heads][dim] view with these strides are pairwise disjoint
// (checked as nested axes: sorted by stride, each at least the extent of the ones inside it).
inline bool rows_disjoint(std::int64_t tokens, std::int64_t heads, std::int64_t dim, std::int64_t ts,
                   std::int64_t hs, std::int64_t batch = 1, std::int64_t bs = 0) {
  if (tokens == 0 || heads == 0 || batch == 0) return true;  // no rows, nothing to overlap
  struct Axis {
    __int128 stride, count;
  };
  Axis axes[3] = {{ts, tokens}, {hs, heads}, {bs, batch}};
  for (Axis& x : axes)
    if (x.count <= 1) x.stride = 0;
  std::sort(std::begin(axes), std::end(axes),
            [](const Axis& a, const Axis& b) { return a.stride < b.stride; });
  __int128 span = dim;  // elements covered by one row
  for (const Axis& x : axes) {
    if (x.count <= 1) continue;
    if (x.stride < span) return false;
    span = (x.count - 1) * x.stride + span;
  }
  return true;
}
inline bool rows_disjoint(const ConstTensor& t, std::int64_t batch) {
  return rows_disjoint(t.tokens, t.heads, t.head_dim, t.token_stride, t.head_stride, batch,
                       batch_stride_of(t));
}

// Checks an lse array of `tokens` x `heads` floats whose token stride is `given` (0 means heads);
// returns the problem or "" and, when fine, the array's extent in *extent.
// Batched plans: `batch` sequences `given_bs` apart (0: tokens x the token stride).
inline std::string lse_problem(const float* lse, std::int64_t given, std::int64_t tokens,
                               std::int64_t heads, Extent* extent, std::int64_t batch = 1,
                               std::int64_t given_bs = 0) {
  const std::int64_t ts = given == 0 ? heads : given;
  if (ts < 0) return cat("lse_token_stride ", given, " is negative");
  if (tokens > 1 && ts < heads)
    return cat("lse_token_stride ", given, " is smaller than q_heads ", heads);
  if (given_bs < 0) return cat("lse_batch_stride ", given_bs, " is negative");
  const std::int64_t bs = given_bs == 0 ? tokens * ts : given_bs;
  if (!rows_disjoint(tokens, heads, 1, ts, 1, batch, bs))
    return cat("lse strides (", ts, ", batch ", bs, ") make lse rows of different sequences overlap");
  *extent = lse ? extent_of(lse, tokens, heads, 1, ts, 1, sizeof(float), batch, bs) : Extent{};
  if (!extent->valid) return cat("lse_token_stride ", ts, " reaches past the address space");
  return {};
}

// The extent of a tensor view (of its own shape) over `batch` sequences.
inline Extent extent_of(const ConstTensor& t, std::int64_t batch = 1) {
  return extent_of(t.data, t.tokens, t.heads, t.head_dim, t.token_stride, t.head_stride,
                   dtype_size(t.dtype), batch, batch_stride_of(t));
}

}  // namespace uaa::detail
