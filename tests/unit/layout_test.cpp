// Unit tests of the work split (src/plan/layout.h): every (head, row) pair computed once, balance,
// granule-aligned cuts, whole heads when they divide, kv heads under GQA/MQA; and the exact count of
// visible (query, key) pairs it weighs rows by. What moves where (the exchange programs compiled from
// the split) is tested in program_test.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "plan/layout.h"

namespace {

using uaa::detail::RankWork;
using uaa::detail::split_work;
using uaa::detail::visible_key_pairs;
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

// ---- visible_key_pairs ----------------------------------------------------------------------------

// Brute force: keys global query row i may attend (plan.h's causal convention).
std::int64_t keys_seen(std::int64_t i, std::int64_t q_total, std::int64_t kv_total, bool causal) {
  if (!causal) return kv_total;
  return std::clamp<std::int64_t>(i + kv_total - q_total + 1, 0, kv_total);
}

TEST(VisibleKeyPairs, MatchCountingRowByRow) {
  for (bool causal : {false, true})
    for (std::int64_t sq : {0, 1, 2, 7, 48, 50, 97})
      for (std::int64_t skv : {0, 1, 9, 50, 64, 200})
        for (std::int64_t first = 0; first <= sq; ++first)
          for (std::int64_t n : {0, 1, 2, 5, 48}) {
            if (first + n > sq) continue;
            std::int64_t want = 0;
            for (std::int64_t i = first; i < first + n; ++i) want += keys_seen(i, sq, skv, causal);
            EXPECT_TRUE(visible_key_pairs(first, n, sq, skv, causal) == want)
                << "causal " << causal << " q " << sq << " kv " << skv << " rows [" << first << ", "
                << first + n << "): " << static_cast<long long>(visible_key_pairs(first, n, sq, skv, causal))
                << " vs " << want;
          }
}

// Sums of rows x keys past 2^63 are exact (the split multiplies them by the heads, too).
TEST(VisibleKeyPairs, ExactPast64Bits) {
  using i128 = __int128;
  const std::int64_t big = std::int64_t{3} << 60;  // 3.5e18 rows and keys
  const i128 all = visible_key_pairs(0, big, big, big, false);
  EXPECT_TRUE(all == static_cast<i128>(big) * big);
  // Causal, square: rows 0..n-1 see 1..n keys: n(n+1)/2.
  const i128 tri = visible_key_pairs(0, big, big, big, true);
  EXPECT_TRUE(tri == static_cast<i128>(big) * (big + 1) / 2);
  // The halves add up to the whole.
  EXPECT_TRUE(visible_key_pairs(0, big / 2, big, big, true) +
                  visible_key_pairs(big / 2, big - big / 2, big, big, true) ==
              tri);
  // Bottom-right alignment: fewer keys than queries leaves the first rows without any.
  EXPECT_TRUE(visible_key_pairs(0, big - 10, big, 10, true) == 0);
  EXPECT_TRUE(visible_key_pairs(big - 10, 10, big, 10, true) == 55);
}

}  // namespace
