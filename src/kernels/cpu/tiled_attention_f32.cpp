// Portable tiled attention, fp32, online softmax (FlashAttention-style, one query row at a time).
//
// Correct for every head dim and length; fast kernels (SIMD microkernels, threads) replace it as the
// default but it stays as the readable fallback. Key tiles start at multiples of kKeyTile in *global*
// key position and each row's arithmetic depends only on its own data, which is what makes the
// result independent of how tokens and heads are split over ranks.
#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/kernel.h"

namespace uaa::detail {
namespace {

constexpr std::int64_t kKeyTile = 64;

// Dot product with eight independent partial sums in a fixed order: vectorizable, deterministic.
inline float dot(const float* a, const float* b, std::int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    for (int u = 0; u < 8; ++u) acc[u] += a[d + u] * b[d + u];
  for (int u = 0; d < n; ++d, ++u) acc[u] += a[d] * b[d];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

struct Scratch {
  const float** krow;
  const float** vrow;
  float* scores;  // kKeyTile
  float* acc;     // head_dim
};

Scratch carve(const KernelProblem& p) {
  auto* base = static_cast<char*>(p.scratch);
  Scratch s;
  s.krow = reinterpret_cast<const float**>(base);
  s.vrow = s.krow + p.kv_total;
  s.scores = reinterpret_cast<float*>(s.vrow + p.kv_total);
  s.acc = s.scores + kKeyTile;
  return s;
}

// Keys [first_key, last_key] of the row, in the global key tiles they meet.
void attend_row(const float* q, std::int64_t first_key, std::int64_t last_key, std::int64_t D,
                float scale, const Scratch& s, float* out, float* lse) {
  if (first_key > last_key) {
    std::fill(out, out + D, 0.0f);
    if (lse) *lse = -std::numeric_limits<float>::infinity();
    return;
  }
  float m = -std::numeric_limits<float>::infinity(), l = 0.0f;
  float* acc = s.acc;
  std::fill(acc, acc + D, 0.0f);
  for (std::int64_t t0 = first_key / kKeyTile * kKeyTile; t0 <= last_key; t0 += kKeyTile) {
    const std::int64_t c0 = std::max<std::int64_t>(first_key - t0, 0);
    const std::int64_t n = std::min(kKeyTile, last_key + 1 - t0);
    float tile_max = -std::numeric_limits<float>::infinity();
    for (std::int64_t c = c0; c < n; ++c) {
      s.scores[c] = dot(q, s.krow[t0 + c], D) * scale;
      tile_max = std::max(tile_max, s.scores[c]);
    }
    const float m_new = std::max(m, tile_max);
    const float alpha = std::exp(m - m_new);
    float sum = 0.0f;
    for (std::int64_t c = c0; c < n; ++c) {
      s.scores[c] = std::exp(s.scores[c] - m_new);
      sum += s.scores[c];
    }
    l = l * alpha + sum;
    for (std::int64_t d = 0; d < D; ++d) acc[d] *= alpha;
    for (std::int64_t c = c0; c < n; ++c) {
      const float pc = s.scores[c];
      const float* vr = s.vrow[t0 + c];
      for (std::int64_t d = 0; d < D; ++d) acc[d] += pc * vr[d];
    }
    m = m_new;
  }
  for (std::int64_t d = 0; d < D; ++d) out[d] = acc[d] / l;
  if (lse) *lse = m + std::log(l);
}

class TiledF32Kernel final : public AttentionKernel {
 public:
  const char* name() const override { return "tiled_f32_portable"; }
  bool supports(DType dtype) const override { return dtype == DType::f32; }
  std::size_t scratch_bytes(const KernelProblem& p) const override {
    return static_cast<std::size_t>(2 * p.kv_total) * sizeof(const float*) +
           static_cast<std::size_t>(kKeyTile + p.head_dim) * sizeof(float);
  }

  void run(const KernelProblem& p) const override {
    const Scratch s = carve(p);
    for (std::int64_t h = 0; h < p.q_heads; ++h) {
      // Row pointers of this head's keys and values, in global order across segments.
      const std::int64_t kvh = (p.q_head_begin + h) / p.group - p.kv_head_begin;
      std::int64_t j = 0;
      for (std::size_t seg = 0; seg < p.k.size(); ++seg) {
        if (p.k[seg].tokens == 0) continue;  // its data may be null
        const auto* kb = static_cast<const float*>(p.k[seg].data) + kvh * p.k[seg].head_stride;
        const auto* vb = static_cast<const float*>(p.v[seg].data) + kvh * p.v[seg].head_stride;
        for (std::int64_t t = 0; t < p.k[seg].tokens; ++t, ++j) {
          s.krow[j] = kb + t * p.k[seg].token_stride;
          s.vrow[j] = vb + t * p.v[seg].token_stride;
        }
      }
      std::int64_t row0 = p.q_first;
      for (std::size_t seg = 0; seg < p.q.size(); ++seg) {
        const TokenSegment& qs = p.q[seg];
        const OutSegment& os = p.out[seg];
        for (std::int64_t t = 0; t < qs.tokens; ++t) {
          const float* qr = static_cast<const float*>(qs.data) + t * qs.token_stride +
                            h * qs.head_stride;
          float* o = static_cast<float*>(os.data) + t * os.token_stride + h * os.head_stride;
          const std::int64_t i = row0 + t;
          attend_row(qr, first_visible_key(i, p.q_total, p.kv_total, p.window_left),
                     last_visible_key(i, p.q_total, p.kv_total, p.causal, p.window_right), p.head_dim,
                     p.scale, s, o, os.lse ? os.lse + t * os.lse_token_stride + h : nullptr);
        }
        row0 += qs.tokens;
      }
    }
  }
};

}  // namespace

const AttentionKernel& tiled_f32_kernel() {
  static const TiledF32Kernel k;
  return k;
}

}  // namespace uaa::detail
