// Packed documents, batches and sliding windows on real MPI ranks, forward and backward.
//
// Every case draws document lengths (0 and 1 included, documents shorter than a rank's chunk and
// longer than several ranks), a per-rank cut of the sequence (ranks with no tokens included) and,
// for cross attention, separate key/value documents, from the case seed and the world size (CTest
// runs this binary at 1, 2, 3, 4, 5, 7, 8 ranks). Each rank's out, lse, dq, dk and dv are checked
//   1. against the float64 reference with the block-diagonal mask (each document on its own),
//   2. bitwise against the whole problem run through the library on one rank,
//   3. bitwise against each document run alone on one rank (a plan of that document only),
// with batched layouts [B][S][H][D] and [S][B][H][D] (a batch stride), causal, windows, GQA, fp32
// and bf16. Bad input (documents that do not sum to the totals, negative lengths, a window with a
// negative side, ranks disagreeing) gets the same clear error on every rank, buffers untouched.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "common/test_data.h"
#include "common/test_rng.h"
#include "kernels/kernel.h"
#include "mpi_test_util.h"
#include "uaa/backward.h"
#include "uaa/bf16.h"
#include "uaa/error.h"
#include "uaa/mpi.h"
#include "uaa/plan.h"

namespace uaa::test {
namespace {

struct Case {
  std::int64_t hq, hkv, dim;
  bool causal;
  std::int64_t window_left, window_right;
  std::int64_t batch;
  bool seq_major;  // [S][B][H][D] (a batch stride) instead of [B][S][H][D]
  bool cross;      // key/value documents of their own lengths
  int docs;
  std::int64_t max_doc;
  std::uint64_t seed;
  DType dtype = DType::f32;
  bool saved = true;
};

std::string case_name(const Case& c) {
  std::ostringstream os;
  auto side = [](std::int64_t w) { return w < 0 ? std::string("inf") : std::to_string(w); };
  os << "h" << c.hq << "kv" << c.hkv << "d" << c.dim << (c.causal ? "_causal" : "_full") << "_w"
     << side(c.window_left) << "_" << side(c.window_right) << "_b" << c.batch << (c.seq_major ? "seqMajor" : "")
     << (c.cross ? "_cross" : "") << "_docs" << c.docs << "x" << c.max_doc << "_s" << c.seed
     << (c.dtype == DType::bf16 ? "_bf16" : "") << (c.saved ? "_saved" : "_recompute");
  return os.str();
}

// Random lengths summing to `total` over n parts, some of them 0.
std::vector<std::int64_t> random_cut(Rng& rng, std::int64_t total, int n) {
  std::vector<std::int64_t> cuts = {0, total};
  for (int i = 1; i < n; ++i) cuts.push_back(rng.uniform(0, total));
  std::sort(cuts.begin(), cuts.end());
  std::vector<std::int64_t> out;
  for (int i = 0; i < n; ++i) out.push_back(cuts[i + 1] - cuts[i]);
  return out;
}

std::vector<std::int64_t> random_docs(Rng& rng, int n, std::int64_t max_doc) {
  std::vector<std::int64_t> d;
  for (int i = 0; i < n; ++i) {
    const std::int64_t kind = n == 1 ? 9 : rng.uniform(0, 9);  // a lone document is long
    d.push_back(kind == 0 ? 0 : kind == 1 ? 1 : rng.uniform(2, max_doc));
  }
  return d;
}

std::int64_t sum(const std::vector<std::int64_t>& v) {
  std::int64_t s = 0;
  for (std::int64_t x : v) s += x;
  return s;
}
std::vector<std::int64_t> starts(const std::vector<std::int64_t>& v) {
  std::vector<std::int64_t> s(v.size() + 1, 0);
  for (std::size_t i = 0; i < v.size(); ++i) s[i + 1] = s[i] + v[i];
  return s;
}

// The whole problem: every element a formula of (seed, tensor, sequence, global token, head, dim).
struct Problem {
  Case c;
  std::vector<std::int64_t> q_docs, kv_docs, q_lens, kv_lens;
  AttentionShape shape() const {
    AttentionShape s;
    s.q_heads = c.hq;
    s.kv_heads = c.hkv;
    s.head_dim = c.dim;
    s.dtype = c.dtype;
    s.causal = c.causal;
    s.return_lse = true;
    s.batch = c.batch;
    s.window_left = c.window_left;
    s.window_right = c.window_right;
    return s;
  }
  Documents documents() const { return Documents{q_docs, c.cross ? kv_docs : std::vector<std::int64_t>{}}; }
  float value(int tensor, std::int64_t b, std::int64_t token, std::int64_t h, std::int64_t d) const {
    const float f = element(c.seed, tensor, b * 1000003 + token, h, d);
    return c.dtype == DType::bf16 ? f32_from_bf16(bf16_from_f32(f)) : f;
  }
};

Problem make_problem(const Case& c, int P) {
  Problem p;
  p.c = c;
  Rng rng(c.seed * 1000 + static_cast<std::uint64_t>(P));
  p.q_docs = random_docs(rng, c.docs, c.max_doc);
  p.kv_docs = c.cross ? random_docs(rng, c.docs, c.max_doc) : p.q_docs;
  p.q_lens = random_cut(rng, sum(p.q_docs), P);
  p.kv_lens = c.cross ? random_cut(rng, sum(p.kv_docs), P) : p.q_lens;
  return p;
}

// A batched [B][n][H][D] (or [n][B][H][D]) buffer of f32 or bf16 elements.
struct Buf {
  DType dtype = DType::f32;
  std::int64_t B = 1, n = 0, H = 0, D = 0;
  bool seq_major = false;
  std::vector<float> f;
  std::vector<std::uint16_t> h16;
  std::int64_t index(std::int64_t b, std::int64_t t, std::int64_t h, std::int64_t d) const {
    return (seq_major ? (t * B + b) : (b * n + t)) * H * D + h * D + d;
  }
  float get(std::int64_t i) const { return dtype == DType::bf16 ? f32_from_bf16(h16[i]) : f[i]; }
  void set(std::int64_t i, float v) {
    if (dtype == DType::bf16) h16[i] = bf16_from_f32(v);
    else f[i] = v;
  }
  std::uint32_t bits(std::int64_t i) const {
    if (dtype == DType::bf16) return h16[i];
    std::uint32_t u;
    std::memcpy(&u, &f[i], 4);
    return u;
  }
  void* data() {
    return B * n * H == 0 ? nullptr
           : dtype == DType::bf16 ? static_cast<void*>(h16.data()) : static_cast<void*>(f.data());
  }
  Tensor view() {
    Tensor t{data(), n, H, D, seq_major ? B * H * D : H * D, D, dtype};
    t.batch_stride = seq_major ? H * D : 0;
    return t;
  }
};

Buf make_buf(DType dtype, std::int64_t B, std::int64_t n, std::int64_t H, std::int64_t D, bool seq_major,
             float fill) {
  Buf b;
  b.dtype = dtype;
  b.B = B;
  b.n = n;
  b.H = H;
  b.D = D;
  b.seq_major = seq_major;
  const std::size_t size = static_cast<std::size_t>(B * n * H * D);
  if (dtype == DType::bf16) b.h16.assign(size, bf16_from_f32(fill));
  else b.f.assign(size, fill);
  return b;
}

// Tensor `tensor` of sequence rows [first, first + n) (queries or keys), as a buffer.
Buf input(const Problem& p, int tensor, std::int64_t first, std::int64_t n, std::int64_t H,
          bool seq_major) {
  Buf b = make_buf(p.c.dtype, p.c.batch, n, H, p.c.dim, seq_major, 0.0f);
  for (std::int64_t s = 0; s < p.c.batch; ++s)
    for (std::int64_t t = 0; t < n; ++t)
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t d = 0; d < p.c.dim; ++d)
          b.set(b.index(s, t, h, d), p.value(tensor, s, first + t, h, d));
  return b;
}

// One forward + backward through the library: outputs in the same layout as the inputs.
struct Outputs {
  Buf out, dq, dk, dv;
  std::vector<float> lse;  // [B][n][Hq] (or [n][B][Hq] when seq_major)
  bool seq_major = false;
  std::int64_t B = 1, n = 0, Hq = 0;
  float lse_at(std::int64_t b, std::int64_t t, std::int64_t h) const {
    return lse[static_cast<std::size_t>((seq_major ? t * B + b : b * n + t) * Hq + h)];
  }
};

Outputs run(const Plan& plan, const Problem& p, std::int64_t q_first, std::int64_t nq,
            std::int64_t kv_first, std::int64_t nkv, bool seq_major, bool saved_mode) {
  const Case& c = p.c;
  const AttentionShape& s = plan.shape();
  const std::int64_t B = s.batch;
  Buf q = input(p, 0, q_first, nq, c.hq, seq_major), k = input(p, 1, kv_first, nkv, c.hkv, seq_major),
      v = input(p, 2, kv_first, nkv, c.hkv, seq_major), dout = input(p, 5, q_first, nq, c.hq, seq_major);
  Outputs o;
  o.seq_major = seq_major;
  o.B = B;
  o.n = nq;
  o.Hq = c.hq;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  o.out = make_buf(c.dtype, B, nq, c.hq, c.dim, seq_major, nan);
  o.dq = make_buf(c.dtype, B, nq, c.hq, c.dim, seq_major, nan);
  o.dk = make_buf(c.dtype, B, nkv, c.hkv, c.dim, seq_major, nan);
  o.dv = make_buf(c.dtype, B, nkv, c.hkv, c.dim, seq_major, nan);
  o.lse.assign(static_cast<std::size_t>(B * nq * c.hq), nan);
  AttentionArgs a;
  a.q = q.view();
  a.k = k.view();
  a.v = v.view();
  a.out = o.out.view();
  a.lse = o.lse.empty() ? nullptr : o.lse.data();
  a.lse_token_stride = seq_major ? B * c.hq : 0;
  a.lse_batch_stride = seq_major ? c.hq : 0;
  Workspace ws;
  SavedForward sf;
  if (saved_mode) forward(plan, a, ws, sf);
  else forward(plan, a, ws);
  BackwardArgs g;
  g.q = a.q;
  g.k = a.k;
  g.v = a.v;
  g.out = o.out.view();
  g.lse = a.lse;
  g.lse_token_stride = a.lse_token_stride;
  g.lse_batch_stride = a.lse_batch_stride;
  g.dout = dout.view();
  g.dq = o.dq.view();
  g.dk = o.dk.view();
  g.dv = o.dv.view();
  if (saved_mode) backward(plan, g, ws, sf);
  else backward(plan, g, ws);
  return o;
}

// Float64 reference of one document of one sequence: out/lse [Sq][Hq], dq [Sq], dk/dv [Skv].
struct DocRef {
  std::vector<double> out, lse, dq, dk, dv;
};
DocRef reference(const Problem& p, std::int64_t b, std::int64_t qs, std::int64_t nq, std::int64_t ks,
                 std::int64_t nk) {
  const Case& c = p.c;
  auto dense = [&](int tensor, std::int64_t first, std::int64_t n, std::int64_t H) {
    std::vector<float> x(static_cast<std::size_t>(n * H * c.dim));
    std::size_t i = 0;
    for (std::int64_t t = 0; t < n; ++t)
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t d = 0; d < c.dim; ++d) x[i++] = p.value(tensor, b, first + t, h, d);
    return x;
  };
  const std::vector<float> q = dense(0, qs, nq, c.hq), k = dense(1, ks, nk, c.hkv),
                           v = dense(2, ks, nk, c.hkv), dout = dense(5, qs, nq, c.hq);
  DocRef r;
  r.out.resize(q.size());
  r.lse.resize(static_cast<std::size_t>(nq * c.hq));
  r.dq.resize(q.size());
  r.dk.resize(k.size());
  r.dv.resize(k.size());
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.dim));
  detail::reference_attention(q.data(), k.data(), v.data(), nq, nk, c.hq, c.hkv, c.dim, scale,
                              c.causal, r.out.data(), r.lse.data(), c.window_left, c.window_right);
  detail::reference_attention_backward(q.data(), k.data(), v.data(), dout.data(), nq, nk, c.hq, c.hkv,
                                       c.dim, scale, c.causal, r.dq.data(), r.dk.data(), r.dv.data(),
                                       c.window_left, c.window_right);
  return r;
}

// Counts disagreements between this rank's outputs and a reference run's, over rows
// [first, first + n) of the reference (at `at` in this rank's buffers).
struct Diff {
  std::int64_t bit_mismatches = 0;
  double max_err = 0;
  std::string first;
  void note(const std::string& what) {
    if (first.empty()) first = what;
  }
};

void compare_bits(const Buf& mine, std::int64_t b, std::int64_t at, const Buf& ref, std::int64_t rb,
                  std::int64_t rat, std::int64_t n, const char* name, Diff& diff) {
  for (std::int64_t t = 0; t < n; ++t)
    for (std::int64_t h = 0; h < mine.H; ++h)
      for (std::int64_t d = 0; d < mine.D; ++d)
        if (mine.bits(mine.index(b, at + t, h, d)) != ref.bits(ref.index(rb, rat + t, h, d))) {
          ++diff.bit_mismatches;
          diff.note(std::string(name) + " seq " + std::to_string(b) + " local token " +
                    std::to_string(at + t) + " head " + std::to_string(h));
        }
}
void compare_lse_bits(const Outputs& mine, std::int64_t b, std::int64_t at, const Outputs& ref,
                      std::int64_t rb, std::int64_t rat, std::int64_t n, Diff& diff) {
  for (std::int64_t t = 0; t < n; ++t)
    for (std::int64_t h = 0; h < mine.Hq; ++h) {
      const float x = mine.lse_at(b, at + t, h), y = ref.lse_at(rb, rat + t, h);
      if (std::memcmp(&x, &y, 4) != 0) {
        ++diff.bit_mismatches;
        diff.note("lse seq " + std::to_string(b) + " local token " + std::to_string(at + t));
      }
    }
}
void compare_ref(const Buf& mine, std::int64_t b, std::int64_t at, const std::vector<double>& ref,
                 std::int64_t rat, std::int64_t n, const char* name, Diff& diff) {
  for (std::int64_t t = 0; t < n; ++t)
    for (std::int64_t h = 0; h < mine.H; ++h)
      for (std::int64_t d = 0; d < mine.D; ++d) {
        const double e = std::abs(mine.get(mine.index(b, at + t, h, d)) -
                                  ref[static_cast<std::size_t>(((rat + t) * mine.H + h) * mine.D + d)]);
        if (!(e <= diff.max_err)) {
          diff.max_err = std::isnan(e) ? std::numeric_limits<double>::infinity() : e;
          if (std::isnan(e)) diff.note(std::string(name) + " NaN at local token " + std::to_string(at + t));
        }
      }
}

class Documents_ : public ::testing::TestWithParam<Case> {};

TEST_P(Documents_, MatchReferenceWholeRunAndDocumentsAlone) {
  const Case& c = GetParam();
  const int P = world_size(), me = world_rank();
  const Problem p = make_problem(c, P);
  auto world = make_mpi_communicator(MPI_COMM_WORLD);
  auto self = make_mpi_communicator(MPI_COMM_SELF);
  const std::vector<std::int64_t> q_start = starts(p.q_lens), kv_start = starts(p.kv_lens);
  const std::vector<std::int64_t> qd = starts(p.q_docs), kd = starts(p.kv_docs);
  const std::int64_t q0 = q_start[me], nq = p.q_lens[me], k0 = kv_start[me], nk = p.kv_lens[me];

  Outputs mine;
  const Outcome o = capture([&] {
    const Plan plan = Plan::create(*world, p.shape(), nq, nk, p.documents());
    mine = run(plan, p, q0, nq, k0, nk, c.seq_major, c.saved);
  });
  expect_ok_everywhere(o);
  if (o.kind != Outcome::ok) return;

  // 2. The whole problem on one rank ([B][S][H][D]).
  const Plan whole_plan =
      Plan::from_lengths(*self, p.shape(), {sum(p.q_docs)}, {sum(p.kv_docs)}, p.documents());
  const Outputs whole = run(whole_plan, p, 0, sum(p.q_docs), 0, sum(p.kv_docs), false, true);
  Diff vs_whole;
  for (std::int64_t b = 0; b < c.batch; ++b) {
    compare_bits(mine.out, b, 0, whole.out, b, q0, nq, "out", vs_whole);
    compare_lse_bits(mine, b, 0, whole, b, q0, nq, vs_whole);
    compare_bits(mine.dq, b, 0, whole.dq, b, q0, nq, "dq", vs_whole);
    compare_bits(mine.dk, b, 0, whole.dk, b, k0, nk, "dk", vs_whole);
    compare_bits(mine.dv, b, 0, whole.dv, b, k0, nk, "dv", vs_whole);
  }
  EXPECT_EQ(vs_whole.bit_mismatches, 0) << "rank " << me << " vs one rank: first at " << vs_whole.first;

  // 1 and 3: each document of each sequence alone (one rank, batch 1, no documents), and float64.
  AttentionShape alone = p.shape();
  alone.batch = 1;
  Diff vs_alone, out_ref, grad_ref;
  for (std::int64_t b = 0; b < c.batch; ++b)
    for (std::size_t d = 0; d < p.q_docs.size(); ++d) {
      // This rank's rows and keys of document d, in document positions.
      const std::int64_t r0 = std::max(q0, qd[d]), r1 = std::min(q0 + nq, qd[d + 1]);
      const std::int64_t j0 = std::max(k0, kd[d]), j1 = std::min(k0 + nk, kd[d + 1]);
      if (r1 <= r0 && j1 <= j0) continue;
      const Plan plan = Plan::from_lengths(*self, alone, {p.q_docs[d]}, {p.kv_docs[d]});
      // Sequence b's tokens from the document's start: value(tensor, b, pos) is the token index
      // b * 1000003 + pos of sequence 0, which a batch-1 run reads.
      Problem one = p;
      one.c.batch = 1;
      const Outputs a = run(plan, one, b * 1000003 + qd[d], p.q_docs[d], b * 1000003 + kd[d],
                            p.kv_docs[d], false, true);
      if (r1 > r0) {
        compare_bits(mine.out, b, r0 - q0, a.out, 0, r0 - qd[d], r1 - r0, "out (alone)", vs_alone);
        compare_lse_bits(mine, b, r0 - q0, a, 0, r0 - qd[d], r1 - r0, vs_alone);
        compare_bits(mine.dq, b, r0 - q0, a.dq, 0, r0 - qd[d], r1 - r0, "dq (alone)", vs_alone);
      }
      if (j1 > j0) {
        compare_bits(mine.dk, b, j0 - k0, a.dk, 0, j0 - kd[d], j1 - j0, "dk (alone)", vs_alone);
        compare_bits(mine.dv, b, j0 - k0, a.dv, 0, j0 - kd[d], j1 - j0, "dv (alone)", vs_alone);
      }
      const DocRef ref = reference(p, b, qd[d], p.q_docs[d], kd[d], p.kv_docs[d]);
      if (r1 > r0) {
        compare_ref(mine.out, b, r0 - q0, ref.out, r0 - qd[d], r1 - r0, "out", out_ref);
        compare_ref(mine.dq, b, r0 - q0, ref.dq, r0 - qd[d], r1 - r0, "dq", grad_ref);
        for (std::int64_t t = r0; t < r1; ++t)
          for (std::int64_t h = 0; h < c.hq; ++h) {
            const double want = ref.lse[static_cast<std::size_t>((t - qd[d]) * c.hq + h)];
            const double got = mine.lse_at(b, t - q0, h);
            const double e = std::isinf(want) && want == got ? 0.0 : std::abs(got - want);
            if (!(e <= 1e-4)) out_ref.note("lse at local token " + std::to_string(t - q0));
          }
      }
      if (j1 > j0) {
        compare_ref(mine.dk, b, j0 - k0, ref.dk, j0 - kd[d], j1 - j0, "dk", grad_ref);
        compare_ref(mine.dv, b, j0 - k0, ref.dv, j0 - kd[d], j1 - j0, "dv", grad_ref);
      }
    }
  EXPECT_EQ(vs_alone.bit_mismatches, 0) << "rank " << me << " vs documents alone: first at " << vs_alone.first;
  // Inputs lie in [-1, 1). fp32: the flash kernels' error is ~1e-6 here; bf16 rounds P, dS and the
  // results to 8 bits (2^-9 relative), which bounds the error well below 2^-5 at these sizes.
  const double tol_out = c.dtype == DType::bf16 ? 0.03 : 2e-5;
  const double tol_grad = c.dtype == DType::bf16 ? 0.1 : 1e-4;
  EXPECT_LE(out_ref.max_err, tol_out) << "rank " << me << " out vs float64";
  EXPECT_TRUE(out_ref.first.empty()) << "rank " << me << ": " << out_ref.first;
  EXPECT_LE(grad_ref.max_err, tol_grad) << "rank " << me << " gradients vs float64 " << grad_ref.first;
}

const Case kCases[] = {
    // hq hkv dim causal  wl  wr  B  seqMajor cross docs max  seed
    {4, 2, 16, true, -1, -1, 1, false, false, 9, 70, 1},
    {3, 3, 8, false, -1, -1, 1, false, false, 12, 40, 2},
    {6, 2, 8, true, -1, -1, 1, false, false, 5, 160, 3, DType::f32, false},
    {2, 1, 16, false, -1, -1, 1, false, true, 7, 60, 4},
    {2, 2, 8, true, -1, -1, 1, false, true, 8, 90, 5},
    {4, 4, 8, true, 17, -1, 1, false, false, 6, 120, 6},
    {3, 1, 8, false, 5, 9, 1, false, false, 6, 100, 7},
    {2, 2, 16, false, 30, 0, 1, false, true, 5, 80, 8},
    {4, 2, 8, false, -1, -1, 2, false, false, 1, 150, 9},
    {3, 3, 8, true, -1, -1, 3, true, false, 1, 130, 10},
    {2, 1, 8, true, -1, -1, 2, true, false, 6, 50, 11, DType::f32, false},
    {5, 5, 8, false, 20, 3, 2, false, false, 4, 70, 12},
    {5, 5, 8, false, -1, -1, 2, false, false, 4, 70, 15},
    {5, 5, 8, false, -1, -1, 2, false, false, 1, 150, 16},
    {5, 5, 8, false, 20, 3, 1, false, false, 4, 70, 17},
    {4, 2, 16, true, -1, -1, 1, false, false, 9, 70, 13, DType::bf16},
    {2, 2, 16, false, 12, 12, 2, true, true, 5, 60, 14, DType::bf16, false},
};

INSTANTIATE_TEST_SUITE_P(Cases, Documents_, ::testing::ValuesIn(kCases),
                         [](const ::testing::TestParamInfo<Case>& i) { return case_name(i.param); });

// ---- Bad input ------------------------------------------------------------------------------

AttentionShape small_shape() {
  AttentionShape s;
  s.q_heads = 2;
  s.head_dim = 8;
  s.return_lse = true;
  return s;
}

TEST(DocumentErrors, DocumentsNotSummingToTheTotalsFailEverywhere) {
  auto world = make_mpi_communicator(MPI_COMM_WORLD);
  const Outcome o = capture([&] { Plan::create(*world, small_shape(), 10, 10, Documents{{3, 4}, {}}); });
  expect_same_error_everywhere(o, ErrorCode::invalid_argument, -1,
                               {"uaa::Plan::create", "sum to 7", std::to_string(10 * world_size())});
}

TEST(DocumentErrors, NegativeLengthOnOneRankFailsEverywhere) {
  auto world = make_mpi_communicator(MPI_COMM_WORLD);
  const int bad = world_size() - 1;
  Documents d{{5, 5}, {}};
  if (world_rank() == bad) d.q = {12, -2};
  const Outcome o = capture([&] { Plan::create(*world, small_shape(), 10, 10, d); });
  expect_same_error_everywhere(o, ErrorCode::invalid_argument, bad, {"query length 1 is -2"});
}

TEST(DocumentErrors, UnequalDocumentCountsFail) {
  auto world = make_mpi_communicator(MPI_COMM_WORLD);
  const Outcome o = capture([&] { Plan::create(*world, small_shape(), 5, 5, Documents{{5}, {2, 3}}); });
  expect_same_error_everywhere(o, ErrorCode::invalid_argument, 0, {"1 query lengths but 2"});
}

TEST(DocumentErrors, NegativeWindowFailsEverywhere) {
  auto world = make_mpi_communicator(MPI_COMM_WORLD);
  AttentionShape s = small_shape();
  if (world_rank() == 0) s.window_left = -3;
  const Outcome o = capture([&] { Plan::create(*world, s, 4, 4); });
  expect_same_error_everywhere(o, ErrorCode::invalid_argument, 0, {"window_left -3"});
}

TEST(DocumentErrors, RanksDisagreeingOnDocumentsGetMismatch) {
  auto world = make_mpi_communicator(MPI_COMM_WORLD);
  const int P = world_size();
  if (P < 2) GTEST_SKIP() << "needs 2 ranks";
  Documents d{{4 * P - 3, 3}, {}};
  if (world_rank() == 1) d.q = {4 * P - 2, 2};
  const Outcome o = capture([&] { Plan::create(*world, small_shape(), 4, 4, d); });
  expect_same_error_everywhere(o, ErrorCode::mismatch, -1, {"documents", "rank 1"});
}

TEST(DocumentErrors, FromLengthsDisagreementIsCaughtByTheFirstCall) {
  auto world = make_mpi_communicator(MPI_COMM_WORLD);
  const int P = world_size();
  if (P < 2) GTEST_SKIP() << "needs 2 ranks";
  Documents d{{2 * P - 1, 1}, {}};
  if (world_rank() == 1) d.q = {2 * P - 2, 2};
  std::vector<float> q(2 * 2 * 8, 0.5f), out(2 * 2 * 8, 7.0f), lse(2 * 2, 7.0f);
  const Plan plan = Plan::from_lengths(*world, small_shape(), std::vector<std::int64_t>(P, 2),
                                       std::vector<std::int64_t>(P, 2), d);
  AttentionArgs a;
  a.q = a.k = a.v = contiguous(q.data(), 2, 2, 8);
  a.out = contiguous(out.data(), 2, 2, 8);
  a.lse = lse.data();
  Workspace ws;
  const Outcome o = capture([&] { forward(plan, a, ws); });
  expect_same_error_everywhere(o, ErrorCode::mismatch, -1, {});
  for (float x : out) EXPECT_EQ(x, 7.0f);
}

TEST(DocumentErrors, DocumentsNeedTheUaaStrategy) {
  auto world = make_mpi_communicator(MPI_COMM_WORLD);
  PlanOptions opt;
  opt.strategy = Strategy::allgather_kv;
  const Outcome o = capture([&] {
    Plan::create(*world, small_shape(), 4, 4, Documents{{2 * world_size(), 2 * world_size()}, {}}, opt);
  });
  expect_same_error_everywhere(o, ErrorCode::unsupported, -1, {"strategy uaa"});
}

TEST(DocumentErrors, OverlappingBatchStrideOnOneRankFailsEverywhereUntouched) {
  auto world = make_mpi_communicator(MPI_COMM_WORLD);
  const int bad = world_size() / 2;
  AttentionShape s = small_shape();
  s.batch = 2;
  const Plan plan = Plan::create(*world, s, 3, 3);
  std::vector<float> q(2 * 3 * 2 * 8, 0.25f), out(2 * 3 * 2 * 8, 7.0f), lse(2 * 3 * 2, 7.0f);
  AttentionArgs a;
  a.q = a.k = a.v = contiguous(q.data(), 3, 2, 8);
  a.out = contiguous(out.data(), 3, 2, 8);
  if (world_rank() == bad) a.out.batch_stride = 16;  // sequence 1 starts inside sequence 0's rows
  a.lse = lse.data();
  Workspace ws;
  const Outcome o = capture([&] { forward(plan, a, ws); });
  expect_same_error_everywhere(o, ErrorCode::invalid_argument, bad, {"out strides", "batch 16"});
  for (float x : out) EXPECT_EQ(x, 7.0f);
  for (float x : lse) EXPECT_EQ(x, 7.0f);
}

TEST(DocumentErrors, BackwardGradientOverlappingAnInputThroughItsBatchStrideFailsEverywhere) {
  auto world = make_mpi_communicator(MPI_COMM_WORLD);
  const int bad = world_size() - 1;
  AttentionShape s = small_shape();
  s.batch = 2;
  const Plan plan = Plan::create(*world, s, 3, 3, Documents{{world_size(), 2 * world_size()}, {}});
  const std::size_t n = 2 * 3 * 2 * 8;
  std::vector<float> q(n, 0.25f), out(n, 0.0f), lse(2 * 3 * 2, 0.0f), dout(n, 0.5f);
  std::vector<float> grads(3 * n, 7.0f);  // [dv | dk | dq]
  AttentionArgs a;
  a.q = a.k = a.v = contiguous(q.data(), 3, 2, 8);
  a.out = contiguous(out.data(), 3, 2, 8);
  a.lse = lse.data();
  Workspace ws;
  forward(plan, a, ws);
  BackwardArgs g;
  g.q = g.k = g.v = a.q;
  g.out = a.out;
  g.lse = lse.data();
  g.dout = contiguous(dout.data(), 3, 2, 8);
  g.dv = contiguous(grads.data(), 3, 2, 8);
  g.dk = contiguous(grads.data() + n, 3, 2, 8);
  g.dq = contiguous(grads.data() + 2 * n, 3, 2, 8);
  // On one rank dv's second sequence lands on dk's first.
  if (world_rank() == bad) g.dv.batch_stride = static_cast<std::int64_t>(n);
  const Outcome o = capture([&] { backward(plan, g, ws); });
  expect_same_error_everywhere(o, ErrorCode::invalid_argument, bad, {"uaa::backward", "overlaps"});
  for (float x : grads) EXPECT_EQ(x, 7.0f);
}

}  // namespace
}  // namespace uaa::test
