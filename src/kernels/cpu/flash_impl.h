// The flash attention algorithm, written once over a vector-operations type V and a microkernel
// set Mk, and compiled once per ISA (flash_<isa>.cpp includes this inside its own namespace, after
// <cstdint>, <immintrin.h>/<omp.h>, flash_problem.h, flash_math.h and its simd_<isa>.h).
//
// Work: for each kv head, all of its key tiles are packed once (threads split the tiles) into a
// layout the microkernels stream (Kᵀ [D][64], V [64][Dp]); then threads take (q head, query tile)
// items. A query tile walks key tiles in order with an online softmax in the log2 domain:
//   S = (Q·Kᵀ)·(scale·log2 e)   (scale applied in the Q·Kᵀ epilogue)
//   m' = max(m, rowmax S); α = 2^(m−m'); P = 2^(S−m'); l = α·l + ΣP; O = α·O + P·V
// Every row's arithmetic (dot products in d order, P·V in key order, fixed-shape vector reductions)
// depends only on that row, the global key tile and Traits — never on the other rows of its tile,
// the segments or the threads. A row sees the keys [first_key, last_key] (causal and sliding-window
// masks); a key tile it sees nothing of is skipped for that row entirely (the rows of a query tile
// that see some key of a key tile are a contiguous range, the only rows the tile's products run
// on), so each row's online softmax starts at its own first visible tile with m = −inf, l = 0 and
// never meets a tile whose scores are all masked (no −inf − −inf). A query tile visits only the key
// tiles its rows see: work in proportion to the window, not to the sequence.
//
// Non-finite values: packing also flags every key tile whose K holds a non-finite value; in such a
// tile a row with a non-finite visible score gets row sum NaN (so its output and lse are NaN, as in
// the reference; the vector exp2 would map a NaN score to 0). Scores that overflow from finite
// inputs are not searched for: such a row comes out NaN through inf − inf.
// P·V runs over all 64 keys of a tile with P = 0 for keys a row cannot see
// (causal diagonal tiles, window edges, the zero-padded tail), and 0 · Inf = NaN. So packing flags
// every key tile whose V holds a non-finite value, and in a flagged tile a row that sees only part
// of the keys takes Mk::pv_range, which runs over its visible keys only. The flag depends only on
// the global key tile's content, so the choice (and each row's arithmetic) still depends only on
// the row and global key positions; and for finite data both paths give the same values (they
// differ only by additions of P = 0 terms).
constexpr std::int64_t kBc = Traits::kKeyTile;
constexpr std::int64_t kBr = Traits::kQueryTile;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

inline std::int64_t min64(std::int64_t a, std::int64_t b) { return a < b ? a : b; }

// First and last key global query row i may see (kernel.h's first_visible_key and
// last_visible_key, repeated: see flash_problem.h); first > last when none. P is Problem or
// BwdProblem. Both are non-decreasing in i, and the rows that see no key are a prefix (last < 0)
// and a suffix (first >= kv_total).
template <class P>
inline std::int64_t first_key(const P& p, std::int64_t i) {
  const std::int64_t aligned = i + p.kv_total - p.q_total;
  if (p.window_left < 0 || aligned <= p.window_left) return 0;
  return aligned - p.window_left;
}
template <class P>
inline std::int64_t last_key(const P& p, std::int64_t i) {
  const std::int64_t right = p.causal ? 0 : p.window_right;
  if (right < 0 || right >= p.q_total - i) return p.kv_total - 1;
  return i + p.kv_total - p.q_total + right;
}

// The rows of [r0, r1) that see some key of [k0, k1] (0 <= k0 <= k1 < kv_total): those with
// last_key >= k0 and first_key <= k1, a contiguous range [a, b) by the monotonicity above.
struct RowSpan {
  std::int64_t a, b;
};
template <class P>
inline RowSpan rows_seeing(const P& p, std::int64_t r0, std::int64_t r1, std::int64_t k0,
                           std::int64_t k1) {
  std::int64_t a = r0, b = r1;
  while (a < b && last_key(p, a) < k0) ++a;
  while (b > a && first_key(p, b - 1) > k1) --b;
  return {a, b};
}

// The key tiles [lo, hi) that some row of the call [q_first, q_first + q_count) sees.
struct KeyTiles {
  std::int64_t lo, hi;
};
template <class P>
inline KeyTiles key_tiles_seen(const P& p) {
  const RowSpan any = rows_seeing(p, p.q_first, p.q_first + p.q_count, 0, p.kv_total - 1);
  if (any.a >= any.b) return {0, 0};
  return {first_key(p, any.a) / kBc, last_key(p, any.b - 1) / kBc + 1};
}

// Index of the segment that holds global token i (segments are few: one per rank).
inline std::int64_t find_segment(const Segment* segs, std::int64_t n, std::int64_t i) {
  std::int64_t s = 0;
  while (s + 1 < n && i >= segs[s].begin + segs[s].tokens) ++s;
  return s;
}

template <class T>
inline float to_f32(T x) {
  if constexpr (sizeof(T) == 2)
    return f32_from_bf16(x);
  else
    return x;
}

struct ThreadBuffers {
  char* q_tile;
  float* scores;  // [kBr][kBc]; P after the softmax
  std::uint16_t* p_bf16;  // [kBr][kBc], for microkernels that multiply P in bf16
  float* acc;     // [kBr][Dp]
  float* row_max;
  float* row_sum;
  float* alpha;
};

inline ThreadBuffers thread_buffers(const Problem& p, int tid) {
  const ScratchLayout& L = p.layout;
  char* b = p.scratch + L.per_thread + static_cast<std::size_t>(tid) * L.thread_stride;
  return {b + L.q_tile,
          reinterpret_cast<float*>(b + L.scores),
          reinterpret_cast<std::uint16_t*>(b + L.p_bf16),
          reinterpret_cast<float*>(b + L.acc),
          reinterpret_cast<float*>(b + L.row_max),
          reinterpret_cast<float*>(b + L.row_sum),
          reinterpret_cast<float*>(b + L.alpha)};
}

// ---- fp32 microkernels (any V) -------------------------------------------------------------

// S[r][0, NC*W) = scale · Σ_d q[r][d] · Kᵀ[d][·] for MR rows; d ascending in every lane.
template <class V, int MR, int NC>
inline void qk_block(const float* q, std::int64_t D, const float* kt, float* s, float scale) {
  using F = typename V::F;
  F acc[MR][NC];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) acc[r][c] = V::zero();
  for (std::int64_t d = 0; d < D; ++d) {
    F b[NC];
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) b[c] = V::load(kt + d * kBc + c * V::W);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const F a = V::set1(q[r * D + d]);
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) acc[r][c] = V::fma(a, b[c], acc[r][c]);
    }
  }
  const F sc = V::set1(scale);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) V::store(s + r * kBc + c * V::W, V::mul(acc[r][c], sc));
}

// O[r][0, NC*W) = α[r]·O[r] + Σ_j P[r][j] · V[j][·] for MR rows; j ascending in every lane.
template <class V, int MR, int NC>
inline void pv_block(const float* P, const float* v, std::int64_t Dp, float* o, const float* alpha) {
  using F = typename V::F;
  F acc[MR][NC];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const F al = V::set1(alpha[r]);
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) acc[r][c] = V::mul(V::load(o + r * Dp + c * V::W), al);
  }
  for (std::int64_t j = 0; j < kBc; ++j) {
    F b[NC];
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) b[c] = V::load(v + j * Dp + c * V::W);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const F a = V::set1(P[r * kBc + j]);
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) acc[r][c] = V::fma(a, b[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) V::store(o + r * Dp + c * V::W, acc[r][c]);
}

// Calls f.template operator()<rows>() for a runtime row count in [1, 6].
template <class Fn>
inline void with_rows(std::int64_t rows, Fn&& f) {
  switch (rows) {
    case 1: f.template operator()<1>(); break;
    case 2: f.template operator()<2>(); break;
    case 3: f.template operator()<3>(); break;
    case 4: f.template operator()<4>(); break;
    case 5: f.template operator()<5>(); break;
    default: f.template operator()<6>(); break;
  }
}

// O[0, W) = α·O + Σ_{lo<=j<hi} P[j] · V[j][·] for one row: pv_block's per-lane arithmetic, keys
// [lo, hi) only.
template <class V>
inline void pv_range_vec(const float* P, const float* v, std::int64_t Dp, float* o, float alpha,
                         std::int64_t lo, std::int64_t hi) {
  using F = typename V::F;
  F acc = V::mul(V::load(o), V::set1(alpha));
  for (std::int64_t j = lo; j < hi; ++j) acc = V::fma(V::set1(P[j]), V::load(v + j * Dp), acc);
  V::store(o, acc);
}

template <class V>
struct MicroF32 {
  static_assert(V::kQkRows == 6 && V::kPvRows == 6, "with_rows dispatches up to 6 rows");
  static_assert(kBc % (V::kQkCols * V::W) == 0, "key tile must be whole Q·Kᵀ column blocks");

  template <class T>
  static void pack_q_typed(const Problem& p, std::int64_t h, std::int64_t r0, std::int64_t nr,
                           float* out) {
    const std::int64_t D = p.head_dim;
    std::int64_t s = find_segment(p.q, p.q_segments, r0);
    for (std::int64_t r = 0; r < nr; ++r) {
      const std::int64_t i = r0 + r;
      while (i >= p.q[s].begin + p.q[s].tokens) ++s;
      const Segment& g = p.q[s];
      const T* row = static_cast<const T*>(g.data) + (i - g.begin) * g.token_stride + h * g.head_stride;
      for (std::int64_t d = 0; d < D; ++d) out[r * D + d] = to_f32(row[d]);
    }
  }
  static void pack_q(const Problem& p, std::int64_t h, std::int64_t r0, std::int64_t nr, char* qt) {
    if (p.bf16)
      pack_q_typed<std::uint16_t>(p, h, r0, nr, reinterpret_cast<float*>(qt));
    else
      pack_q_typed<float>(p, h, r0, nr, reinterpret_cast<float*>(qt));
  }

  template <class T>
  static void pack_kv_typed(const Problem& p, std::int64_t kvh, std::int64_t t, float* K, float* Vt) {
    const std::int64_t D = p.head_dim, Dp = p.padded_dim, j0 = t * kBc;
    std::int64_t s = find_segment(p.k, p.kv_segments, j0);
    for (std::int64_t c = 0; c < kBc; ++c) {
      const std::int64_t j = j0 + c;
      if (j >= p.kv_total) {  // past the last key: zeros (their scores are masked to -inf)
        for (std::int64_t d = 0; d < D; ++d) K[d * kBc + c] = 0.0f;
        for (std::int64_t d = 0; d < Dp; ++d) Vt[c * Dp + d] = 0.0f;
        continue;
      }
      while (j >= p.k[s].begin + p.k[s].tokens) ++s;
      const Segment& ks = p.k[s];
      const Segment& vs = p.v[s];
      const T* kr = static_cast<const T*>(ks.data) + (j - ks.begin) * ks.token_stride + kvh * ks.head_stride;
      const T* vr = static_cast<const T*>(vs.data) + (j - vs.begin) * vs.token_stride + kvh * vs.head_stride;
      for (std::int64_t d = 0; d < D; ++d) K[d * kBc + c] = to_f32(kr[d]);
      for (std::int64_t d = 0; d < D; ++d) Vt[c * Dp + d] = to_f32(vr[d]);
      for (std::int64_t d = D; d < Dp; ++d) Vt[c * Dp + d] = 0.0f;
    }
  }
  static void pack_kv(const Problem& p, std::int64_t kvh, std::int64_t t, char* kt, char* vt) {
    if (p.bf16)
      pack_kv_typed<std::uint16_t>(p, kvh, t, reinterpret_cast<float*>(kt), reinterpret_cast<float*>(vt));
    else
      pack_kv_typed<float>(p, kvh, t, reinterpret_cast<float*>(kt), reinterpret_cast<float*>(vt));
  }

  static void qk(const Problem& p, const char* qt, const char* kt, float* S, std::int64_t a,
                 std::int64_t nr, float scale) {
    const std::int64_t D = p.head_dim;
    const auto* q = reinterpret_cast<const float*>(qt);
    const auto* k = reinterpret_cast<const float*>(kt);
    constexpr int NC = V::kQkCols;
    for (std::int64_t r = a; r < nr; r += 6)
      with_rows(min64(6, nr - r), [&]<int MR>() {
        for (std::int64_t c0 = 0; c0 < kBc; c0 += NC * V::W)
          qk_block<V, MR, NC>(q + r * D, D, k + c0, S + r * kBc + c0, scale);
      });
  }

  static void emit_p(const float*, std::uint16_t*) {}

  template <int MR>
  static void pv_rows(const float* P, const float* v, std::int64_t Dp, float* o, const float* alpha) {
    constexpr int NC = V::kPvCols;
    const std::int64_t nv = Dp / V::W;
    std::int64_t c = 0;
    for (; c + NC <= nv; c += NC) pv_block<V, MR, NC>(P, v + c * V::W, Dp, o + c * V::W, alpha);
    switch (nv - c) {  // Dp is a multiple of 16 floats, so only AVX-512 (NC 4) has a remainder
      case 0: break;
      case 1: pv_block<V, MR, 1>(P, v + c * V::W, Dp, o + c * V::W, alpha); break;
      case 2: if constexpr (NC > 2) pv_block<V, MR, 2>(P, v + c * V::W, Dp, o + c * V::W, alpha); break;
      default: if constexpr (NC > 3) pv_block<V, MR, 3>(P, v + c * V::W, Dp, o + c * V::W, alpha); break;
    }
  }

  static void pv(const Problem& p, const float* S, const std::uint16_t*, const char* vt, float* O,
                 const float* alpha, std::int64_t a, std::int64_t nr) {
    const std::int64_t Dp = p.padded_dim;
    const auto* v = reinterpret_cast<const float*>(vt);
    for (std::int64_t r = a; r < nr; r += 6)
      with_rows(min64(6, nr - r), [&]<int MR>() {
        pv_rows<MR>(S + r * kBc, v, Dp, O + r * Dp, alpha + r);
      });
  }

  // Row r of P·V over the tile's keys [lo, hi) only (see "Non-finite values" above).
  static void pv_range(const Problem& p, const float* S, const std::uint16_t*, const char* vt,
                       float* O, const float* alpha, std::int64_t r, std::int64_t lo, std::int64_t hi) {
    const std::int64_t Dp = p.padded_dim;
    const auto* v = reinterpret_cast<const float*>(vt);
    for (std::int64_t c = 0; c < Dp; c += V::W)
      pv_range_vec<V>(S + r * kBc, v + c, Dp, O + r * Dp + c, alpha[r], lo, hi);
  }
};

// ---- the driver ----------------------------------------------------------------------------

// Bit 0: V of kv head kvh holds a non-finite value (Inf or NaN) at a key of tile t; bit 1: K does.
inline bool row_nonfinite(const Problem& p, const void* data, std::int64_t off) {
  const std::int64_t D = p.head_dim;
  std::uint32_t bad = 0;
  if (p.bf16) {
    const auto* row = static_cast<const std::uint16_t*>(data) + off;
    for (std::int64_t d = 0; d < D; ++d) bad |= (row[d] & 0x7f80u) == 0x7f80u;
  } else {
    const auto* row = static_cast<const float*>(data) + off;
    for (std::int64_t d = 0; d < D; ++d) {
      std::uint32_t u;
      __builtin_memcpy(&u, row + d, sizeof u);
      bad |= (u & 0x7f800000u) == 0x7f800000u;
    }
  }
  return bad != 0;
}
inline unsigned char kv_tile_flags(const Problem& p, std::int64_t kvh, std::int64_t t) {
  const std::int64_t j0 = t * kBc, j1 = min64(j0 + kBc, p.kv_total);
  std::int64_t s = find_segment(p.v, p.kv_segments, j0);
  unsigned char flags = 0;
  for (std::int64_t j = j0; j < j1; ++j) {
    while (j >= p.v[s].begin + p.v[s].tokens) ++s;
    const Segment& vs = p.v[s];
    const Segment& ks = p.k[s];
    if (row_nonfinite(p, vs.data, (j - vs.begin) * vs.token_stride + kvh * vs.head_stride)) flags |= 1;
    if (row_nonfinite(p, ks.data, (j - ks.begin) * ks.token_stride + kvh * ks.head_stride)) flags |= 2;
  }
  return flags;
}

template <class V>
inline float exp2_scalar(float x) {
  alignas(64) float lanes[64 / sizeof(float)];
  V::store(lanes, V::exp2(V::set1(x)));
  return lanes[0];
}

// The keys of the tile at t0 that global row i sees: [lo, hi), non-empty for a row that sees the tile.
struct KeySpan {
  std::int64_t lo, hi;
};
inline KeySpan tile_keys(const Problem& p, std::int64_t i, std::int64_t t0) {
  const std::int64_t lo = first_key(p, i) - t0, hi = last_key(p, i) - t0 + 1;
  return {lo > 0 ? lo : 0, min64(hi, kBc)};
}

// Online-softmax update of rows [a, b) of a query tile (each sees some key of the tile at t0).
template <class V, class Mk>
inline void softmax_rows(const Problem& p, const ThreadBuffers& tb, std::int64_t r0,
                         std::int64_t t0, std::int64_t a, std::int64_t b, bool k_bad) {
  using F = typename V::F;
  constexpr int NV = static_cast<int>(kBc / V::W);
  for (std::int64_t r = a; r < b; ++r) {
    float* s = tb.scores + r * kBc;
    const KeySpan ks = tile_keys(p, r0 + r, t0);  // non-empty: tile_max below is a visible score
    // A NaN/Inf score (K holds NaN/Inf in this tile) makes the row NaN: exp2 below maps NaN to 0.
    bool nan_row = false;
    if (k_bad)
      for (std::int64_t c = ks.lo; c < ks.hi; ++c) nan_row |= !(s[c] - s[c] == 0.0f);
    for (std::int64_t c = 0; c < ks.lo; ++c) s[c] = -__builtin_inff();
    for (std::int64_t c = ks.hi; c < kBc; ++c) s[c] = -__builtin_inff();
    F mx = V::load(s);
#pragma GCC unroll 16
    for (int c = 1; c < NV; ++c) mx = V::max(mx, V::load(s + c * V::W));
    const float tile_max = V::hmax(mx);
    const float m_old = tb.row_max[r];
    const float m_new = m_old > tile_max ? m_old : tile_max;
    const float alpha = exp2_scalar<V>(m_old - m_new);  // 0 on the row's first tile (m_old = -inf)
    const F mn = V::set1(m_new);
    F sum = V::zero();
#pragma GCC unroll 16
    for (int c = 0; c < NV; ++c) {
      const F e = V::exp2(V::sub(V::load(s + c * V::W), mn));
      V::store(s + c * V::W, e);
      sum = V::add(sum, e);
    }
    tb.row_sum[r] = nan_row ? __builtin_nanf("") : tb.row_sum[r] * alpha + V::hsum(sum);
    tb.row_max[r] = m_new;
    tb.alpha[r] = alpha;
    Mk::emit_p(s, tb.p_bf16 + r * kBc);
  }
}

// Writes rows [0, nr) of the query tile at r0 for local head h: O / l, and lse.
inline void write_rows(const Problem& p, const ThreadBuffers& tb, std::int64_t h, std::int64_t r0,
                       std::int64_t nr) {
  const std::int64_t D = p.head_dim, Dp = p.padded_dim;
  std::int64_t s = find_segment(p.q, p.q_segments, r0);
  for (std::int64_t r = 0; r < nr; ++r) {
    const std::int64_t i = r0 + r;
    while (i >= p.q[s].begin + p.q[s].tokens) ++s;
    const OutSegment& os = p.out[s];
    const std::int64_t t = i - p.q[s].begin;
    const std::int64_t off = t * os.token_stride + h * os.head_stride;
    const bool none = first_key(p, i) > last_key(p, i);
    const float inv = none ? 0.0f : 1.0f / tb.row_sum[r];
    const float* o = tb.acc + r * Dp;
    if (p.bf16) {
      std::uint16_t* dst = static_cast<std::uint16_t*>(os.data) + off;
      for (std::int64_t d = 0; d < D; ++d) dst[d] = none ? 0 : bf16_from_f32(o[d] * inv);
    } else {
      float* dst = static_cast<float*>(os.data) + off;
      for (std::int64_t d = 0; d < D; ++d) dst[d] = none ? 0.0f : o[d] * inv;
    }
    if (os.lse)
      os.lse[t * os.lse_token_stride + h] =
          none ? -__builtin_inff() : (tb.row_max[r] + __builtin_log2f(tb.row_sum[r])) * kLn2;
  }
}

// One work item: local q head h (reading packed kv tiles kt/vt), query rows [r0, r0 + kBr).
template <class V, class Mk>
void attend_tile(const Problem& p, const ThreadBuffers& tb, const char* kpack, const char* vpack,
                 const unsigned char* v_bad, std::int64_t h, std::int64_t qtile) {
  const std::int64_t r0 = p.q_first + qtile * kBr, nr = min64(kBr, p.q_first + p.q_count - r0);
  const std::int64_t Dp = p.padded_dim;
  // Rows that see any key, and the keys they see together: [first of the first, last of the last]
  // (consecutive rows' intervals overlap or touch).
  const RowSpan any = rows_seeing(p, r0, r0 + nr, 0, p.kv_total - 1);
  if (any.a < any.b) {
    Mk::pack_q(p, h, r0, nr, tb.q_tile);
    for (std::int64_t r = 0; r < nr; ++r) {
      tb.row_max[r] = -__builtin_inff();
      tb.row_sum[r] = 0.0f;
      for (std::int64_t d = 0; d < Dp; ++d) tb.acc[r * Dp + d] = 0.0f;
    }
    const float scale = p.scale * kLog2e;
    const std::int64_t last = last_key(p, any.b - 1);
    for (std::int64_t t = first_key(p, any.a) / kBc, t0 = t * kBc; t0 <= last; ++t, t0 += kBc) {
      // Rows [a, b) see some key of this tile; the others skip it entirely.
      const RowSpan rs = rows_seeing(p, r0, r0 + nr, t0, min64(t0 + kBc, p.kv_total) - 1);
      const std::int64_t a = rs.a - r0, b = rs.b - r0;
      if (a >= b) continue;
      const char* kt = kpack + static_cast<std::size_t>(t) * p.layout.k_tile_bytes;
      const char* vt = vpack + static_cast<std::size_t>(t) * p.layout.v_tile_bytes;
      Mk::qk(p, tb.q_tile, kt, tb.scores, a, b, scale);
      softmax_rows<V, Mk>(p, tb, r0, t0, a, b, (v_bad[t] & 2) != 0);
      if (!(v_bad[t] & 1)) {
        Mk::pv(p, tb.scores, tb.p_bf16, vt, tb.acc, tb.alpha, a, b);
        continue;
      }
      // Non-finite V: rows that see only part of the tile take pv_range; the rows that see all of
      // it (first_key <= t0, last_key >= t0 + kBc - 1) are contiguous, [f0, f1), and take pv.
      std::int64_t f0 = b, f1 = b;
      for (std::int64_t r = a; r < b; ++r) {
        const KeySpan ks = tile_keys(p, r0 + r, t0);
        if (ks.lo == 0 && ks.hi == kBc) {
          f0 = f0 == b ? r : f0;
          f1 = r + 1;
        } else {
          Mk::pv_range(p, tb.scores, tb.p_bf16, vt, tb.acc, tb.alpha, r, ks.lo, ks.hi);
        }
      }
      Mk::pv(p, tb.scores, tb.p_bf16, vt, tb.acc, tb.alpha, f0, f1);
    }
  }
  write_rows(p, tb, h, r0, nr);
}

template <class V, class Mk>
void run_flash(const Problem& p) {
  if (p.q_heads == 0 || p.q_count == 0) return;
  const std::int64_t n_qt = (p.q_count + kBr - 1) / kBr;
  // Only the key tiles some row of the call sees are packed (with a window: a band of them).
  const KeyTiles seen = key_tiles_seen(p);
  char* kpack = p.scratch + p.layout.k_packed;
  char* vpack = p.scratch + p.layout.v_packed;
  auto* v_bad = reinterpret_cast<unsigned char*>(p.scratch + p.layout.v_bad);
  const int threads = p.threads < 1 ? 1 : p.threads;
  (void)threads;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    int tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    const ThreadBuffers tb = thread_buffers(p, tid);
    // Heads that share a kv head are consecutive: pack that kv head once, then run its q heads.
    for (std::int64_t h = 0; h < p.q_heads;) {
      const std::int64_t g = (p.q_head_begin + h) / p.group;
      const std::int64_t h_end = min64(p.q_heads, (g + 1) * p.group - p.q_head_begin);
      const std::int64_t kvh = g - p.kv_head_begin;
#pragma omp for schedule(static)
      for (std::int64_t t = seen.lo; t < seen.hi; ++t)
        Mk::pack_kv(p, kvh, t, kpack + static_cast<std::size_t>(t) * p.layout.k_tile_bytes,
                    vpack + static_cast<std::size_t>(t) * p.layout.v_tile_bytes);
      // (a separate loop: the packing loop's shape is what the benchmarks measured)
#pragma omp for schedule(static)
      for (std::int64_t t = seen.lo; t < seen.hi; ++t) v_bad[t] = kv_tile_flags(p, kvh, t);
      // Largest items first (causal: the last query tiles see the most keys; a window: all alike).
      const std::int64_t items = (h_end - h) * n_qt;
#pragma omp for schedule(dynamic, 1)
      for (std::int64_t w = 0; w < items; ++w)
        attend_tile<V, Mk>(p, tb, kpack, vpack, v_bad, h + w / n_qt, n_qt - 1 - w % n_qt);
      h = h_end;
    }
  }
}
