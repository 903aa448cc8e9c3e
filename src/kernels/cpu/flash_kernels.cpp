// The flash attention kernels as AttentionKernel objects, one per ISA variant (baseline flags).
//
// Each variant handles fp32 and bf16: flash_avx512bf16 multiplies bf16 with vdpbf16ps; the others
// widen bf16 to fp32 when packing. This unit turns KernelProblem into the plain flash::Problem the
// per-ISA units take, and lays out the scratch: segment tables, the packed K/V of one kv head
// (all key tiles: each is packed once and read by every query tile of every q head sharing it),
// then one block per thread (Q tile, scores, bf16 P, accumulator, row max/sum/α).
#include <algorithm>

#include "kernels/cpu/flash_glue.h"
#include "kernels/cpu/flash_problem.h"
#include "kernels/kernel.h"
#include "uaa/threads.h"

namespace uaa::detail {
namespace {

using flash::Traits;
using namespace flash_glue;
static_assert(kQueryRowGranule % Traits::kQueryTile == 0,
              "query tiles must not straddle the row ranges a plan splits heads at");

struct Sizes {
  std::size_t tables;  // segment tables at the start of scratch
  flash::ScratchLayout layout;
};

Sizes sizes_for(const KernelProblem& p, bool pairs, int threads) {
  const std::size_t Bc = Traits::kKeyTile, Br = Traits::kQueryTile;
  const std::size_t D = static_cast<std::size_t>(p.head_dim);
  const std::size_t Dp = static_cast<std::size_t>(padded_dim(p.head_dim));
  const std::size_t D2 = (D + 1) / 2;
  const std::size_t n_kt = (static_cast<std::size_t>(p.kv_total) + Bc - 1) / Bc;
  Sizes s;
  s.tables = align64((p.q.size() + 2 * p.k.size()) * sizeof(flash::Segment) +
                     p.out.size() * sizeof(flash::OutSegment));
  flash::ScratchLayout& L = s.layout;
  L.k_tile_bytes = pairs ? D2 * Bc * 2 * 2 : D * Bc * 4;
  L.v_tile_bytes = pairs ? Bc * Dp * 2 : Bc * Dp * 4;
  std::size_t at = s.tables;
  L.k_packed = at;
  at += align64(n_kt * L.k_tile_bytes);
  L.v_packed = at;
  at += align64(n_kt * L.v_tile_bytes);
  L.v_bad = at;
  at += align64(n_kt);
  L.per_thread = at;
  std::size_t t = 0;
  L.q_tile = t;
  t += align64(pairs ? Br * D2 * 4 : Br * D * 4);
  L.scores = t;
  t += align64(Br * Bc * 4);
  L.p_bf16 = t;
  t += align64(Br * Bc * 2);
  L.acc = t;
  t += align64(Br * Dp * 4);
  L.row_max = t;
  t += align64(Br * 4);
  L.row_sum = t;
  t += align64(Br * 4);
  L.alpha = t;
  t += align64(Br * 4);
  L.thread_stride = t;
  L.total = at + static_cast<std::size_t>(threads) * t;
  return s;
}

int threads_of(const KernelProblem& p) { return flash_glue::threads_of(p.threads); }

class FlashKernel final : public AttentionKernel {
 public:
  FlashKernel(const char* name, Isa isa) : name_(name), isa_(isa) {}
  const char* name() const override { return name_; }
  bool supports(DType dtype) const override { return dtype == DType::f32 || dtype == DType::bf16; }

  std::size_t scratch_bytes(const KernelProblem& p) const override {
    return sizes_for(p, uses_bf16_pairs(isa_, p.dtype), threads_of(p)).layout.total;
  }

  void run(const KernelProblem& kp) const override {
    const bool pairs = uses_bf16_pairs(isa_, kp.dtype);
    const int threads = threads_of(kp);
    const Sizes sz = sizes_for(kp, pairs, threads);
    char* scratch = static_cast<char*>(kp.scratch);
    auto* q = reinterpret_cast<flash::Segment*>(scratch);
    flash::Segment* k = q + kp.q.size();
    flash::Segment* v = k + kp.k.size();
    auto* out = reinterpret_cast<flash::OutSegment*>(v + kp.v.size());
    std::int64_t begin = kp.q_first;
    for (std::size_t i = 0; i < kp.q.size(); ++i) {
      const TokenSegment& s = kp.q[i];
      q[i] = {s.data, begin, s.tokens, s.token_stride, s.head_stride};
      const OutSegment& o = kp.out[i];
      out[i] = {o.data, o.token_stride, o.head_stride, o.lse, o.lse_token_stride};
      begin += s.tokens;
    }
    const std::int64_t begin_q_end = begin;
    key_tables(kp.k, kp.v, k, v);
    flash::Problem p;
    p.bf16 = kp.dtype == DType::bf16;
    p.head_dim = kp.head_dim;
    p.padded_dim = padded_dim(kp.head_dim);
    p.q_heads = kp.q_heads;
    p.q_head_begin = kp.q_head_begin;
    p.kv_head_begin = kp.kv_head_begin;
    p.group = kp.group;
    p.q = q;
    p.k = k;
    p.v = v;
    p.out = out;
    p.q_segments = static_cast<std::int64_t>(kp.q.size());
    p.kv_segments = static_cast<std::int64_t>(kp.k.size());
    p.q_first = kp.q_first;
    p.q_count = begin_q_end - kp.q_first;
    p.q_total = kp.q_total;
    p.kv_total = kp.kv_total;
    p.scale = kp.scale;
    p.causal = kp.causal;
    p.window_left = kp.window_left;
    p.window_right = kp.window_right;
    p.threads = threads;
    p.scratch = scratch;
    p.layout = sz.layout;
    if (p.q_segments == 0 || p.q_heads == 0) return;
    switch (isa_) {
      case Isa::portable: flash::run_portable(p); break;
      case Isa::avx2: flash::run_avx2(p); break;
      case Isa::avx512: flash::run_avx512(p); break;
      case Isa::avx512bf16: pairs ? flash::run_avx512bf16(p) : flash::run_avx512(p); break;
    }
  }

 private:
  const char* name_;
  Isa isa_;
};

}  // namespace

const AttentionKernel& flash_portable_kernel() {
  static const FlashKernel k("flash_portable", Isa::portable);
  return k;
}
const AttentionKernel& flash_avx2_kernel() {
  static const FlashKernel k("flash_avx2", Isa::avx2);
  return k;
}
const AttentionKernel& flash_avx512_kernel() {
  static const FlashKernel k("flash_avx512", Isa::avx512);
  return k;
}
const AttentionKernel& flash_avx512bf16_kernel() {
  static const FlashKernel k("flash_avx512bf16", Isa::avx512bf16);
  return k;
}

}  // namespace uaa::detail
