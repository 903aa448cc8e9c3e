// Layout math of the comparison strategies (src/plan/strategy_layout.h) and the cost model
// (src/plan/cost_model.h), without MPI.
#include <gtest/gtest.h>

#include <memory>
#include <vector>

#include "fake_communicator.h"
#include "kernels/kernel.h"
#include "plan/cost_model.h"
#include "plan/plan_data.h"
#include "plan/strategy_layout.h"
#include "uaa/plan.h"

namespace {

using namespace uaa::detail;
using uaa::Strategy;
using Lens = std::vector<std::int64_t>;

LayoutInput input(Lens q, Lens kv, std::int64_t hq, std::int64_t hkv, std::int64_t d, int rank,
                  bool lse = false) {
  LayoutInput in;
  in.q_lens = std::move(q);
  in.kv_lens = std::move(kv);
  in.q_heads = hq;
  in.kv_heads = hkv;
  in.head_dim = d;
  in.elem_bytes = 4;
  in.with_lse = lse;
  in.rank = rank;
  return in;
}

TEST(PaddedLayout, PadsTokensToCeilAndHeadsToAMultipleOfTheRanks) {
  // 4481 tokens (FLUX at 1008^2) on 4 ranks, Z-Image's 30 heads.
  const Lens lens = {1121, 1120, 1120, 1120};
  const PaddedLayout L = compute_padded_layout(input(lens, lens, 30, 30, 128, 2));
  EXPECT_EQ(L.q_rows, 1121);
  EXPECT_EQ(L.kv_rows, 1121);
  EXPECT_EQ(L.pad_q_tokens, 4 * 1121 - 4481);
  EXPECT_EQ(L.q_heads_per_rank, 8);
  EXPECT_EQ(L.padded_q_heads, 32);
  EXPECT_EQ(L.kv_heads_per_rank, 8);
  EXPECT_EQ(L.kv_head_begin, (Lens{0, 8, 16, 24}));
  // Equal counts, self included: Q + K + V of 1121 rows x 8 heads x 128 floats.
  const std::int64_t part = 1121 * 8 * 128 * 4;
  for (int j = 0; j < 4; ++j) {
    EXPECT_EQ(L.qkv_send.counts[j], 3 * part);
    EXPECT_EQ(L.qkv_recv.counts[j], 3 * part);
    EXPECT_EQ(L.out_send.counts[j], part);
  }
}

TEST(PaddedLayout, UnevenShardsPadToTheLongestAndGqaCoversEveryQueryHead) {
  const PaddedLayout L = compute_padded_layout(input({2, 9, 0}, {5, 5, 5}, 6, 2, 8, 0));
  EXPECT_EQ(L.q_rows, 9);  // longer than ceil(11 / 3) = 4
  EXPECT_EQ(L.kv_rows, 5);
  EXPECT_EQ(L.q_heads_per_rank, 2);
  // q heads [0,2) [2,4) [4,6), group 3: kv heads [0,1) [0,2) [1,2) -> two per rank.
  EXPECT_EQ(L.kv_heads_per_rank, 2);
  EXPECT_EQ(L.kv_head_begin, (Lens{0, 0, 1}));
  for (int r = 0; r < 3; ++r)
    for (std::int64_t h = r * 2; h < r * 2 + 2; ++h) {
      EXPECT_GE(h / 3, L.kv_head_begin[r]);
      EXPECT_LT(h / 3, L.kv_head_begin[r] + L.kv_heads_per_rank);
    }
}

TEST(PaddedLayout, NothingToPadIsPlainUlysses) {
  const Lens lens = {8, 8};
  const PaddedLayout L = compute_padded_layout(input(lens, lens, 4, 4, 16, 1));
  EXPECT_EQ(L.pad_q_tokens, 0);
  EXPECT_EQ(L.padded_q_heads, 4);
  EXPECT_EQ(ulysses_problem(lens, lens, 4), "");
}

TEST(UlyssesProblem, NamesWhatDoesNotDivide) {
  EXPECT_NE(ulysses_problem({4, 3}, {4, 3}, 4).find("7 tokens over 2 ranks"), std::string::npos);
  EXPECT_NE(ulysses_problem({5, 3}, {5, 3}, 4).find("rank 0 holds 5"), std::string::npos);
  EXPECT_NE(ulysses_problem({4, 4}, {4, 4}, 3).find("3 heads over 2 ranks"), std::string::npos);
  EXPECT_NE(ulysses_problem({4, 4}, {3, 2}, 4).find("key/value"), std::string::npos);
}

TEST(GatherLayout, WhatRankRSendsIsWhatPeerJExpects) {
  const Lens q = {3, 0, 7, 1}, kv = {5, 11, 0, 2};
  for (int r = 0; r < 4; ++r) {
    const GatherLayout Lr = compute_gather_layout(input(q, kv, 6, 3, 8, r));
    EXPECT_EQ(Lr.send.counts[r], 0);
    EXPECT_EQ(Lr.recv.counts[r], 0);
    for (int j = 0; j < 4; ++j) {
      if (j == r) continue;
      const GatherLayout Lj = compute_gather_layout(input(q, kv, 6, 3, 8, j));
      EXPECT_EQ(Lr.send.counts[j], Lj.recv.counts[r]) << r << " -> " << j;
      // K then V, V starting on a 64-byte boundary.
      EXPECT_EQ(Lr.send.counts[j], align_up(kv[r] * 3 * 8 * 4, 64) + kv[r] * 3 * 8 * 4);
      EXPECT_EQ(Lr.max_total, Lj.max_total);
      EXPECT_LE(Lr.recv.total, Lr.max_total);
    }
  }
}

TEST(CostModel, VisiblePairsMatchCounting) {
  for (bool causal : {false, true})
    for (std::int64_t sq : {0, 1, 7, 50})
      for (std::int64_t skv : {0, 1, 9, 50, 64})
        for (std::int64_t first = 0; first <= sq; first += 3) {
          const std::int64_t n = std::min<std::int64_t>(5, sq - first);
          double want = 0;
          for (std::int64_t i = first; i < first + n; ++i)
            want += static_cast<double>(std::max<std::int64_t>(last_visible_key(i, sq, skv, causal) + 1, 0));
          EXPECT_EQ(visible_pairs(first, n, sq, skv, causal), want)
              << causal << " " << sq << " " << skv << " " << first;
        }
}

// The model's bytes are the bytes the plans send: checked rank by rank against Plan::bytes_sent().
TEST(CostModel, BytesAreWhatThePlansSend) {
  const Lens q = {11, 0, 23, 5, 8}, kv = {7, 13, 0, 9, 1};
  for (Strategy st : {Strategy::uaa, Strategy::ulysses_pad, Strategy::allgather_kv}) {
    const CostEstimate c = estimate_cost(input(q, kv, 6, 2, 16, 0, true), st, true);
    for (int r = 0; r < 5; ++r) {
      auto comm = std::make_shared<uaa::test::FakeCommunicator>(r, 5);
      uaa::AttentionShape s;
      s.q_heads = 6;
      s.kv_heads = 2;
      s.head_dim = 16;
      s.causal = true;
      s.return_lse = true;
      s.strategy = st;
      const uaa::Plan plan = uaa::Plan::from_lengths(*comm, s, q, kv);
      EXPECT_EQ(c.ranks[r].sent, plan.bytes_sent()) << uaa::strategy_name(st) << " rank " << r;
      EXPECT_EQ(c.ranks[r].received, plan.bytes_received()) << uaa::strategy_name(st) << " rank " << r;
    }
  }
}

TEST(CostModel, FlopsAndImbalance) {
  // 10 tokens, 4 heads, D 8, 3 ranks, full attention: 4 * 8 * 100 FLOPs per head.
  const Lens lens = {4, 3, 3};
  const double per_head = 4.0 * 8 * 10 * 10;
  const CostEstimate u = estimate_cost(input(lens, lens, 4, 4, 8, 0), Strategy::uaa, false);
  EXPECT_EQ(u.max_flops, 2 * per_head);  // heads 2, 1, 1
  EXPECT_DOUBLE_EQ(u.imbalance, 2 / (4.0 / 3));
  const CostEstimate p = estimate_cost(input(lens, lens, 4, 4, 8, 0), Strategy::ulysses_pad, false);
  // 2 padded heads per rank, 2 padded query rows attending all 10 keys.
  EXPECT_EQ(p.max_flops, 2 * (per_head + 4.0 * 8 * 2 * 10));
  EXPECT_DOUBLE_EQ(p.pad_fraction, 1 - (10.0 * 4) / (12 * 6));
  const CostEstimate g = estimate_cost(input(lens, lens, 4, 4, 8, 0), Strategy::allgather_kv, false);
  EXPECT_EQ(g.max_flops, 4 * 4.0 * 8 * 4 * 10);
  EXPECT_GT(modelled_ms(p, {1e9, 1e9}), modelled_ms(u, {1e9, 1e9}));
}

}  // namespace
