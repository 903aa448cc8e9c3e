#include "uaa/bf16.h"
#include "attention_harness.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>

#include "common/test_data.h"
#include "kernels/kernel.h"

namespace uaa::test {

namespace {
std::int64_t sum(const std::vector<std::int64_t>& v, std::size_t n) {
  std::int64_t s = 0;
  for (std::size_t i = 0; i < n && i < v.size(); ++i) s += v[i];
  return s;
}
}  // namespace

float Problem::scale() const {
  // The same expression the library uses to normalize a scale of 0.
  return shape.scale == 0.0f ? 1.0f / std::sqrt(static_cast<float>(shape.head_dim)) : shape.scale;
}
std::int64_t Problem::q_total() const { return sum(q_lens, q_lens.size()); }
std::int64_t Problem::kv_total() const { return sum(kv_lens, kv_lens.size()); }
std::int64_t Problem::q_first(int rank) const { return sum(q_lens, rank); }
std::int64_t Problem::kv_first(int rank) const { return sum(kv_lens, rank); }

std::string Problem::str() const {
  std::ostringstream os;
  os << "q_lens [";
  for (std::size_t i = 0; i < q_lens.size(); ++i) os << (i ? "," : "") << q_lens[i];
  os << "] kv_lens [";
  for (std::size_t i = 0; i < kv_lens.size(); ++i) os << (i ? "," : "") << kv_lens[i];
  os << "] heads " << hq() << "/" << hkv() << " dim " << dim() << (shape.causal ? " causal" : "")
     << (shape.return_lse ? " lse" : "") << " " << dtype_name(shape.dtype) << " scale " << scale() << " seed " << seed;
  return os.str();
}

Problem make_problem(const AttentionShape& shape, std::vector<std::int64_t> q_lens,
                     std::vector<std::int64_t> kv_lens, std::uint64_t seed) {
  Problem pb;
  pb.shape = shape;
  pb.q_lens = std::move(q_lens);
  pb.kv_lens = std::move(kv_lens);
  pb.seed = seed;
  pb.q = make_tensor(seed, 0, 0, pb.q_total(), pb.hq(), pb.dim());
  pb.k = make_tensor(seed, 1, 0, pb.kv_total(), pb.hkv(), pb.dim());
  pb.v = make_tensor(seed, 2, 0, pb.kv_total(), pb.hkv(), pb.dim());
  for (auto* t : {&pb.q, &pb.k, &pb.v})
    for (float& x : *t) x = round_to(shape.dtype, x);
  return pb;
}



float round_to(DType dtype, float f) { return dtype == DType::bf16 ? uaa::f32_from_bf16(uaa::bf16_from_f32(f)) : f; }

namespace {
constexpr std::uint32_t kF32InputNan = 0x7fc00000u, kF32Sentinel = 0x7fc0beefu;
constexpr std::uint16_t kBf16InputNan = 0x7fc0u, kBf16Sentinel = 0x7fbeu;  // both NaNs
}  // namespace

float output_sentinel() {
  float f;
  std::memcpy(&f, &kF32Sentinel, sizeof f);
  return f;
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

std::int64_t StridedBuffer::size() const {
  return static_cast<std::int64_t>(dtype == DType::bf16 ? raw16.size() : raw.size());
}

void* StridedBuffer::data() {
  if (size() == 0) return nullptr;
  return dtype == DType::bf16 ? static_cast<void*>(raw16.data()) : static_cast<void*>(raw.data());
}

const void* StridedBuffer::data() const { return const_cast<StridedBuffer*>(this)->data(); }

float StridedBuffer::get(std::int64_t i) const {
  if (dtype == DType::bf16) return uaa::f32_from_bf16(raw16[i]);
  float f;
  std::memcpy(&f, &raw[i], sizeof f);
  return f;
}

void StridedBuffer::set(std::int64_t i, float v) {
  if (dtype == DType::bf16)
    raw16[i] = uaa::bf16_from_f32(v);
  else
    std::memcpy(&raw[i], &v, sizeof v);
}

ConstTensor StridedBuffer::cview() const {
  return {data(), tokens, heads, dim, token_stride, head_stride, dtype};
}

Tensor StridedBuffer::view() { return {data(), tokens, heads, dim, token_stride, head_stride, dtype}; }

std::vector<float> StridedBuffer::dense() const {
  std::vector<float> out(static_cast<std::size_t>(tokens * heads * dim));
  std::size_t i = 0;
  for (std::int64_t t = 0; t < tokens; ++t)
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t d = 0; d < dim; ++d) out[i++] = get(t * token_stride + h * head_stride + d);
  return out;
}

bool StridedBuffer::gaps_hold() const {
  std::vector<char> is_row(static_cast<std::size_t>(size()), 0);
  for (std::int64_t t = 0; t < tokens; ++t)
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t d = 0; d < dim; ++d) is_row[t * token_stride + h * head_stride + d] = 1;
  for (std::int64_t i = 0; i < size(); ++i) {
    if (is_row[i]) continue;
    const std::uint32_t bits = dtype == DType::bf16 ? raw16[i] : raw[i];
    if (bits != fill_bits) return false;
  }
  return true;
}

StridedBuffer make_buffer(DType dtype, Layout layout, std::int64_t tokens, std::int64_t heads,
                          std::int64_t dim, Fill fill) {
  StridedBuffer b;
  b.dtype = dtype;
  b.tokens = tokens;
  b.heads = heads;
  b.dim = dim;
  std::int64_t size = 0;
  switch (layout) {
    case Layout::contiguous:
      b.token_stride = heads * dim;
      b.head_stride = dim;
      size = tokens * heads * dim;
      break;
    case Layout::head_major:
      b.token_stride = dim;
      b.head_stride = tokens * dim;
      size = heads * tokens * dim;
      break;
    case Layout::padded:
      b.head_stride = dim + 3;
      b.token_stride = heads * (dim + 3) + 5;
      size = tokens * b.token_stride;
      break;
    case Layout::head_major_padded:
      b.token_stride = dim + 2;
      b.head_stride = tokens * (dim + 2) + 7;
      size = tokens > 0 ? heads * b.head_stride : 0;
      break;
  }
  const bool in = fill == Fill::input_nan;
  if (dtype == DType::bf16) {
    b.fill_bits = in ? kBf16InputNan : kBf16Sentinel;
    b.raw16.assign(static_cast<std::size_t>(size), static_cast<std::uint16_t>(b.fill_bits));
  } else {
    b.fill_bits = in ? kF32InputNan : kF32Sentinel;
    b.raw.assign(static_cast<std::size_t>(size), b.fill_bits);
  }
  return b;
}

void write_rows(StridedBuffer& b, const float* dense) {
  std::size_t i = 0;
  for (std::int64_t t = 0; t < b.tokens; ++t)
    for (std::int64_t h = 0; h < b.heads; ++h)
      for (std::int64_t d = 0; d < b.dim; ++d) b.set(t * b.token_stride + h * b.head_stride + d, dense[i++]);
}

AttentionArgs CallBuffers::args() {
  AttentionArgs a;
  a.q = q.cview();
  a.k = k.cview();
  a.v = v.cview();
  a.out = out.view();
  a.lse = lse.empty() ? nullptr : lse.data();
  a.lse_token_stride = lse_stride;
  return a;
}

RunResult CallBuffers::result(bool with_lse) const {
  RunResult r;
  r.out = out.dense();
  r.out_gaps_intact = out.gaps_hold();
  if (with_lse) {
    const std::int64_t hq = out.heads, ts = lse_stride == 0 ? hq : lse_stride;
    for (std::int64_t t = 0; t < out.tokens; ++t) {
      for (std::int64_t h = 0; h < hq; ++h) r.lse.push_back(lse[t * ts + h]);
      for (std::int64_t h = hq; h < ts; ++h)
        r.lse_gaps_intact = r.lse_gaps_intact && same_bits(lse[t * ts + h], output_sentinel());
    }
  }
  return r;
}

CallBuffers make_call_buffers(const Problem& pb, int rank, const Layouts& layouts, bool with_lse) {
  const std::int64_t D = pb.dim(), hq = pb.hq(), hkv = pb.hkv();
  const std::int64_t nq = pb.q_lens[rank], nkv = pb.kv_lens[rank];
  const std::int64_t q0 = pb.q_first(rank), kv0 = pb.kv_first(rank);
  const DType dt = pb.shape.dtype;
  CallBuffers c;
  c.q = make_buffer(dt, layouts.q, nq, hq, D, Fill::input_nan);
  c.k = make_buffer(dt, layouts.k, nkv, hkv, D, Fill::input_nan);
  c.v = make_buffer(dt, layouts.v, nkv, hkv, D, Fill::input_nan);
  write_rows(c.q, pb.q.data() + q0 * hq * D);
  write_rows(c.k, pb.k.data() + kv0 * hkv * D);
  write_rows(c.v, pb.v.data() + kv0 * hkv * D);
  c.out = make_buffer(dt, layouts.out, nq, hq, D, Fill::output_sentinel);
  if (with_lse) {
    c.lse_stride = layouts.lse_pad == 0 ? 0 : hq + layouts.lse_pad;
    c.lse.assign(static_cast<std::size_t>(nq * (hq + layouts.lse_pad)), output_sentinel());
  }
  return c;
}

RunResult run_shard(const Plan& plan, const Problem& pb, const Layouts& layouts, Workspace& ws) {
  CallBuffers c = make_call_buffers(pb, plan.rank(), layouts, plan.shape().return_lse);
  forward(plan, c.args(), ws);
  return c.result(plan.shape().return_lse);
}

RunResult run_whole(Communicator& self, const Problem& pb, Workspace& ws) {
  const Plan plan = Plan::from_lengths(self, pb.shape, {pb.q_total()}, {pb.kv_total()});
  Problem whole = pb;
  whole.q_lens = {pb.q_total()};
  whole.kv_lens = {pb.kv_total()};
  return run_shard(plan, whole, Layouts{}, ws);
}

void reference_rows(const Problem& pb, std::int64_t first, std::int64_t n, std::vector<double>& out,
                    std::vector<double>& lse) {
  const std::int64_t D = pb.dim(), hq = pb.hq(), hkv = pb.hkv();
  out.assign(static_cast<std::size_t>(n * hq * D), 0.0);
  lse.assign(static_cast<std::size_t>(n * hq), 0.0);
  if (n == 0) return;
  // reference_attention aligns the causal mask to the end of the key range it is given: cutting the
  // keys at first + n + (kv_total - q_total) gives rows [first, first + n) their global diagonal
  // (keys past the cut are invisible to all of these rows anyway).
  std::int64_t keys = pb.kv_total();
  if (pb.shape.causal) keys = std::clamp(first + n + pb.kv_total() - pb.q_total(), std::int64_t{0}, keys);
  detail::reference_attention(pb.q.data() + first * hq * D, pb.k.data(), pb.v.data(), n, keys, hq,
                              hkv, D, pb.scale(), pb.shape.causal, out.data(), lse.data());
}

// Textbook two-pass softmax in fp32 with sequential sums: the yardstick for what fp32 costs.
void plain_fp32_rows(const Problem& pb, std::int64_t first, std::int64_t n, std::vector<float>& out,
                     std::vector<float>& lse) {
  const std::int64_t D = pb.dim(), hq = pb.hq(), hkv = pb.hkv(), group = hq / hkv;
  const float scale = pb.scale();
  out.assign(static_cast<std::size_t>(n * hq * D), 0.0f);
  lse.assign(static_cast<std::size_t>(n * hq), 0.0f);
  std::vector<float> s(static_cast<std::size_t>(pb.kv_total()));
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t gi = first + i;
    const std::int64_t last = detail::last_visible_key(gi, pb.q_total(), pb.kv_total(), pb.shape.causal);
    for (std::int64_t h = 0; h < hq; ++h) {
      float* o = out.data() + (i * hq + h) * D;
      if (last < 0) {
        lse[i * hq + h] = -std::numeric_limits<float>::infinity();
        continue;
      }
      const float* q = pb.q.data() + (gi * hq + h) * D;
      const std::int64_t kvh = h / group;
      float m = -std::numeric_limits<float>::infinity();
      for (std::int64_t j = 0; j <= last; ++j) {
        const float* k = pb.k.data() + (j * hkv + kvh) * D;
        float dot = 0.0f;
        for (std::int64_t d = 0; d < D; ++d) dot += q[d] * k[d];
        s[j] = dot * scale;
        m = std::max(m, s[j]);
      }
      float l = 0.0f;
      for (std::int64_t j = 0; j <= last; ++j) {
        const float p = std::exp(s[j] - m);
        l += p;
        const float* v = pb.v.data() + (j * hkv + kvh) * D;
        for (std::int64_t d = 0; d < D; ++d) o[d] += p * v[d];
      }
      for (std::int64_t d = 0; d < D; ++d) o[d] /= l;
      lse[i * hq + h] = m + std::log(l);
    }
  }
}

}  // namespace uaa::test
