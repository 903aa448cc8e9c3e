// Unit tests of the pure layout math (src/plan/layout.h): head partition, kv heads under GQA/MQA,
// per-peer counts and displacements of both exchanges, computed for every rank of a world at once so
// that what r sends to j can be checked against what j expects from r.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "common/test_rng.h"
#include "plan/layout.h"

namespace {

using uaa::detail::align_up;
using uaa::detail::compute_layout;
using uaa::detail::ExchangeSide;
using uaa::detail::HeadRange;
using uaa::detail::kBlockAlign;
using uaa::detail::Layout;
using uaa::detail::LayoutInput;
using uaa::detail::RankWork;
using uaa::detail::RowRange;
using uaa::detail::rows_held;
using uaa::detail::split_work;
using uaa::detail::WorkInput;
using uaa::detail::WorkPiece;

constexpr std::int64_t kGranule = 48;  // kQueryRowGranule

std::vector<std::int64_t> divisors(std::int64_t n) {
  std::vector<std::int64_t> d;
  for (std::int64_t i = 1; i <= n; ++i)
    if (n % i == 0) d.push_back(i);
  return d;
}

// Brute force: keys global query row i sees, plus one (the split's weight of a row).
std::int64_t row_weight(const WorkInput& in, std::int64_t i) {
  std::int64_t keys = in.kv_total;
  if (in.causal) keys = std::clamp<std::int64_t>(i + in.kv_total - in.q_total + 1, 0, in.kv_total);
  return keys + 1;
}

std::int64_t work_of(const WorkInput& in, const RankWork& w) {
  std::int64_t sum = 0;
  for (int i = 0; i < w.pieces; ++i)
    for (std::int64_t r = w.piece[i].rows.begin; r < w.piece[i].rows.end; ++r)
      sum += row_weight(in, r) * w.piece[i].heads.size();
  return sum;
}

// Every (head, row) pair is computed by exactly one rank, ranks follow each other in head-major
// order, cuts inside a head fall on granule multiples, pieces describe exactly the range.
void check_split(const WorkInput& in) {
  SCOPED_TRACE(::testing::Message() << "heads " << in.q_heads << "/" << in.kv_heads << " q "
                                    << in.q_total << " kv " << in.kv_total << " causal "
                                    << in.causal << " ranks " << in.ranks);
  const std::vector<RankWork> work = split_work(in);
  ASSERT_EQ(static_cast<int>(work.size()), in.ranks);
  const std::int64_t H = in.q_heads, S = in.q_total, group = in.q_heads / in.kv_heads;
  std::vector<int> owner(static_cast<std::size_t>(H * S), -1);
  std::int64_t at_head = 0, at_row = 0;
  for (int r = 0; r < in.ranks; ++r) {
    const RankWork& w = work[r];
    SCOPED_TRACE(::testing::Message() << "rank " << r);
    if (S > 0) {
      ASSERT_EQ(w.first_head, at_head);
      ASSERT_EQ(w.first_row, at_row);
    }
    EXPECT_EQ(w.first_row % kGranule, 0);
    EXPECT_EQ(w.end_row % kGranule, 0);
    EXPECT_LT(w.first_row, std::max<std::int64_t>(S, 1));
    ASSERT_LE(w.pieces, 3);
    std::set<std::int64_t> kv_needed;
    for (int i = 0; i < w.pieces; ++i) {
      const WorkPiece& p = w.piece[i];
      EXPECT_GT(p.heads.size(), 0);
      EXPECT_GT(p.rows.size(), 0);
      EXPECT_GE(p.rows.begin, 0);
      EXPECT_LE(p.rows.end, S);
      if (p.heads.size() > 1) {
        EXPECT_TRUE(p.rows.begin == 0 && p.rows.end == S);
      }
      for (std::int64_t h = p.heads.begin; h < p.heads.end; ++h) {
        kv_needed.insert(h / group);
        for (std::int64_t row = p.rows.begin; row < p.rows.end; ++row) {
          int& o = owner[static_cast<std::size_t>(h * S + row)];
          ASSERT_EQ(o, -1) << "(" << h << ", " << row << ") computed twice";
          o = r;
        }
      }
    }
    std::set<std::int64_t> kv_got;
    for (std::int64_t h = w.kv_heads.begin; h < w.kv_heads.end; ++h) kv_got.insert(h);
    EXPECT_EQ(kv_got, kv_needed) << "key/value heads received are not exactly the ones read";
    if (w.pieces > 0) {
      EXPECT_EQ(w.q_heads.begin, w.piece[0].heads.begin);
      EXPECT_EQ(w.q_heads.end, w.piece[w.pieces - 1].heads.end);
    }
    at_head = w.end_head;
    at_row = w.end_row;
  }
  if (S > 0 && H > 0) {
    EXPECT_EQ(at_head, H);
    EXPECT_EQ(at_row, 0);
  }
  for (std::size_t i = 0; i < owner.size(); ++i)
    ASSERT_NE(owner[i], -1) << "(" << i / S << ", " << i % S << ") computed by nobody";

  // Whole heads, in the plain Ulysses ranges, when the heads divide.
  if (S > 0 && H % in.ranks == 0) {
    for (int r = 0; r < in.ranks; ++r) {
      const RankWork& w = work[r];
      ASSERT_EQ(w.pieces, 1) << "rank " << r;
      EXPECT_EQ(w.piece[0].heads.begin, r * H / in.ranks);
      EXPECT_EQ(w.piece[0].heads.end, (r + 1) * H / in.ranks);
      EXPECT_EQ(w.piece[0].rows.begin, 0);
      EXPECT_EQ(w.piece[0].rows.end, S);
    }
  }
  // Balanced: no rank exceeds the ideal share by more than one granule of its heaviest rows.
  std::int64_t total = 0, heaviest_granule = 0;
  for (std::int64_t row = 0; row < S; ++row) total += row_weight(in, row);
  for (std::int64_t row = std::max<std::int64_t>(0, S - kGranule); row < S; ++row)
    heaviest_granule += row_weight(in, row);
  total *= H;
  for (int r = 0; r < in.ranks; ++r)
    EXPECT_LE(work_of(in, work[r]) * in.ranks, total + 2 * heaviest_granule * in.ranks)
        << "rank " << r << " does " << work_of(in, work[r]) << " of " << total;
}

TEST(WorkSplit, TilesBalancesAndReadsExactlyItsKvHeads) {
  const std::int64_t heads[] = {1, 2, 3, 7, 8, 24, 30};
  const std::int64_t lens[] = {0, 1, 47, 48, 49, 100, 1000, 4097};
  for (std::int64_t hq : heads)
    for (std::int64_t hkv : divisors(hq))
      for (std::int64_t S : lens)
        for (int ranks : {1, 2, 3, 4, 5, 8, 16, 33})
          for (bool causal : {false, true}) {
            WorkInput in;
            in.q_heads = hq;
            in.kv_heads = hkv;
            in.q_total = S;
            in.kv_total = causal ? S + S / 3 : S / 2 + 1;
            in.causal = causal;
            in.ranks = ranks;
            check_split(in);
            if (::testing::Test::HasFatalFailure()) return;
          }
}

TEST(WorkSplit, ThirtyHeadsOnFourRanksAreSevenAndAHalfEach) {
  WorkInput in;
  in.q_heads = in.kv_heads = 30;
  in.q_total = in.kv_total = 4096;
  in.ranks = 4;
  const std::vector<RankWork> w = split_work(in);
  // 7.5 heads per rank: rank 0 ends half-way (at a granule) through head 7.
  EXPECT_EQ(w[0].first_head, 0);
  EXPECT_EQ(w[0].end_head, 7);
  EXPECT_EQ(w[0].end_row, 2064);  // first multiple of 48 at or past 2048
  EXPECT_EQ(w[1].first_head, 7);
  EXPECT_EQ(w[1].first_row, 2064);
  EXPECT_EQ(w[1].end_head, 15);
  EXPECT_EQ(w[1].end_row, 0);
  EXPECT_EQ(w[0].kv_heads.end, 8);    // head 7's keys and values go to ranks 0 and 1
  EXPECT_EQ(w[1].kv_heads.begin, 7);
}

TEST(WorkSplit, MoreRanksThanHeadsKeepsEveryRankBusy) {
  WorkInput in;
  in.q_heads = 24;
  in.kv_heads = 8;
  in.q_total = in.kv_total = 4481;
  in.ranks = 32;
  for (const RankWork& w : split_work(in)) EXPECT_GE(w.pieces, 1);
  check_split(in);
}

// ---- compute_layout -------------------------------------------------------------------------------

struct Config {
  std::vector<std::int64_t> q_lens, kv_lens;
  std::int64_t q_heads = 1, kv_heads = 1, head_dim = 1, elem_bytes = 4;
  bool with_lse = false, causal = false;

  std::string str() const {
    std::ostringstream os;
    os << "q_lens [";
    for (auto v : q_lens) os << v << ' ';
    os << "] kv_lens [";
    for (auto v : kv_lens) os << v << ' ';
    os << "] heads " << q_heads << "/" << kv_heads << " dim " << head_dim << " elem " << elem_bytes
       << " lse " << with_lse << " causal " << causal;
    return os.str();
  }
};

std::vector<Layout> layouts_of_all_ranks(const Config& c) {
  std::vector<Layout> all;
  for (int r = 0; r < static_cast<int>(c.q_lens.size()); ++r) {
    LayoutInput in;
    in.q_lens = c.q_lens;
    in.kv_lens = c.kv_lens;
    in.q_heads = c.q_heads;
    in.kv_heads = c.kv_heads;
    in.head_dim = c.head_dim;
    in.elem_bytes = c.elem_bytes;
    in.with_lse = c.with_lse;
    in.causal = c.causal;
    in.rank = r;
    all.push_back(compute_layout(in));
  }
  return all;
}

// Blocks lie inside the buffer, start 64-byte aligned, never overlap; the buffer wastes nothing but
// alignment padding.
void check_side(const ExchangeSide& side, int ranks, const char* what) {
  SCOPED_TRACE(what);
  ASSERT_EQ(static_cast<int>(side.counts.size()), ranks);
  ASSERT_EQ(static_cast<int>(side.displs.size()), ranks);
  std::vector<std::pair<std::int64_t, std::int64_t>> spans;
  std::int64_t padded_sum = 0;
  for (int j = 0; j < ranks; ++j) {
    EXPECT_GE(side.counts[j], 0) << "peer " << j;
    EXPECT_GE(side.displs[j], 0) << "peer " << j;
    EXPECT_EQ(side.displs[j] % kBlockAlign, 0) << "peer " << j << " displ " << side.displs[j];
    EXPECT_LE(side.displs[j] + side.counts[j], side.total) << "peer " << j;
    if (side.counts[j] > 0) spans.emplace_back(side.displs[j], side.displs[j] + side.counts[j]);
    padded_sum += align_up(side.counts[j], kBlockAlign);
  }
  std::sort(spans.begin(), spans.end());
  for (std::size_t i = 1; i < spans.size(); ++i)
    EXPECT_LE(spans[i - 1].second, spans[i].first) << "blocks overlap";
  EXPECT_LE(side.total, padded_sum);
}

void check_config(const Config& c) {
  SCOPED_TRACE(c.str());
  const int P = static_cast<int>(c.q_lens.size());
  const std::vector<Layout> L = layouts_of_all_ranks(c);
  const std::int64_t row = c.head_dim * c.elem_bytes;
  for (int r = 0; r < P; ++r) {
    SCOPED_TRACE(::testing::Message() << "rank " << r);
    const Layout& a = L[r];
    ASSERT_EQ(a.ranks, P);
    ASSERT_EQ(a.rank, r);
    ASSERT_EQ(static_cast<int>(a.q_start.size()), P + 1);
    ASSERT_EQ(static_cast<int>(a.kv_start.size()), P + 1);
    EXPECT_EQ(a.q_start[0], 0);
    EXPECT_EQ(a.kv_start[0], 0);
    for (int j = 0; j < P; ++j) {
      EXPECT_EQ(a.q_start[j + 1] - a.q_start[j], c.q_lens[j]);
      EXPECT_EQ(a.kv_start[j + 1] - a.kv_start[j], c.kv_lens[j]);
      const RankWork& w = a.work[j];
      const RankWork& u = L[0].work[j];  // every rank derives the same split
      EXPECT_EQ(w.first_head, u.first_head);
      EXPECT_EQ(w.first_row, u.first_row);
      EXPECT_EQ(w.end_head, u.end_head);
      EXPECT_EQ(w.end_row, u.end_row);
    }
    check_side(a.qkv_send, P, "qkv_send");
    check_side(a.qkv_recv, P, "qkv_recv");
    check_side(a.out_send, P, "out_send");
    check_side(a.out_recv, P, "out_recv");

    // The size-class bound is the same on every rank and bounds every rank's buffers.
    std::int64_t qkv_max = 0, out_max = 0;
    for (const Layout& any : L) {
      qkv_max = std::max({qkv_max, any.qkv_send.total, any.qkv_recv.total});
      out_max = std::max({out_max, any.out_send.total, any.out_recv.total});
    }
    EXPECT_EQ(a.qkv_max_total, qkv_max);
    EXPECT_EQ(a.out_max_total, out_max);

    // The own block never travels.
    EXPECT_EQ(a.qkv_send.counts[r], 0);
    EXPECT_EQ(a.qkv_recv.counts[r], 0);
    EXPECT_EQ(a.out_send.counts[r], 0);
    EXPECT_EQ(a.out_recv.counts[r], 0);

    std::int64_t q_payload_sent = 0, kv_payload_sent = 0, kv_heads_sent = 0;
    for (int j = 0; j < P; ++j) {
      if (j == r) continue;
      SCOPED_TRACE(::testing::Message() << "peer " << j);
      const Layout& b = L[j];
      // What r sends to j is exactly what j expects from r, part by part.
      EXPECT_EQ(a.qkv_send.counts[j], b.qkv_recv.counts[r]);
      EXPECT_EQ(a.out_send.counts[j], b.out_recv.counts[r]);
      EXPECT_EQ(a.qkv_send_block[j].q, b.qkv_recv_block[r].q);
      EXPECT_EQ(a.qkv_send_block[j].k, b.qkv_recv_block[r].k);
      EXPECT_EQ(a.qkv_send_block[j].v, b.qkv_recv_block[r].v);
      EXPECT_EQ(a.qkv_send_block[j].bytes, b.qkv_recv_block[r].bytes);
      EXPECT_EQ(a.out_send_block[j].o, b.out_recv_block[r].o);
      EXPECT_EQ(a.out_send_block[j].lse, b.out_recv_block[r].lse);
      EXPECT_EQ(a.out_send_block[j].bytes, b.out_recv_block[r].bytes);
      // Peer reads: j finds r's output block for it where r's own layout put it.
      EXPECT_EQ(b.out_displ_at_peer[r], a.out_send.displs[j]);

      // Inside a q/k/v block: the Q pieces, then K, V, each 64-byte aligned and large enough for
      // its payload.
      const auto& qb = a.qkv_send_block[j];
      const RankWork& wj = a.work[j];
      const std::int64_t nkv = wj.kv_heads.size();
      const std::int64_t kv_bytes = c.kv_lens[r] * nkv * row;
      EXPECT_EQ(a.qkv_send.counts[j], qb.bytes);
      EXPECT_EQ(qb.q[0], 0);
      for (int i = 0; i < wj.pieces; ++i) {
        const std::int64_t bytes = rows_held(wj.piece[i], a.q_tokens(r)).size() *
                                   wj.piece[i].heads.size() * row;
        const std::int64_t next = i + 1 < wj.pieces ? qb.q[i + 1] : qb.k;
        EXPECT_EQ(qb.q[i] % kBlockAlign, 0);
        EXPECT_GE(next - qb.q[i], bytes);
        q_payload_sent += bytes;
      }
      EXPECT_EQ(qb.k % kBlockAlign, 0);
      EXPECT_EQ(qb.v % kBlockAlign, 0);
      EXPECT_GE(qb.v - qb.k, kv_bytes);
      EXPECT_EQ(qb.bytes, qb.v + kv_bytes);
      kv_payload_sent += kv_bytes;
      kv_heads_sent += nkv;

      // Output block r -> j: of each of r's pieces, j's rows, then their lse.
      const auto& ob = a.out_send_block[j];
      const RankWork& wr = a.work[r];
      std::int64_t pairs = 0;
      for (int i = 0; i < wr.pieces; ++i) {
        const std::int64_t n = rows_held(wr.piece[i], a.q_tokens(j)).size() * wr.piece[i].heads.size();
        const std::int64_t next = i + 1 < wr.pieces ? ob.o[i + 1] : ob.lse[0];
        EXPECT_EQ(ob.o[i] % kBlockAlign, 0);
        EXPECT_GE(next - ob.o[i], n * row);
        if (c.with_lse) {
          EXPECT_EQ(ob.lse[i] % kBlockAlign, 0);
          if (i + 1 < wr.pieces) {
            EXPECT_GE(ob.lse[i + 1] - ob.lse[i], n * 4);
          }
        }
        pairs += n;
      }
      EXPECT_EQ(a.out_send.counts[j], ob.bytes);
      EXPECT_LE(ob.bytes, pairs * (row + (c.with_lse ? 4 : 0)) + 6 * kBlockAlign);
      EXPECT_GE(ob.bytes, pairs * (row + (c.with_lse ? 4 : 0)));
    }
    // Every (token, head) pair of r's queries leaves exactly once, except those r computes itself
    // (no padding).
    std::int64_t own_pairs = 0;
    for (int i = 0; i < a.work[r].pieces; ++i)
      own_pairs += rows_held(a.work[r].piece[i], a.q_tokens(r)).size() * a.work[r].piece[i].heads.size();
    EXPECT_EQ(q_payload_sent, (c.q_lens[r] * c.q_heads - own_pairs) * row);
    EXPECT_EQ(kv_payload_sent, c.kv_lens[r] * kv_heads_sent * row);
  }
}

TEST(ComputeLayout, HandPickedConfigs) {
  Config c;
  c.q_lens = {4096, 4096};
  c.kv_lens = {4096, 4096};
  c.q_heads = c.kv_heads = 24;
  c.head_dim = 128;
  check_config(c);
  c.q_lens = {3969, 512, 0};  // FLUX.1 at 1008^2, uneven and with an empty rank
  c.kv_lens = {3969, 512, 0};
  check_config(c);
  c.q_lens = {1};
  c.kv_lens = {0};
  c.q_heads = 30;
  c.kv_heads = 1;
  c.with_lse = true;
  check_config(c);
  c.q_lens = {0, 0, 0, 0, 0, 0, 0, 0, 0};  // nothing at all
  c.kv_lens = {0, 0, 0, 0, 0, 0, 0, 0, 0};
  c.q_heads = 3;
  c.kv_heads = 3;
  check_config(c);
}

TEST(ComputeLayout, RandomConfigsAgreeAcrossRanks) {
  uaa::test::Rng rng(20240611);
  const std::int64_t palette[] = {0, 1, 2, 3, 5, 7, 13, 16, 31, 61, 64, 65, 127, 1009, 4481};
  const std::int64_t heads[] = {1, 2, 3, 7, 24, 30, 40};
  const std::int64_t dims[] = {1, 3, 8, 64, 100, 128, 256};
  const std::int64_t elems[] = {2, 4};
  for (int it = 0; it < 400; ++it) {
    Config c;
    const int P = static_cast<int>(rng.uniform(1, 9));
    const bool cross = rng.uniform(0, 1);
    for (int r = 0; r < P; ++r) {
      c.q_lens.push_back(rng.uniform(0, 2) ? rng.pick(palette) : rng.uniform(0, 5000));
      c.kv_lens.push_back(cross ? (rng.uniform(0, 2) ? rng.pick(palette) : rng.uniform(0, 5000))
                                : c.q_lens.back());
    }
    c.q_heads = rng.pick(heads);
    const std::vector<std::int64_t> kv = divisors(c.q_heads);
    c.kv_heads = kv[rng.uniform(0, static_cast<std::int64_t>(kv.size()) - 1)];
    c.head_dim = rng.pick(dims);
    c.elem_bytes = rng.pick(elems);
    c.with_lse = rng.uniform(0, 1);
    c.causal = rng.uniform(0, 1);
    check_config(c);
    if (::testing::Test::HasFatalFailure()) return;
  }
}

// Counts past 2^31 bytes (and token offsets past 2^31) must be exact: recompute them in 128-bit.
TEST(ComputeLayout, LargeCountsAre64BitExact) {
  using i128 = __int128;
  auto align128 = [](i128 n) { return (n + kBlockAlign - 1) / kBlockAlign * kBlockAlign; };
  struct Big {
    std::vector<std::int64_t> q, kv;
    std::int64_t hq, hkv, dim, elem;
  };
  const Big bigs[] = {
      {{10'000'000, 10'000'001, 9'999'999}, {10'000'000, 10'000'001, 9'999'999}, 40, 40, 128, 4},
      {{10'000'000, 7}, {3, 12'345'678}, 40, 8, 128, 2},
      {{1'500'000'000, 1'500'000'001, 1'499'999'999, 1'000'000'007},
       {2'000'000'000, 1, 0, 2'100'000'000}, 30, 1, 256, 4},
  };
  for (const Big& b : bigs) {
    Config c;
    c.q_lens = b.q;
    c.kv_lens = b.kv;
    c.q_heads = b.hq;
    c.kv_heads = b.hkv;
    c.head_dim = b.dim;
    c.elem_bytes = b.elem;
    c.with_lse = true;
    SCOPED_TRACE(c.str());
    check_config(c);
    const int P = static_cast<int>(c.q_lens.size());
    const std::vector<Layout> L = layouts_of_all_ranks(c);
    const i128 row = static_cast<i128>(b.dim) * b.elem;
    bool past_2_31 = false;
    for (int r = 0; r < P; ++r) {
      i128 q_total = 0;
      for (int j = 0; j < P; ++j) q_total += b.q[j];
      EXPECT_TRUE(static_cast<i128>(L[r].q_start[P]) == q_total);
      for (int j = 0; j < P; ++j) {
        if (j == r) continue;
        // Recomputed in 128-bit from the split: Q pieces, K, V (the last part unpadded).
        const RankWork& wj = L[r].work[j];
        const RankWork& wr = L[r].work[r];
        const RowRange mine = L[r].q_tokens(r), theirs = L[r].q_tokens(j);
        i128 want_qkv = 0, want_out = 0, lse_bytes = 0;
        for (int i = 0; i < wj.pieces; ++i)
          want_qkv += align128(static_cast<i128>(rows_held(wj.piece[i], mine).size()) *
                               wj.piece[i].heads.size() * row);
        const i128 kv_bytes = b.kv[r] * static_cast<i128>(wj.kv_heads.size()) * row;
        want_qkv += align128(kv_bytes) + kv_bytes;
        for (int i = 0; i < wr.pieces; ++i) {
          const i128 n = static_cast<i128>(rows_held(wr.piece[i], theirs).size()) * wr.piece[i].heads.size();
          want_out += align128(n * row);
          lse_bytes += i + 1 < wr.pieces ? align128(n * 4) : n * 4;
        }
        want_out += lse_bytes;
        if (wr.pieces == 0) want_out = 0;
        EXPECT_TRUE(static_cast<i128>(L[r].qkv_send.counts[j]) == want_qkv)
            << "rank " << r << " -> " << j << ": " << L[r].qkv_send.counts[j] << " vs "
            << static_cast<long double>(want_qkv);
        EXPECT_TRUE(static_cast<i128>(L[r].out_send.counts[j]) == want_out)
            << "rank " << r << " -> " << j << ": " << L[r].out_send.counts[j] << " vs "
            << static_cast<long double>(want_out);
        past_2_31 |= L[r].qkv_send.counts[j] > (std::int64_t{1} << 31);
      }
    }
    EXPECT_TRUE(past_2_31) << "config does not exercise counts past 2^31";
  }
}

}  // namespace
