// The flash attention backward, written once over a vector-operations type V and compiled once per
// ISA (flash_<isa>.cpp includes this inside its own namespace, after flash_impl.h, whose helpers it
// uses: min64, first_key, last_key, rows_seeing, find_segment, to_f32, with_rows, kBc, kBr, kLog2e;
// and after <sched.h>).
//
// FA2-style, key-outer. For each kv head, every key tile is packed once (threads split the tiles):
// Kᵀ and Vᵀ (streamed by S = Q·Kᵀ and dP = dO·Vᵀ) and K rows (by dQ = dS·K). For each q head, the
// step's Q and dO rows are packed with lse·log2(e) and delta per row; then threads take key tiles t
// in increasing order. Key tile t keeps dK and dV [64][Dp] in registers-and-L1 buffers of its
// thread, and walks the query tiles (global tiles of kQueryTile rows counted from row 0) in
// ascending order, skipping a tile none of whose rows sees a key of t (causal and sliding-window
// masks: work in proportion to the visible pairs); in a visited tile the products run on the rows
// [a, b) that see some key of t (a contiguous range, flash_impl.h) and on the keys some such row sees:
//   P  = exp2(S·scale·log2 e − lse·log2 e), 0 (stored, not multiplied) where a key is not visible
//   dV += Pᵀ·dO;  dP = dO·Vᵀ;  dS = P∘(dP − delta)·scale, 0 where P is masked
//   dK += dSᵀ·Q;  dQ[tile rows] += dS·K
// S, P, dP and dS are fp32. The microkernel set Mk does the five products and the packing: fp32
// (BwdMicroF32 below: Kᵀ, Vᵀ [D][64], K rows [64][Dp], Q and dO rows [rows][Dp]), or bf16 pairs
// (BwdMicroBf16Dp in flash_avx512bf16.cpp, bf16 inputs only), which rounds P and dS to bf16 (round
// to nearest even, once, after the fp32 dS above is formed) for dV, dK and dQ.
// dQ is one fp32 accumulator per head shared by all threads: the contributions of a query tile are
// added in ascending key-tile order (a ticket per query tile, starting at the first key tile it
// sees: the thread of key tile t waits until t − 1 has added; the key tiles a query tile sees are a
// contiguous range T0..T1 (its rows' key intervals overlap or touch), so tile t − 1 always adds, and
// it never waits on a later tile, so the chain cannot deadlock when tiles are handed out in order).
//
// Exactness (kernel.h): each output element of a product is one fp32 accumulator that steps over
// k ascending (d for S and dP, the tile's rows for dK and dV, its keys for dQ):
//   - fp32 products (gemm_block below): one fma per k;
//   - bf16 products (BwdMicroBf16Dp): one vdpbf16ps per pair of consecutive k — head dims
//     (2e, 2e + 1) for S and dP; rows (r0 + 2f, r0 + 2f + 1) for dK and dV, r0 the first row of the
//     query tile in the step (a global multiple of kQueryTile unless the step starts inside the
//     tile), so a pair never straddles a query tile (kQueryTile is even); keys (t0 + 2f, t0 + 2f + 1)
//     of key tile t for dQ. The instruction fixes a lane's arithmetic (Intel SDM: acc += x₁·y₁, then
//     acc += x₀·y₀, the products exact, round to nearest even, denormal inputs and results flushed
//     to zero), so a step is a function of the accumulator and the pair's two values only.
// Hence:
//   dq[i]       = chain over key positions ascending (by key pairs for bf16), key tile by key tile;
//   dk/dv[j]    = carry or +0, then a chain over query rows ascending (by row pairs from the tile's
//                 first row for bf16), query tile by query tile.
// What a product may leave out is only exact zeros: rows of a query tile that see no key of the
// key tile (a prefix and, with a window, a suffix of the tile; for bf16 whole row pairs of those: a
// pair holding a row that sees a key and one that does not runs with P = dS = 0 for the latter),
// keys of the tile no row of [a, b) sees (a suffix and, with a window, a prefix; for bf16 dQ whole
// key pairs: an odd end or start gives a pair whose other key has dS = 0 in every row), keys past
// kv_total (packed as 0). A row that sees nothing of a key tile never enters its arithmetic.
// Adding an exact zero
// product, or a pair of them, to a chain that started from +0 (or from a carry that is itself such
// a chain) never changes its bits for finite data (such a chain is never −0, and after a vdpbf16ps
// step never a denormal), so the chains are those of the contract; which terms are left out, and
// how terms pair, depends only on global row and key positions (for the rows of a step that starts
// at a multiple of kQueryRowGranule, as plans do). Nothing depends on segments, other heads or the
// thread count.
//
// Not handled (unlike the forward): non-finite inputs. A row that cannot see a key still meets it
// in a zero product (0 · Inf = NaN) when a visible neighbour in the same tiles needs it.

struct BwdBuffers {
  float* p;   // [kBr][kBc]: S, then P
  float* ds;  // [kBr][kBc]: dP, then dS
  float* dk;  // [kBc][Dp]
  float* dv;  // [kBc][Dp]
  std::uint32_t* p_rowpairs;   // [kBr/2][kBc] bf16 pairs (microkernels that take bf16 pairs only)
  std::uint32_t* ds_rowpairs;  // [kBr/2][kBc]
  std::uint16_t* ds_bf16;      // [kBr][kBc]
};

inline BwdBuffers bwd_thread_buffers(const BwdProblem& p, int tid) {
  const BwdScratchLayout& L = p.layout;
  char* b = p.scratch + L.per_thread + static_cast<std::size_t>(tid) * L.thread_stride;
  return {reinterpret_cast<float*>(b + L.p),
          reinterpret_cast<float*>(b + L.ds),
          reinterpret_cast<float*>(b + L.dk_acc),
          reinterpret_cast<float*>(b + L.dv_acc),
          reinterpret_cast<std::uint32_t*>(b + L.p_rowpairs),
          reinterpret_cast<std::uint32_t*>(b + L.ds_rowpairs),
          reinterpret_cast<std::uint16_t*>(b + L.ds_bf16)};
}

// ---- the one product microkernel -------------------------------------------------------------

// C[r][0, NC*W) (+)= Σ_{k<K} A[r*ars + k*aks] · B[k*bs + 0, NC*W) for MR rows: A broadcast, B
// streamed; k ascending in every lane (one fma chain per element). kAcc: start from C, else zero.
template <class V, int MR, int NC, bool kAcc>
inline void gemm_block(const float* A, std::int64_t ars, std::int64_t aks, const float* B,
                       std::int64_t bs, std::int64_t K, float* C, std::int64_t cs) {
  using F = typename V::F;
  F acc[MR][NC];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) acc[r][c] = kAcc ? V::load(C + r * cs + c * V::W) : V::zero();
  for (std::int64_t k = 0; k < K; ++k) {
    F b[NC];
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) b[c] = V::load(B + k * bs + c * V::W);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const F a = V::set1(A[r * ars + k * aks]);
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) acc[r][c] = V::fma(a, b[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) V::store(C + r * cs + c * V::W, acc[r][c]);
}

// C[0, M)[0, N) (+)= A·B as above; N a multiple of V::W. Blocks of 6 rows × kPvCols vectors.
template <class V, bool kAcc>
inline void gemm(std::int64_t M, std::int64_t N, std::int64_t K, const float* A, std::int64_t ars,
                 std::int64_t aks, const float* B, std::int64_t bs, float* C, std::int64_t cs) {
  constexpr int NC = V::kPvCols;
  static_assert(V::kPvRows == 6, "with_rows dispatches up to 6 rows");
  const std::int64_t nv = N / V::W;
  for (std::int64_t r = 0; r < M; r += 6)
    with_rows(min64(6, M - r), [&]<int MR>() {
      const float* a = A + r * ars;
      float* c0 = C + r * cs;
      std::int64_t c = 0;
      for (; c + NC <= nv; c += NC)
        gemm_block<V, MR, NC, kAcc>(a, ars, aks, B + c * V::W, bs, K, c0 + c * V::W, cs);
      switch (nv - c) {  // Dp is a multiple of 16 floats, so only AVX-512 (NC 4) has a remainder
        case 0: break;
        case 1: gemm_block<V, MR, 1, kAcc>(a, ars, aks, B + c * V::W, bs, K, c0 + c * V::W, cs); break;
        case 2:
          if constexpr (NC > 2)
            gemm_block<V, MR, 2, kAcc>(a, ars, aks, B + c * V::W, bs, K, c0 + c * V::W, cs);
          break;
        default:
          if constexpr (NC > 3)
            gemm_block<V, MR, 3, kAcc>(a, ars, aks, B + c * V::W, bs, K, c0 + c * V::W, cs);
          break;
      }
    });
}

// ---- packing ---------------------------------------------------------------------------------

template <class T>
inline void bwd_pack_kv_typed(const BwdProblem& p, std::int64_t kvh, std::int64_t t, char* blk) {
  const std::int64_t D = p.head_dim, Dp = p.padded_dim, j0 = t * kBc;
  float* Kt = reinterpret_cast<float*>(blk + p.layout.kt_off);    // [D][kBc]
  float* Vt = reinterpret_cast<float*>(blk + p.layout.vt_off);    // [D][kBc]
  float* Kr = reinterpret_cast<float*>(blk + p.layout.krow_off);  // [kBc][Dp]
  std::int64_t s = find_segment(p.k, p.kv_segments, j0);
  for (std::int64_t c = 0; c < kBc; ++c) {
    const std::int64_t j = j0 + c;
    float* kr = Kr + c * Dp;
    if (j >= p.kv_total) {
      for (std::int64_t d = 0; d < D; ++d) Kt[d * kBc + c] = Vt[d * kBc + c] = 0.0f;
      for (std::int64_t d = 0; d < Dp; ++d) kr[d] = 0.0f;
      continue;
    }
    while (j >= p.k[s].begin + p.k[s].tokens) ++s;
    const Segment& ks = p.k[s];
    const Segment& vs = p.v[s];
    const T* ksrc = static_cast<const T*>(ks.data) + (j - ks.begin) * ks.token_stride + kvh * ks.head_stride;
    const T* vsrc = static_cast<const T*>(vs.data) + (j - vs.begin) * vs.token_stride + kvh * vs.head_stride;
    for (std::int64_t d = 0; d < D; ++d) {
      const float x = to_f32(ksrc[d]);
      Kt[d * kBc + c] = x;
      kr[d] = x;
      Vt[d * kBc + c] = to_f32(vsrc[d]);
    }
    for (std::int64_t d = D; d < Dp; ++d) kr[d] = 0.0f;
  }
}

// Rows [r0, r1) of local head h of segment table segs into out[(i - q_first) * Dp], zero padded.
template <class T>
inline void bwd_pack_rows_typed(const BwdProblem& p, const Segment* segs, std::int64_t h,
                                std::int64_t r0, std::int64_t r1, float* out) {
  const std::int64_t D = p.head_dim, Dp = p.padded_dim;
  std::int64_t s = find_segment(segs, p.q_segments, r0);
  for (std::int64_t i = r0; i < r1; ++i) {
    while (i >= segs[s].begin + segs[s].tokens) ++s;
    const Segment& g = segs[s];
    const T* row = static_cast<const T*>(g.data) + (i - g.begin) * g.token_stride + h * g.head_stride;
    float* o = out + (i - p.q_first) * Dp;
    for (std::int64_t d = 0; d < D; ++d) o[d] = to_f32(row[d]);
    for (std::int64_t d = D; d < Dp; ++d) o[d] = 0.0f;
  }
}

struct BwdHead {  // the per-head buffers shared by all threads
  float* q;        // [rows][Dp] (fp32 products only)
  float* dout;     // [rows][Dp] (fp32 products only)
  float* lse2;     // [rows]
  float* delta;    // [rows]
  float* dq;       // [rows][Dp]
  char* tickets;   // one 64-byte line per query tile
  std::uint16_t* q_pairs;   // [rows][D2][2] bf16 (microkernels that take bf16 pairs only)
  std::uint16_t* do_pairs;  // [rows][D2][2]
  std::uint16_t* q_rowpairs;   // per local query tile [kBr/2][Dp][2] (bf16 pairs only)
  std::uint16_t* do_rowpairs;  // per local query tile [kBr/2][Dp][2]
};

inline BwdHead bwd_head_buffers(const BwdProblem& p) {
  const BwdScratchLayout& L = p.layout;
  return {reinterpret_cast<float*>(p.scratch + L.q_rows), reinterpret_cast<float*>(p.scratch + L.do_rows),
          reinterpret_cast<float*>(p.scratch + L.lse2), reinterpret_cast<float*>(p.scratch + L.delta),
          reinterpret_cast<float*>(p.scratch + L.dq_acc), p.scratch + L.tickets,
          reinterpret_cast<std::uint16_t*>(p.scratch + L.q_pairs),
          reinterpret_cast<std::uint16_t*>(p.scratch + L.do_pairs),
          reinterpret_cast<std::uint16_t*>(p.scratch + L.q_rowpairs),
          reinterpret_cast<std::uint16_t*>(p.scratch + L.do_rowpairs)};
}

inline std::int64_t* bwd_ticket(const BwdHead& hb, std::int64_t u) {
  return reinterpret_cast<std::int64_t*>(hb.tickets + u * 64);
}

// Global rows of local query tile u: [r0, r1).
struct RowRange {
  std::int64_t r0, r1;
};
inline RowRange bwd_tile_rows(const BwdProblem& p, std::int64_t u) {
  const std::int64_t t = p.q_first / kBr + u;
  const std::int64_t q_end = p.q_first + p.q_count;
  return {t * kBr < p.q_first ? p.q_first : t * kBr, min64((t + 1) * kBr, q_end)};
}

// Packs local query tile u of local head h: Q, dO, lse2, delta; zeroes dQ; sets the ticket to the
// first key tile the tile's rows see (ordered dQ), or to 0 (free: the unordered lock).
template <class Mk>
inline void bwd_pack_query_tile(const BwdProblem& p, const BwdHead& hb, std::int64_t h, std::int64_t u) {
  const RowRange rr = bwd_tile_rows(p, u);
  Mk::pack_rows(p, hb, h, u, rr.r0, rr.r1);
  const std::int64_t Dp = p.padded_dim;
  std::int64_t s = find_segment(p.q, p.q_segments, rr.r0);
  for (std::int64_t i = rr.r0; i < rr.r1; ++i) {
    while (i >= p.q[s].begin + p.q[s].tokens) ++s;
    const std::int64_t t = i - p.q[s].begin, r = i - p.q_first;
    hb.lse2[r] = p.lse[s].data[t * p.lse[s].token_stride + h] * kLog2e;
    hb.delta[r] = p.delta[s].data[t * p.delta[s].token_stride + h];
    float* dq = hb.dq + r * Dp;
    for (std::int64_t d = 0; d < Dp; ++d) dq[d] = 0.0f;
  }
  const RowSpan any = rows_seeing(p, rr.r0, rr.r1, 0, p.kv_total - 1);
  const std::int64_t first_tile = p.ordered_dq && any.a < any.b ? first_key(p, any.a) / kBc : 0;
  __atomic_store_n(bwd_ticket(hb, u), first_tile, __ATOMIC_RELAXED);
}

// Writes the dQ rows of local query tile u of local head h in the dtype.
inline void bwd_write_dq(const BwdProblem& p, const BwdHead& hb, std::int64_t h, std::int64_t u) {
  const RowRange rr = bwd_tile_rows(p, u);
  const std::int64_t D = p.head_dim, Dp = p.padded_dim;
  std::int64_t s = find_segment(p.q, p.q_segments, rr.r0);
  for (std::int64_t i = rr.r0; i < rr.r1; ++i) {
    while (i >= p.q[s].begin + p.q[s].tokens) ++s;
    const OutSegment& os = p.dq[s];
    const std::int64_t off = (i - p.q[s].begin) * os.token_stride + h * os.head_stride;
    const bool none = first_key(p, i) > last_key(p, i);
    const float* src = hb.dq + (i - p.q_first) * Dp;
    if (p.bf16) {
      std::uint16_t* dst = static_cast<std::uint16_t*>(os.data) + off;
      for (std::int64_t d = 0; d < D; ++d) dst[d] = none ? 0 : bf16_from_f32(src[d]);
    } else {
      float* dst = static_cast<float*>(os.data) + off;
      for (std::int64_t d = 0; d < D; ++d) dst[d] = none ? 0.0f : src[d];
    }
  }
}

// Every dq row of the step zero (no keys at all).
inline void bwd_zero_dq(const BwdProblem& p) {
  const std::int64_t D = p.head_dim;
  for (std::int64_t s = 0; s < p.q_segments; ++s)
    for (std::int64_t t = 0; t < p.q[s].tokens; ++t)
      for (std::int64_t h = 0; h < p.q_heads; ++h) {
        const OutSegment& os = p.dq[s];
        const std::int64_t off = t * os.token_stride + h * os.head_stride;
        if (p.bf16)
          for (std::int64_t d = 0; d < D; ++d) static_cast<std::uint16_t*>(os.data)[off + d] = 0;
        else
          for (std::int64_t d = 0; d < D; ++d) static_cast<float*>(os.data)[off + d] = 0.0f;
      }
}

// dk/dv partials of a step without rows: carry (local head 0) or zero.
inline void bwd_partials_without_rows(const BwdProblem& p) {
  const std::int64_t n = p.kv_total * p.head_dim;
  for (std::int64_t h = 0; h < p.q_heads; ++h) {
    float* dk = p.dk_partial + h * p.partial_head_stride;
    float* dv = p.dv_partial + h * p.partial_head_stride;
    for (std::int64_t e = 0; e < n; ++e) {
      dk[e] = h == 0 && p.dk_carry ? p.dk_carry[e] : 0.0f;
      dv[e] = h == 0 && p.dv_carry ? p.dv_carry[e] : 0.0f;
    }
  }
}

inline void bwd_spin(unsigned& n) {
  if (++n < 256) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  } else {
    sched_yield();  // more threads than cores: let the one we wait for run
  }
}

// What bwd_key_tile hands the products of one (query tile, key tile) pair: local query tile u with
// the step's rows [r0, r1), of which rows [a, a + m) see some key of the key tile; keys
// [t0 + k0, t0 + kn) of the tile are seen by some of them (the others have P = dS = 0 in every
// row). P and dP/dS rows start at row a (tb.p, tb.ds).
struct BwdTile {
  std::int64_t u, r0, r1, a, m, k0, kn;
};

// The five products in fp32: S = Q·Kᵀ and dP = dO·Vᵀ over Kᵀ, Vᵀ packed fp32 [D][kBc]; dV, dK and
// dQ in gemm on fp32 rows. A microkernel set Mk provides pack_kv (one key tile's block: Kᵀ, Vᵀ and
// K rows in its formats), pack_rows (the per-row formats of a query tile), qk, dov, dv, dk and dq.
template <class V>
struct BwdMicroF32 {
  static void pack_kv(const BwdProblem& p, std::int64_t kvh, std::int64_t t, char* blk) {
    if (p.bf16)
      bwd_pack_kv_typed<std::uint16_t>(p, kvh, t, blk);
    else
      bwd_pack_kv_typed<float>(p, kvh, t, blk);
  }
  // Q and dO rows [r0, r1) of local head h (local query tile u) as fp32 [rows][Dp].
  static void pack_rows(const BwdProblem& p, const BwdHead& hb, std::int64_t h, std::int64_t,
                        std::int64_t r0, std::int64_t r1) {
    if (p.bf16) {
      bwd_pack_rows_typed<std::uint16_t>(p, p.q, h, r0, r1, hb.q);
      bwd_pack_rows_typed<std::uint16_t>(p, p.dout, h, r0, r1, hb.dout);
    } else {
      bwd_pack_rows_typed<float>(p, p.q, h, r0, r1, hb.q);
      bwd_pack_rows_typed<float>(p, p.dout, h, r0, r1, hb.dout);
    }
  }
  // S[0, m)[0, kBc) = Q rows [a, a + m) · Kᵀ (d ascending).
  static void qk(const BwdProblem& p, const BwdHead& hb, std::int64_t a, std::int64_t m, const char* blk,
                 float* S) {
    const std::int64_t Dp = p.padded_dim;
    gemm<V, false>(m, kBc, p.head_dim, hb.q + (a - p.q_first) * Dp, Dp, 1,
                   reinterpret_cast<const float*>(blk + p.layout.kt_off), kBc, S, kBc);
  }
  // dP[0, m)[0, kBc) = dO rows [a, a + m) · Vᵀ (d ascending).
  static void dov(const BwdProblem& p, const BwdHead& hb, std::int64_t a, std::int64_t m, const char* blk,
                  float* dP) {
    const std::int64_t Dp = p.padded_dim;
    gemm<V, false>(m, kBc, p.head_dim, hb.dout + (a - p.q_first) * Dp, Dp, 1,
                   reinterpret_cast<const float*>(blk + p.layout.vt_off), kBc, dP, kBc);
  }
  // dV[keys k0..kn) += Pᵀ·dO (one fma chain per element over rows [a, a + m) ascending).
  static void dv(const BwdProblem& p, const BwdHead& hb, const BwdBuffers& tb, const BwdTile& w) {
    const std::int64_t Dp = p.padded_dim;
    gemm<V, true>(w.kn - w.k0, Dp, w.m, tb.p + w.k0, 1, kBc, hb.dout + (w.a - p.q_first) * Dp, Dp,
                  tb.dv + w.k0 * Dp, Dp);
  }
  // dK[keys k0..kn) += dSᵀ·Q (likewise).
  static void dk(const BwdProblem& p, const BwdHead& hb, const BwdBuffers& tb, const BwdTile& w) {
    const std::int64_t Dp = p.padded_dim;
    gemm<V, true>(w.kn - w.k0, Dp, w.m, tb.ds + w.k0, 1, kBc, hb.q + (w.a - p.q_first) * Dp, Dp,
                  tb.dk + w.k0 * Dp, Dp);
  }
  // dQ[rows [a, a + m)] += dS·K (one fma chain per element over keys [t0 + k0, t0 + kn) ascending).
  static void dq(const BwdProblem& p, const BwdHead& hb, const BwdBuffers& tb, const char* blk,
                 const BwdTile& w) {
    const std::int64_t Dp = p.padded_dim;
    gemm<V, true>(w.m, Dp, w.kn - w.k0, tb.ds + w.k0, kBc, 1,
                  reinterpret_cast<const float*>(blk + p.layout.krow_off) + w.k0 * Dp, Dp,
                  hb.dq + (w.a - p.q_first) * Dp, Dp);
  }
};

// ---- one key tile ------------------------------------------------------------------------------

// Zeroes the entries of a P or dS row (global row i, key tile at t0) for keys the row cannot see.
inline void mask_row(const BwdProblem& p, std::int64_t i, std::int64_t t0, float* s) {
  const std::int64_t lo = min64(first_key(p, i) - t0, kBc);
  for (std::int64_t c = 0; c < lo; ++c) s[c] = 0.0f;
  for (std::int64_t c = last_key(p, i) - t0 + 1; c < kBc; ++c) s[c] = 0.0f;
}

template <class V, class Mk>
inline void bwd_key_tile(const BwdProblem& p, const BwdBuffers& tb, const BwdHead& hb, std::int64_t h,
                         std::int64_t t, std::int64_t n_qt) {
  using F = typename V::F;
  constexpr int NV = static_cast<int>(kBc / V::W);
  const std::int64_t D = p.head_dim, Dp = p.padded_dim;
  const std::int64_t t0 = t * kBc, nk = min64(kBc, p.kv_total - t0), te = t0 + nk - 1;
  const char* blk = p.scratch + p.layout.kv_packed + static_cast<std::size_t>(t) * p.layout.kv_tile_bytes;

  // dK, dV of keys [t0, t0 + nk): carry (local head 0) or +0.
  const float* dk_carry = h == 0 ? p.dk_carry : nullptr;
  const float* dv_carry = h == 0 ? p.dv_carry : nullptr;
  // (The branches stay outside the loops: vectorized as a select, the loop did masked loads from
  // the null carry, which profiled very slow: a fault-suppression assist on the unmapped page.)
  for (std::int64_t c = 0; c < nk; ++c) {
    float* dk = tb.dk + c * Dp;
    float* dv = tb.dv + c * Dp;
    if (dk_carry)
      for (std::int64_t d = 0; d < D; ++d) dk[d] = dk_carry[(t0 + c) * D + d];
    else
      for (std::int64_t d = 0; d < D; ++d) dk[d] = 0.0f;
    if (dv_carry)
      for (std::int64_t d = 0; d < D; ++d) dv[d] = dv_carry[(t0 + c) * D + d];
    else
      for (std::int64_t d = 0; d < D; ++d) dv[d] = 0.0f;
    for (std::int64_t d = D; d < Dp; ++d) dk[d] = dv[d] = 0.0f;
  }

  const float scale2 = p.scale * kLog2e;
  for (std::int64_t u = 0; u < n_qt; ++u) {
    const RowRange rr = bwd_tile_rows(p, u);
    // first_key and last_key are non-decreasing in the row: no row of the tile sees a key of t.
    if (last_key(p, rr.r1 - 1) < t0 || first_key(p, rr.r0) > te) continue;
    const RowSpan rs = rows_seeing(p, rr.r0, rr.r1, t0, te);  // rows [a, b) see some key of t
    if (rs.a >= rs.b) continue;
    const std::int64_t a = rs.a, m = rs.b - rs.a;
    // Keys [t0 + k0, t0 + kn): seen by some row of [a, b).
    const std::int64_t k0 = first_key(p, a) > t0 ? first_key(p, a) - t0 : 0;
    const std::int64_t kn = min64(nk, last_key(p, rs.b - 1) - t0 + 1);
    const BwdTile w{u, rr.r0, rr.r1, a, m, k0, kn};
    const float* lse2 = hb.lse2 + (a - p.q_first);
    const float* delta = hb.delta + (a - p.q_first);

    // S = Q·Kᵀ, then P = exp2(S·scale·log2 e − lse2); keys a row cannot see get P = 0.
    Mk::qk(p, hb, a, m, blk, tb.p);
    {
      const F sc = V::set1(scale2);
      for (std::int64_t r = 0; r < m; ++r) {
        float* s = tb.p + r * kBc;
        const F l = V::set1(lse2[r]);
#pragma GCC unroll 16
        for (int c = 0; c < NV; ++c)
          V::store(s + c * V::W, V::exp2(V::sub(V::mul(V::load(s + c * V::W), sc), l)));
        mask_row(p, a + r, t0, s);
      }
    }
    // dV[keys] += Pᵀ·dO (chain over the tile's rows).
    Mk::dv(p, hb, tb, w);
    // dP = dO·Vᵀ, then dS = P∘(dP − delta)·scale, 0 where P is masked.
    Mk::dov(p, hb, a, m, blk, tb.ds);
    {
      const F sc = V::set1(p.scale);
      for (std::int64_t r = 0; r < m; ++r) {
        const float* pr = tb.p + r * kBc;
        float* s = tb.ds + r * kBc;
        const F dl = V::set1(delta[r]);
#pragma GCC unroll 16
        for (int c = 0; c < NV; ++c)
          V::store(s + c * V::W,
                   V::mul(V::mul(V::load(pr + c * V::W), V::sub(V::load(s + c * V::W), dl)), sc));
        mask_row(p, a + r, t0, s);
      }
    }
    // dK[keys] += dSᵀ·Q (chain over the tile's rows).
    Mk::dk(p, hb, tb, w);
    // dQ[rows] += dS·K (chain over keys), after key tile t − 1 (ordered) or under the tile's lock.
    std::int64_t* ticket = bwd_ticket(hb, u);
    unsigned spins = 0;
    if (p.ordered_dq) {
      while (__atomic_load_n(ticket, __ATOMIC_ACQUIRE) != t) bwd_spin(spins);
    } else {
      while (__atomic_exchange_n(ticket, 1, __ATOMIC_ACQUIRE) != 0) bwd_spin(spins);
    }
    Mk::dq(p, hb, tb, blk, w);
    __atomic_store_n(ticket, p.ordered_dq ? t + 1 : 0, __ATOMIC_RELEASE);
  }

  float* dk_out = p.dk_partial + h * p.partial_head_stride + t0 * D;
  float* dv_out = p.dv_partial + h * p.partial_head_stride + t0 * D;
  for (std::int64_t c = 0; c < nk; ++c)
    for (std::int64_t d = 0; d < D; ++d) {
      dk_out[c * D + d] = tb.dk[c * Dp + d];
      dv_out[c * D + d] = tb.dv[c * Dp + d];
    }
}

// ---- the driver --------------------------------------------------------------------------------

template <class V, class Mk>
void run_flash_bwd(const BwdProblem& p) {
  if (p.q_heads == 0) return;
  if (p.kv_total == 0) {
    bwd_zero_dq(p);
    return;
  }
  if (p.q_count == 0) {
    bwd_partials_without_rows(p);
    return;
  }
  const std::int64_t n_qt = (p.q_first + p.q_count - 1) / kBr - p.q_first / kBr + 1;
  const std::int64_t n_kt = (p.kv_total + kBc - 1) / kBc;
  // Key tiles outside [seen.lo, seen.hi) are seen by no row of the step: not packed (their partials are
  // the carry or 0).
  const KeyTiles seen = key_tiles_seen(p);
  const BwdHead hb = bwd_head_buffers(p);
  const int threads = p.threads < 1 ? 1 : p.threads;
  (void)threads;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    int tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    const BwdBuffers tb = bwd_thread_buffers(p, tid);
    // Heads that share a kv head are consecutive: pack that kv head once, then run its q heads.
    for (std::int64_t h = 0; h < p.q_heads;) {
      const std::int64_t g = (p.q_head_begin + h) / p.group;
      const std::int64_t h_end = min64(p.q_heads, (g + 1) * p.group - p.q_head_begin);
      const std::int64_t kvh = g - p.kv_head_begin;
#pragma omp for schedule(static)
      for (std::int64_t t = seen.lo; t < seen.hi; ++t)
        Mk::pack_kv(p, kvh, t,
                    p.scratch + p.layout.kv_packed + static_cast<std::size_t>(t) * p.layout.kv_tile_bytes);
      for (std::int64_t hh = h; hh < h_end; ++hh) {
#pragma omp for schedule(static)
        for (std::int64_t u = 0; u < n_qt; ++u) bwd_pack_query_tile<Mk>(p, hb, hh, u);
        // In increasing t (the dQ tickets rely on it); causal: the first key tiles are the largest.
#pragma omp for schedule(dynamic, 1)
        for (std::int64_t t = 0; t < n_kt; ++t) bwd_key_tile<V, Mk>(p, tb, hb, hh, t, n_qt);
#pragma omp for schedule(static)
        for (std::int64_t u = 0; u < n_qt; ++u) bwd_write_dq(p, hb, hh, u);
      }
      h = h_end;
    }
  }
}
