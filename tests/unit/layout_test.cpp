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
using uaa::detail::kv_heads_of;
using uaa::detail::Layout;
using uaa::detail::LayoutInput;
using uaa::detail::q_heads_of;

std::vector<std::int64_t> divisors(std::int64_t n) {
  std::vector<std::int64_t> d;
  for (std::int64_t i = 1; i <= n; ++i)
    if (n % i == 0) d.push_back(i);
  return d;
}

TEST(HeadPartition, ContiguousBalancedAndComplete) {
  for (std::int64_t heads = 1; heads <= 70; ++heads) {
    for (int ranks = 1; ranks <= 72; ++ranks) {
      SCOPED_TRACE(::testing::Message() << "heads " << heads << " ranks " << ranks);
      std::vector<int> owner(heads, -1);
      std::int64_t expect_begin = 0, min_size = heads, max_size = 0, empty = 0;
      for (int r = 0; r < ranks; ++r) {
        const HeadRange h = q_heads_of(heads, ranks, r);
        ASSERT_EQ(h.begin, expect_begin) << "rank " << r << " is not contiguous with rank " << r - 1;
        ASSERT_GE(h.size(), 0);
        for (std::int64_t x = h.begin; x < h.end; ++x) {
          ASSERT_EQ(owner[x], -1) << "head " << x << " owned twice";
          owner[x] = r;
        }
        // Documented: lower ranks get the extra heads, so sizes never increase with the rank.
        if (r > 0) {
          EXPECT_LE(h.size(), q_heads_of(heads, ranks, r - 1).size());
        }
        min_size = std::min(min_size, h.size());
        max_size = std::max(max_size, h.size());
        empty += h.size() == 0;
        expect_begin = h.end;
      }
      EXPECT_EQ(expect_begin, heads) << "heads not all covered";
      EXPECT_LE(max_size - min_size, 1);
      EXPECT_EQ(empty, ranks > heads ? ranks - heads : 0);
      for (std::int64_t x = 0; x < heads; ++x) EXPECT_NE(owner[x], -1) << "head " << x;
    }
  }
}

TEST(HeadPartition, KvHeadsAreExactlyTheOnesReadBruteForce) {
  const std::int64_t q_heads_list[] = {1, 2, 3, 4, 6, 7, 8, 12, 16, 24, 30, 32, 40, 64};
  for (std::int64_t hq : q_heads_list) {
    for (std::int64_t hkv : divisors(hq)) {
      const std::int64_t group = hq / hkv;
      for (int ranks = 1; ranks <= 12; ++ranks) {
        SCOPED_TRACE(::testing::Message()
                     << "q_heads " << hq << " kv_heads " << hkv << " ranks " << ranks);
        std::vector<int> readers(hkv, 0);
        for (int r = 0; r < ranks; ++r) {
          const HeadRange q = q_heads_of(hq, ranks, r);
          std::set<std::int64_t> needed;
          for (std::int64_t h = q.begin; h < q.end; ++h) needed.insert(h / group);
          const HeadRange kv = kv_heads_of(hq, hkv, ranks, r);
          std::set<std::int64_t> got;
          for (std::int64_t h = kv.begin; h < kv.end; ++h) got.insert(h);
          EXPECT_EQ(got, needed) << "rank " << r;
          EXPECT_GE(kv.begin, 0);
          EXPECT_LE(kv.end, hkv);
          for (std::int64_t h : got) ++readers[h];
        }
        // No full replication: a kv head goes only to ranks owning one of its query heads.
        for (std::int64_t h = 0; h < hkv; ++h) {
          int owners = 0;
          for (int r = 0; r < ranks; ++r) {
            const HeadRange q = q_heads_of(hq, ranks, r);
            owners += q.begin < (h + 1) * group && h * group < q.end;
          }
          EXPECT_EQ(readers[h], owners) << "kv head " << h;
          EXPECT_GE(readers[h], 1) << "kv head " << h << " received by no rank";
        }
      }
    }
  }
}

// ---- compute_layout -------------------------------------------------------------------------------

struct Config {
  std::vector<std::int64_t> q_lens, kv_lens;
  std::int64_t q_heads = 1, kv_heads = 1, head_dim = 1, elem_bytes = 4;
  bool with_lse = false;

  std::string str() const {
    std::ostringstream os;
    os << "q_lens [";
    for (auto v : q_lens) os << v << ' ';
    os << "] kv_lens [";
    for (auto v : kv_lens) os << v << ' ';
    os << "] heads " << q_heads << "/" << kv_heads << " dim " << head_dim << " elem " << elem_bytes
       << " lse " << with_lse;
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
      EXPECT_EQ(a.q_heads[j].begin, q_heads_of(c.q_heads, P, j).begin);
      EXPECT_EQ(a.q_heads[j].end, q_heads_of(c.q_heads, P, j).end);
      EXPECT_EQ(a.kv_heads[j].begin, kv_heads_of(c.q_heads, c.kv_heads, P, j).begin);
      EXPECT_EQ(a.kv_heads[j].end, kv_heads_of(c.q_heads, c.kv_heads, P, j).end);
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
      EXPECT_EQ(a.out_send_block[j].lse, b.out_recv_block[r].lse);
      EXPECT_EQ(a.out_send_block[j].bytes, b.out_recv_block[r].bytes);

      // Inside a q/k/v block: Q at the start, then K, V, each 64-byte aligned and large enough
      // for its payload.
      const auto& qb = a.qkv_send_block[j];
      const std::int64_t nq = a.q_heads[j].size(), nkv = a.kv_heads[j].size();
      const std::int64_t q_bytes = c.q_lens[r] * nq * row, kv_bytes = c.kv_lens[r] * nkv * row;
      EXPECT_EQ(a.qkv_send.counts[j], qb.bytes);
      EXPECT_EQ(qb.q, 0);
      EXPECT_EQ(qb.q % kBlockAlign, 0);
      EXPECT_EQ(qb.k % kBlockAlign, 0);
      EXPECT_EQ(qb.v % kBlockAlign, 0);
      EXPECT_GE(qb.k - qb.q, q_bytes);
      EXPECT_GE(qb.v - qb.k, kv_bytes);
      EXPECT_EQ(qb.bytes, qb.v + kv_bytes);
      q_payload_sent += q_bytes;
      kv_payload_sent += kv_bytes;
      kv_heads_sent += nkv;

      // Output block r -> j: j's tokens of r's heads, then their lse.
      const auto& ob = a.out_send_block[j];
      const std::int64_t o_bytes = c.q_lens[j] * a.q_heads[r].size() * row;
      EXPECT_EQ(a.out_send.counts[j], ob.bytes);
      if (c.with_lse) {
        EXPECT_GE(ob.lse, o_bytes);
        EXPECT_EQ(ob.lse % kBlockAlign, 0);
        EXPECT_EQ(ob.bytes, ob.lse + c.q_lens[j] * a.q_heads[r].size() * 4);
      } else {
        EXPECT_EQ(ob.bytes, o_bytes);
      }
    }
    // Every query head of r's tokens leaves exactly once, except r's own heads (no padding).
    EXPECT_EQ(q_payload_sent, c.q_lens[r] * (c.q_heads - a.q_heads[r].size()) * row);
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
        const i128 nq = L[r].q_heads[j].size(), nkv = L[r].kv_heads[j].size();
        const i128 kv_bytes = b.kv[r] * nkv * row;
        const i128 want_qkv =
            align128(b.q[r] * nq * row) + align128(kv_bytes) + kv_bytes;
        const i128 o_bytes = b.q[j] * static_cast<i128>(L[r].q_heads[r].size()) * row;
        const i128 want_out = align128(o_bytes) + b.q[j] * static_cast<i128>(L[r].q_heads[r].size()) * 4;
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
