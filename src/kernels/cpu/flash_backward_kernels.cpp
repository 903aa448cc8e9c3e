// The flash attention backward kernels as BackwardKernel objects, one per ISA variant of the forward
// (baseline flags). Every variant computes in fp32 (bf16 inputs are widened when packed; dq is
// rounded to bf16 when written), except flash_avx512bf16 with bf16 inputs: it runs all five
// products with vdpbf16ps on bf16 pairs (S = Q·Kᵀ and dP = dO·Vᵀ exactly on the inputs; dV = Pᵀ·dO,
// dK = dSᵀ·Q and dQ = dS·K with P and dS rounded to bf16, as GPU flash attention does; see
// flash_avx512bf16.cpp). This unit turns BackwardProblem into the plain flash::BwdProblem the
// per-ISA units take (flash_bwd_impl.h) and lays out the scratch: segment tables, the packed K/V of
// one kv head (every key tile: Kᵀ, Vᵀ, K rows), the packed rows of one q head (Q, dO, lse, delta,
// the dQ accumulator, one ticket per query tile), then one block per thread (P, dS, dK, dV).
#include <cstring>
#include <vector>

#include "kernels/cpu/flash_glue.h"
#include "kernels/cpu/flash_problem.h"
#include "kernels/kernel.h"

namespace uaa::detail {
namespace {

using flash::Traits;
using namespace flash_glue;
static_assert(kQueryRowGranule % Traits::kQueryTile == 0,
              "query tiles must not straddle the row ranges a plan splits heads at");

int threads_of(const BackwardProblem& p) { return flash_glue::threads_of(p.threads); }

std::int64_t q_count_of(const BackwardProblem& p) {
  std::int64_t n = 0;
  for (const TokenSegment& s : p.q) n += s.tokens;
  return n;
}

struct Sizes {
  std::size_t tables;  // segment tables at the start of scratch
  flash::BwdScratchLayout layout;
};

// avx512bf16 multiplies bf16 inputs in pairs (vdpbf16ps); it runs fp32 inputs as avx512 does.
Sizes sizes_for(const BackwardProblem& p, bool pairs, int threads) {
  const std::size_t Bc = Traits::kKeyTile, Br = Traits::kQueryTile;
  const std::size_t D = static_cast<std::size_t>(p.head_dim);
  const std::size_t Dp = static_cast<std::size_t>(padded_dim(p.head_dim));
  const std::size_t D2 = (D + 1) / 2;
  const std::size_t n_kt = (static_cast<std::size_t>(p.kv_total) + Bc - 1) / Bc;
  const std::int64_t q_count = q_count_of(p);
  const std::size_t rows = static_cast<std::size_t>(q_count);
  const std::size_t n_qt =
      q_count == 0 ? 0
                   : static_cast<std::size_t>((p.q_first + q_count - 1) / Traits::kQueryTile -
                                              p.q_first / Traits::kQueryTile + 1);
  Sizes s;
  const std::size_t nq = p.q.size(), nkv = p.k.size();
  s.tables = align64(nq * 2 * sizeof(flash::Segment) + nq * 2 * sizeof(flash::StatSegment) +
                     nq * sizeof(flash::OutSegment) + nkv * 2 * sizeof(flash::Segment));
  flash::BwdScratchLayout& L = s.layout;
  const std::size_t kt_bytes = align64(pairs ? D2 * Bc * 2 * 2 : D * Bc * 4);
  const std::size_t fp32_rows = pairs ? 0 : align64(rows * Dp * 4);  // Q, dO fp32 (fp32 products)
  L.kt_off = 0;
  L.vt_off = kt_bytes;
  L.krow_off = L.vt_off + kt_bytes;
  L.kv_tile_bytes = L.krow_off + align64(Bc * Dp * (pairs ? 2 : 4));
  std::size_t at = s.tables;
  L.kv_packed = at;
  at += n_kt * L.kv_tile_bytes;
  L.q_rows = at;
  at += fp32_rows;
  L.do_rows = at;
  at += fp32_rows;
  L.lse2 = at;
  at += align64(rows * 4);
  L.delta = at;
  at += align64(rows * 4);
  L.dq_acc = at;
  at += align64(rows * Dp * 4);
  L.tickets = at;
  at += n_qt * 64;
  L.q_pairs = at;
  at += pairs ? align64(rows * D2 * 2 * 2) : 0;
  L.do_pairs = at;
  at += pairs ? align64(rows * D2 * 2 * 2) : 0;
  L.q_rowpairs = at;
  at += pairs ? align64(n_qt * Br * Dp * 2) : 0;
  L.do_rowpairs = at;
  at += pairs ? align64(n_qt * Br * Dp * 2) : 0;
  L.per_thread = at;
  std::size_t t = 0;
  L.p = t;
  t += align64(Br * Bc * 4);
  L.ds = t;
  t += align64(Br * Bc * 4);
  L.dk_acc = t;
  t += align64(Bc * Dp * 4);
  L.dv_acc = t;
  t += align64(Bc * Dp * 4);
  L.p_rowpairs = t;
  t += pairs ? align64(Br * Bc * 2) : 0;
  L.ds_rowpairs = t;
  t += pairs ? align64(Br * Bc * 2) : 0;
  L.ds_bf16 = t;
  t += pairs ? align64(Br * Bc * 2) : 0;
  L.thread_stride = t;
  L.total = at + static_cast<std::size_t>(threads) * t;
  return s;
}

class FlashBackwardKernel final : public BackwardKernel {
 public:
  FlashBackwardKernel(const char* name, Isa isa) : name_(name), isa_(isa) {}
  const char* name() const override { return name_; }
  bool supports(DType dtype) const override { return dtype == DType::f32 || dtype == DType::bf16; }

  std::size_t scratch_bytes(const BackwardProblem& p) const override {
    return sizes_for(p, uses_bf16_pairs(isa_, p.dtype), threads_of(p)).layout.total;
  }

  void run(const BackwardProblem& bp) const override {
    const int threads = threads_of(bp);
    const bool pairs = uses_bf16_pairs(isa_, bp.dtype);
    const Sizes sz = sizes_for(bp, pairs, threads);
    char* scratch = static_cast<char*>(bp.scratch);
    const std::size_t nq = bp.q.size(), nkv = bp.k.size();
    auto* q = reinterpret_cast<flash::Segment*>(scratch);
    flash::Segment* dout = q + nq;
    flash::Segment* k = dout + nq;
    flash::Segment* v = k + nkv;
    auto* lse = reinterpret_cast<flash::StatSegment*>(v + nkv);
    flash::StatSegment* delta = lse + nq;
    auto* dq = reinterpret_cast<flash::OutSegment*>(delta + nq);
    std::int64_t begin = bp.q_first;
    for (std::size_t i = 0; i < nq; ++i) {
      const TokenSegment& s = bp.q[i];
      const TokenSegment& g = bp.dout[i];
      q[i] = {s.data, begin, s.tokens, s.token_stride, s.head_stride};
      dout[i] = {g.data, begin, s.tokens, g.token_stride, g.head_stride};
      lse[i] = {bp.lse[i].data, bp.lse[i].token_stride};
      delta[i] = {bp.delta[i].data, bp.delta[i].token_stride};
      const OutSegment& o = bp.dq[i];
      dq[i] = {o.data, o.token_stride, o.head_stride, nullptr, 0};
      begin += s.tokens;
    }
    const std::int64_t q_end = begin;
    key_tables(bp.k, bp.v, k, v);
    flash::BwdProblem p;
    p.bf16 = bp.dtype == DType::bf16;
    p.head_dim = bp.head_dim;
    p.padded_dim = padded_dim(bp.head_dim);
    p.q_heads = bp.q_heads;
    p.q_head_begin = bp.q_head_begin;
    p.kv_head_begin = bp.kv_head_begin;
    p.group = bp.group;
    p.q = q;
    p.dout = dout;
    p.lse = lse;
    p.delta = delta;
    p.dq = dq;
    p.k = k;
    p.v = v;
    p.q_segments = static_cast<std::int64_t>(nq);
    p.kv_segments = static_cast<std::int64_t>(nkv);
    p.q_first = bp.q_first;
    p.q_count = q_end - bp.q_first;
    p.q_total = bp.q_total;
    p.kv_total = bp.kv_total;
    p.scale = bp.scale;
    p.causal = bp.causal;
    p.window_left = bp.window_left;
    p.window_right = bp.window_right;
    p.threads = threads;
    p.scratch = scratch;
    p.layout = sz.layout;
    p.dk_partial = bp.dk_partial;
    p.dv_partial = bp.dv_partial;
    p.partial_head_stride =
        bp.partial_head_stride != 0 ? bp.partial_head_stride : bp.kv_total * bp.head_dim;
    p.dk_carry = bp.dk_carry;
    p.dv_carry = bp.dv_carry;
    p.ordered_dq = bp.ordered_dq;
    switch (isa_) {
      case Isa::portable: flash::run_bwd_portable(p); break;
      case Isa::avx2: flash::run_bwd_avx2(p); break;
      case Isa::avx512: flash::run_bwd_avx512(p); break;
      case Isa::avx512bf16: pairs ? flash::run_bwd_avx512bf16(p) : flash::run_bwd_avx512(p); break;
    }
  }

 private:
  const char* name_;
  Isa isa_;
};

const FlashBackwardKernel& backward_kernel(Isa isa) {
  static const FlashBackwardKernel portable("flash_portable", Isa::portable);
  static const FlashBackwardKernel avx2("flash_avx2", Isa::avx2);
  static const FlashBackwardKernel avx512("flash_avx512", Isa::avx512);
  static const FlashBackwardKernel avx512bf16("flash_avx512bf16", Isa::avx512bf16);
  switch (isa) {
    case Isa::avx2: return avx2;
    case Isa::avx512: return avx512;
    case Isa::avx512bf16: return avx512bf16;
    default: return portable;
  }
}

}  // namespace

const BackwardKernel& backward_kernel_for(const AttentionKernel& forward) {
  for (Isa isa : {Isa::avx512bf16, Isa::avx512, Isa::avx2}) {
    const BackwardKernel& k = backward_kernel(isa);
    if (std::strcmp(forward.name(), k.name()) == 0) return k;
  }
  return backward_kernel(Isa::portable);  // flash_portable, reference, tiled
}

// The forward's list (dispatch.cpp's CPU checks, best first) mapped to the same-named variants.
std::span<const BackwardKernel* const> flash_backward_kernels_supported() {
  static const std::vector<const BackwardKernel*> list = [] {
    std::vector<const BackwardKernel*> l;
    for (const AttentionKernel* f : flash_kernels_supported()) l.push_back(&backward_kernel_for(*f));
    return l;
  }();
  return list;
}

}  // namespace uaa::detail
