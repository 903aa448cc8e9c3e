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

// ---- windows and documents ----------------------------------------------------------------------

// Brute force with a window (plan.h: -1 is no bound; causal caps the right side at 0).
std::int64_t keys_seen(std::int64_t i, std::int64_t q_total, std::int64_t kv_total, bool causal,
                       std::int64_t left, std::int64_t right) {
  std::int64_t n = 0;
  const std::int64_t at = i + kv_total - q_total;
  for (std::int64_t j = 0; j < kv_total; ++j) {
    const bool after = left >= 0 && j < at - left;
    const bool before = (causal && j > at) || (right >= 0 && j > at + right);
    n += !after && !before;
  }
  return n;
}

TEST(VisibleKeyPairs, WindowsMatchCountingRowByRow) {
  const std::int64_t sides[] = {-1, 0, 1, 3, 47, 200};
  for (bool causal : {false, true})
    for (std::int64_t sq : {0, 1, 7, 50, 97})
      for (std::int64_t skv : {0, 1, 9, 64, 130})
        for (std::int64_t left : sides)
          for (std::int64_t right : sides)
            for (std::int64_t first : {std::int64_t{0}, sq / 3, sq / 2})
              for (std::int64_t n : {std::int64_t{0}, std::int64_t{1}, sq - first}) {
                if (n < 0 || first + n > sq) continue;
                std::int64_t want = 0;
                for (std::int64_t i = first; i < first + n; ++i)
                  want += keys_seen(i, sq, skv, causal, left, right);
                const auto got = visible_key_pairs(first, n, sq, skv, causal, left, right);
                EXPECT_TRUE(got == want) << "causal " << causal << " q " << sq << " kv " << skv
                                         << " window (" << left << ", " << right << ") rows ["
                                         << first << ", " << first + n << "): "
                                         << static_cast<long long>(got) << " vs " << want;
              }
}

// Brute-force work of rows [0, n) with documents: each row sees keys of its own document only.
std::int64_t doc_prefix(const WorkInput& in, std::int64_t n) {
  std::int64_t w = 0;
  for (std::size_t d = 0; d + 1 < in.q_doc_start.size(); ++d) {
    const std::int64_t qs = in.q_doc_start[d], nq = in.q_doc_start[d + 1] - qs;
    const std::int64_t nk = in.kv_doc_start[d + 1] - in.kv_doc_start[d];
    for (std::int64_t i = qs; i < std::min(n, qs + nq); ++i)
      w += 1 + keys_seen(i - qs, nq, nk, in.causal, in.window_left, in.window_right);
  }
  return w;
}

std::vector<std::int64_t> starts_of(const std::vector<std::int64_t>& lens) {
  std::vector<std::int64_t> s(lens.size() + 1, 0);
  for (std::size_t i = 0; i < lens.size(); ++i) s[i + 1] = s[i] + lens[i];
  return s;
}

TEST(RowWork, DocumentsPrefixAndCutsMatchBruteForce) {
  const std::vector<std::vector<std::int64_t>> docs = {
      {100}, {0, 5, 0, 130, 1, 49}, {48, 48, 1}, {3, 300, 7}, {1, 1, 1, 1}};
  for (const auto& q : docs)
    for (bool cross : {false, true})
      for (bool causal : {false, true})
        for (std::int64_t left : {-1, 10}) {
          WorkInput in;
          in.q_doc_start = starts_of(q);
          std::vector<std::int64_t> kv = q;
          if (cross) std::reverse(kv.begin(), kv.end());
          in.kv_doc_start = starts_of(kv);
          in.q_total = in.q_doc_start.back();
          in.kv_total = in.kv_doc_start.back();
          in.causal = causal;
          in.window_left = left;
          const uaa::detail::RowWork rw(in);
          // The allowed cuts: document starts and multiples of 48 rows from one.
          std::set<std::int64_t> allowed;
          for (std::size_t d = 0; d + 1 < in.q_doc_start.size(); ++d)
            for (std::int64_t r = in.q_doc_start[d]; r <= in.q_doc_start[d + 1]; r += kGranule)
              allowed.insert(r);
          for (std::int64_t s : in.q_doc_start) allowed.insert(s);
          for (std::int64_t n = 0; n <= in.q_total; ++n)
            ASSERT_TRUE(rw.prefix(n) == doc_prefix(in, n)) << "n " << n;
          const std::int64_t total = doc_prefix(in, in.q_total);
          for (std::int64_t target = 0; target <= total; target += std::max<std::int64_t>(1, total / 37)) {
            const std::int64_t c = rw.cut(target, 0, in.q_total);
            EXPECT_TRUE(allowed.count(c)) << "cut " << c << " is no document start or granule";
            EXPECT_GE(doc_prefix(in, c), target);
            // No allowed cut before it reaches the target.
            for (std::int64_t a : allowed)
              if (a < c) {
                EXPECT_LT(doc_prefix(in, a), target) << "cut " << c << " but " << a;
              }
          }
        }
}

// A rank holding one long causal document and ranks holding many short ones do equal work, and
// every cut inside a head is a document start or a granule from one.
TEST(SplitWork, DocumentsBalanceVisiblePairs) {
  std::vector<std::int64_t> q = {4000};
  for (int i = 0; i < 60; ++i) q.push_back(17 + 13 * i % 97);
  WorkInput in;
  in.q_doc_start = starts_of(q);
  in.kv_doc_start = in.q_doc_start;
  in.q_total = in.kv_total = in.q_doc_start.back();
  in.causal = true;
  in.q_heads = 8;
  in.kv_heads = 2;
  for (int P : {2, 3, 4, 8, 13}) {
    in.ranks = P;
    const std::vector<RankWork> work = split_work(in);
    double sum = 0, most = 0;
    for (const RankWork& w : work) {
      std::int64_t x = 0;
      for (int i = 0; i < w.pieces; ++i) {
        const auto& p = w.piece[i];
        x += (doc_prefix(in, p.rows.end) - doc_prefix(in, p.rows.begin)) * p.heads.size();
        for (std::int64_t cut : {p.rows.begin, p.rows.end}) {
          const auto d = std::upper_bound(in.q_doc_start.begin(), in.q_doc_start.end(), cut) - 1;
          EXPECT_TRUE(cut == in.q_total || (cut - *d) % kGranule == 0)
              << "P " << P << " cut " << cut << " inside document at " << *d;
        }
      }
      sum += x;
      most = std::max(most, static_cast<double>(x));
    }
    EXPECT_LT(most / (sum / P), 1.02) << "P " << P;
  }
}

}  // namespace
