// Float64-accumulating reference attention: the oracle every fast path is checked against.
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/kernel.h"

namespace uaa::detail {
namespace {

// One (head, query row) over its visible keys [first_key, last_key]: scores in double, exact max
// subtraction, double sums. `key(j)` / `val(j)` give pointers to key/value row j (global position).
template <typename KeyRow, typename ValRow>
void reference_row(const float* q, std::int64_t first_key, std::int64_t last_key, std::int64_t D,
                   double scale, KeyRow key, ValRow val, std::vector<double>& scores, double* out,
                   double* lse) {
  if (first_key > last_key) {
    for (std::int64_t d = 0; d < D; ++d) out[d] = 0.0;
    if (lse) *lse = -std::numeric_limits<double>::infinity();
    return;
  }
  const std::int64_t n = last_key - first_key + 1;
  scores.resize(n);
  double m = -std::numeric_limits<double>::infinity();
  for (std::int64_t j = 0; j < n; ++j) {
    const float* kr = key(first_key + j);
    double s = 0.0;
    for (std::int64_t d = 0; d < D; ++d) s += static_cast<double>(q[d]) * kr[d];
    scores[j] = s * scale;
    m = std::max(m, scores[j]);
  }
  double l = 0.0;
  for (std::int64_t d = 0; d < D; ++d) out[d] = 0.0;
  for (std::int64_t j = 0; j < n; ++j) {
    const double p = std::exp(scores[j] - m);
    l += p;
    const float* vr = val(first_key + j);
    for (std::int64_t d = 0; d < D; ++d) out[d] += p * vr[d];
  }
  for (std::int64_t d = 0; d < D; ++d) out[d] /= l;
  if (lse) *lse = m + std::log(l);
}

// Locates global token j inside a list of segments (segments are few; a linear walk is fine here).
struct SegmentIndex {
  std::vector<std::int64_t> start;
  explicit SegmentIndex(std::span<const TokenSegment> segs) {
    start.push_back(0);
    for (const auto& s : segs) start.push_back(start.back() + s.tokens);
  }
  std::size_t find(std::int64_t j) const {
    std::size_t s = 0;
    while (start[s + 1] <= j) ++s;
    return s;
  }
};

class ReferenceKernel final : public AttentionKernel {
 public:
  const char* name() const override { return "reference_f64"; }
  bool supports(DType dtype) const override { return dtype == DType::f32; }
  std::size_t scratch_bytes(const KernelProblem&) const override { return 0; }

  void run(const KernelProblem& p) const override {
    const std::int64_t D = p.head_dim;
    std::vector<const float*> krow(p.kv_total), vrow(p.kv_total);
    std::vector<double> scores, out(D);
    SegmentIndex kidx(p.k);
    for (std::int64_t h = 0; h < p.q_heads; ++h) {
      const std::int64_t kvh = (p.q_head_begin + h) / p.group - p.kv_head_begin;
      for (std::int64_t j = 0; j < p.kv_total; ++j) {
        const std::size_t s = kidx.find(j);
        const std::int64_t t = j - kidx.start[s];
        krow[j] = static_cast<const float*>(p.k[s].data) + t * p.k[s].token_stride +
                  kvh * p.k[s].head_stride;
        vrow[j] = static_cast<const float*>(p.v[s].data) + t * p.v[s].token_stride +
                  kvh * p.v[s].head_stride;
      }
      std::int64_t row0 = p.q_first;
      for (std::size_t s = 0; s < p.q.size(); ++s) {
        const TokenSegment& qs = p.q[s];
        const OutSegment& os = p.out[s];
        for (std::int64_t t = 0; t < qs.tokens; ++t) {
          const float* qr = static_cast<const float*>(qs.data) + t * qs.token_stride +
                            h * qs.head_stride;
          double lse = 0;
          const std::int64_t i = row0 + t;
          reference_row(qr, first_visible_key(i, p.q_total, p.kv_total, p.window_left),
                        last_visible_key(i, p.q_total, p.kv_total, p.causal, p.window_right), D,
                        p.scale, [&](std::int64_t j) { return krow[j]; },
                        [&](std::int64_t j) { return vrow[j]; }, scores, out.data(), &lse);
          float* o = static_cast<float*>(os.data) + t * os.token_stride + h * os.head_stride;
          for (std::int64_t d = 0; d < D; ++d) o[d] = static_cast<float>(out[d]);
          if (os.lse) os.lse[t * os.lse_token_stride + h] = static_cast<float>(lse);
        }
        row0 += qs.tokens;
      }
    }
  }
};

}  // namespace

const AttentionKernel& reference_kernel() {
  static const ReferenceKernel k;
  return k;
}

void reference_attention(const float* q, const float* k, const float* v, std::int64_t Sq,
                         std::int64_t Skv, std::int64_t Hq, std::int64_t Hkv, std::int64_t D,
                         float scale, bool causal, double* out, double* lse,
                         std::int64_t window_left, std::int64_t window_right) {
  const std::int64_t group = Hq / Hkv;
  std::vector<double> scores;
  for (std::int64_t h = 0; h < Hq; ++h) {
    const std::int64_t kvh = h / group;
    for (std::int64_t i = 0; i < Sq; ++i) {
      reference_row(
          q + (i * Hq + h) * D, first_visible_key(i, Sq, Skv, window_left),
          last_visible_key(i, Sq, Skv, causal, window_right), D, scale,
          [&](std::int64_t j) { return k + (j * Hkv + kvh) * D; },
          [&](std::int64_t j) { return v + (j * Hkv + kvh) * D; }, scores,
          out + (i * Hq + h) * D, lse ? lse + i * Hq + h : nullptr);
    }
  }
}

}  // namespace uaa::detail
