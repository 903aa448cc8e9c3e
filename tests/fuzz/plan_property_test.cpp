// Randomized property test of the planner and the exchange layout (FAILURE_MODEL.md §5): for random
// (ranks, lengths, heads, kv heads, head dim, dtype, lse, causal) every rank builds its plan, and
//   - the head partition covers every q head once, sizes differ by at most one, and each rank's kv
//     range holds exactly the kv heads its q heads read;
//   - what rank i sends to j is what j expects from i (counts and block offsets), blocks lie inside
//     their buffers without overlapping, totals match;
//   - a simulated round trip (sender writes every element of its blocks as a formula of (global
//     token, global head, d) at the offsets of its layout, a fake exchange copies the bytes, the
//     receiver reads them back at the offsets of *its* layout) returns every element.
// UAA_PROPERTY_SEED and UAA_PROPERTY_CASES override the seed (printed on failure) and the count.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "plan/plan_data.h"
#include "uaa/plan.h"
#include "unit/fake_communicator.h"

namespace uaa::test {
namespace {

std::uint64_t env_u64(const char* name, std::uint64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtoull(v, nullptr, 0) : fallback;
}

struct Case {
  int ranks;
  std::vector<std::int64_t> q, kv;
  AttentionShape shape;
  std::string describe() const {
    std::string s = "ranks " + std::to_string(ranks) + " q [";
    for (auto x : q) s += std::to_string(x) + " ";
    s += "] kv [";
    for (auto x : kv) s += std::to_string(x) + " ";
    return s + "] heads " + std::to_string(shape.q_heads) + "/" + std::to_string(shape.kv_heads) +
           " D " + std::to_string(shape.head_dim) + " " + dtype_name(shape.dtype) +
           (shape.return_lse ? " lse" : "") + (shape.causal ? " causal" : "");
  }
};

Case random_case(std::mt19937_64& rng) {
  auto pick = [&](std::int64_t lo, std::int64_t hi) {
    return std::uniform_int_distribution<std::int64_t>(lo, hi)(rng);
  };
  Case c;
  c.ranks = static_cast<int>(pick(1, 9));
  const bool cross = pick(0, 3) == 0, tiny = pick(0, 1) == 0;
  for (int r = 0; r < c.ranks; ++r) {
    c.q.push_back(pick(0, tiny ? 5 : 70));
    c.kv.push_back(cross ? pick(0, tiny ? 5 : 70) : c.q.back());
  }
  c.shape.kv_heads = pick(1, 6);
  c.shape.q_heads = c.shape.kv_heads * pick(1, 5);
  c.shape.head_dim = pick(0, 3) == 0 ? pick(1, 256) : pick(1, 9);
  c.shape.dtype = pick(0, 1) ? DType::f32 : DType::bf16;
  c.shape.return_lse = pick(0, 1);
  c.shape.causal = pick(0, 1);
  return c;
}

// Value of element (global token, global head, d) of tensor `which` (0 q, 1 k, 2 v, 3 out, 4 lse).
std::uint16_t value(int which, std::int64_t token, std::int64_t head, std::int64_t d) {
  return static_cast<std::uint16_t>(which * 40503u + token * 2654435761u + head * 97u + d * 7u);
}

// Returns "" or the first violated property.
std::string check(const Case& c) {
  const int P = c.ranks;
  std::vector<std::unique_ptr<FakeCommunicator>> comms;
  std::vector<Plan> plans;
  for (int r = 0; r < P; ++r) {
    comms.push_back(std::make_unique<FakeCommunicator>(r, P));
    plans.push_back(Plan::from_lengths(*comms.back(), c.shape, c.q, c.kv));
  }
  const std::int64_t Hq = c.shape.q_heads, Hkv = c.shape.kv_heads, D = c.shape.head_dim;
  const std::int64_t g = Hq / Hkv, es = dtype_size(c.shape.dtype);
  // Work split: contiguous head-major ranges, whole heads when they divide, each rank receiving
  // exactly the kv heads its pieces read (the unit tests check coverage and balance in depth).
  const detail::Layout& L0 = plans[0].data().layout;
  std::int64_t at_head = 0, at_row = 0, q_total = 0;
  for (std::int64_t x : c.q) q_total += x;
  for (int r = 0; r < P; ++r) {
    const detail::RankWork& w = L0.work[r];
    if (q_total > 0 && (w.first_head != at_head || w.first_row != at_row))
      return "work range of rank " + std::to_string(r) + " does not follow its predecessor's";
    at_head = w.end_head;
    at_row = w.end_row;
    if (q_total > 0 && Hq % P == 0 && (w.pieces != 1 || w.piece[0].heads.size() != Hq / P))
      return "heads divide but rank " + std::to_string(r) + " does not get whole heads";
    if (w.pieces > 0 && (w.kv_heads.begin != w.q_heads.begin / g ||
                         w.kv_heads.end != (w.q_heads.end - 1) / g + 1))
      return "kv range of rank " + std::to_string(r) + " is not what its q heads read";
    if (w.pieces == 0 && w.kv_heads.size() != 0) return "kv heads for a rank without work";
  }
  if (q_total > 0 && (at_head != Hq || at_row != 0)) return "work split does not cover all heads";
  // Pairwise agreement and the simulated round trip, per exchange.
  std::vector<std::int64_t> q0(P + 1, 0), kv0(P + 1, 0);
  for (int r = 0; r < P; ++r) {
    q0[r + 1] = q0[r] + c.q[r];
    kv0[r + 1] = kv0[r] + c.kv[r];
  }
  std::vector<std::vector<unsigned char>> send(P), recv(P), osend(P), orecv(P);
  for (int r = 0; r < P; ++r) {
    const detail::Layout& L = plans[r].data().layout;
    for (const auto* side : {&L.qkv_send, &L.qkv_recv, &L.out_send, &L.out_recv}) {
      std::int64_t end = 0;
      for (int j = 0; j < P; ++j) {
        if (side->counts[j] < 0 || side->displs[j] < end) return "blocks overlap or are negative";
        end = side->displs[j] + side->counts[j];
      }
      if (end > side->total) return "block past the buffer total";
    }
    if (L.qkv_send.counts[r] != 0 || L.out_send.counts[r] != 0) return "self block travels";
    send[r].assign(L.qkv_send.total, 0);
    recv[r].assign(L.qkv_recv.total, 0xee);
    osend[r].assign(L.out_send.total, 0);
    orecv[r].assign(L.out_recv.total, 0xee);
  }
  auto put = [&](unsigned char* p, std::uint16_t v) { std::memcpy(p, &v, 2); };
  auto get = [&](const unsigned char* p) {
    std::uint16_t v;
    std::memcpy(&v, p, 2);
    return v;
  };
  // Senders write their blocks.
  for (int i = 0; i < P; ++i) {
    const detail::Layout& L = plans[i].data().layout;
    for (int j = 0; j < P; ++j) {
      if (j == i) continue;
      unsigned char* blk = send[i].data() + L.qkv_send.displs[j];
      const auto& b = L.qkv_send_block[j];
      const detail::RankWork& wj = L.work[j];
      const auto kvh = wj.kv_heads;
      for (int pi = 0; pi < wj.pieces; ++pi) {
        const detail::WorkPiece& pc = wj.piece[pi];
        const detail::RowRange rows = detail::rows_held(pc, L.q_tokens(i));
        const std::int64_t nh = pc.heads.size();
        for (std::int64_t t = rows.begin; t < rows.end; ++t)
          for (std::int64_t h = 0; h < nh; ++h)
            for (std::int64_t d = 0; d < D; ++d)
              put(blk + b.q[pi] + (((t - rows.begin) * nh + h) * D + d) * es,
                  value(0, t, pc.heads.begin + h, d));
      }
      for (std::int64_t t = 0; t < c.kv[i]; ++t)
        for (std::int64_t h = 0; h < kvh.size(); ++h)
          for (std::int64_t d = 0; d < D; ++d) {
            const std::int64_t at = ((t * kvh.size() + h) * D + d) * es;
            put(blk + b.k + at, value(1, kv0[i] + t, kvh.begin + h, d));
            put(blk + b.v + at, value(2, kv0[i] + t, kvh.begin + h, d));
          }
      // Output: rank i computed its pieces' rows of rank j's tokens.
      unsigned char* oblk = osend[i].data() + L.out_send.displs[j];
      const detail::RankWork& wi = L.work[i];
      for (int pi = 0; pi < wi.pieces; ++pi) {
        const detail::WorkPiece& pc = wi.piece[pi];
        const detail::RowRange rows = detail::rows_held(pc, L.q_tokens(j));
        const std::int64_t nh = pc.heads.size();
        for (std::int64_t t = rows.begin; t < rows.end; ++t)
          for (std::int64_t h = 0; h < nh; ++h) {
            const std::int64_t k = (t - rows.begin) * nh + h;
            for (std::int64_t d = 0; d < D; ++d)
              put(oblk + L.out_send_block[j].o[pi] + (k * D + d) * es,
                  value(3, t, pc.heads.begin + h, d));
            if (c.shape.return_lse)
              put(oblk + L.out_send_block[j].lse[pi] + k * 4, value(4, t, pc.heads.begin + h, 0));
          }
      }
    }
  }
  // Fake exchange: the bytes i sends to j land where j expects i's block.
  for (int i = 0; i < P; ++i)
    for (int j = 0; j < P; ++j) {
      if (i == j) continue;
      const detail::Layout& Li = plans[i].data().layout;
      const detail::Layout& Lj = plans[j].data().layout;
      if (Li.qkv_send.counts[j] != Lj.qkv_recv.counts[i] || Li.out_send.counts[j] != Lj.out_recv.counts[i])
        return "rank " + std::to_string(i) + " sends " + std::to_string(j) + " another count than it expects";
      if (Li.qkv_max_total != Lj.qkv_max_total || Li.out_max_total != Lj.out_max_total)
        return "ranks disagree on the size class";
      if (Li.qkv_send.counts[j] > 0)
        std::memcpy(recv[j].data() + Lj.qkv_recv.displs[i], send[i].data() + Li.qkv_send.displs[j],
                    Li.qkv_send.counts[j]);
      if (Li.out_send.counts[j] > 0)
        std::memcpy(orecv[j].data() + Lj.out_recv.displs[i], osend[i].data() + Li.out_send.displs[j],
                    Li.out_send.counts[j]);
    }
  // Receivers read back with their own layout.
  for (int j = 0; j < P; ++j) {
    const detail::Layout& L = plans[j].data().layout;
    const detail::RankWork& wj = L.work[j];
    const auto kvh = wj.kv_heads;
    for (int i = 0; i < P; ++i) {
      if (i == j) continue;
      const unsigned char* blk = recv[j].data() + L.qkv_recv.displs[i];
      const auto& b = L.qkv_recv_block[i];
      for (int pi = 0; pi < wj.pieces; ++pi) {
        const detail::WorkPiece& pc = wj.piece[pi];
        const detail::RowRange rows = detail::rows_held(pc, L.q_tokens(i));
        const std::int64_t nh = pc.heads.size();
        for (std::int64_t t = rows.begin; t < rows.end; ++t)
          for (std::int64_t h = 0; h < nh; ++h)
            for (std::int64_t d = 0; d < D; ++d)
              if (get(blk + b.q[pi] + (((t - rows.begin) * nh + h) * D + d) * es) !=
                  value(0, t, pc.heads.begin + h, d))
                return "q element lost from rank " + std::to_string(i) + " to " + std::to_string(j);
      }
      for (std::int64_t t = 0; t < c.kv[i]; ++t)
        for (std::int64_t h = 0; h < kvh.size(); ++h)
          for (std::int64_t d = 0; d < D; ++d) {
            const std::int64_t at = ((t * kvh.size() + h) * D + d) * es;
            if (get(blk + b.k + at) != value(1, kv0[i] + t, kvh.begin + h, d) ||
                get(blk + b.v + at) != value(2, kv0[i] + t, kvh.begin + h, d))
              return "k/v element lost from rank " + std::to_string(i) + " to " + std::to_string(j);
          }
      const unsigned char* oblk = orecv[j].data() + L.out_recv.displs[i];
      const detail::RankWork& wi = L.work[i];
      for (int pi = 0; pi < wi.pieces; ++pi) {
        const detail::WorkPiece& pc = wi.piece[pi];
        const detail::RowRange rows = detail::rows_held(pc, L.q_tokens(j));
        const std::int64_t nh = pc.heads.size();
        for (std::int64_t t = rows.begin; t < rows.end; ++t)
          for (std::int64_t h = 0; h < nh; ++h) {
            const std::int64_t k = (t - rows.begin) * nh + h;
            for (std::int64_t d = 0; d < D; ++d)
              if (get(oblk + L.out_recv_block[i].o[pi] + (k * D + d) * es) !=
                  value(3, t, pc.heads.begin + h, d))
                return "out element lost from rank " + std::to_string(i) + " to " + std::to_string(j);
            if (c.shape.return_lse &&
                get(oblk + L.out_recv_block[i].lse[pi] + k * 4) != value(4, t, pc.heads.begin + h, 0))
              return "lse element lost";
          }
      }
    }
  }
  return {};
}

TEST(PlanProperty, RandomLayoutsAgreeAcrossRanksAndRoundTrip) {
  const std::uint64_t seed = env_u64("UAA_PROPERTY_SEED", 20240601);
  const std::uint64_t cases = env_u64("UAA_PROPERTY_CASES", 10000);
  std::mt19937_64 rng(seed);
  for (std::uint64_t n = 0; n < cases; ++n) {
    const Case c = random_case(rng);
    std::string problem;
    try {
      problem = check(c);
    } catch (const std::exception& e) {
      problem = std::string("threw: ") + e.what();
    }
    ASSERT_TRUE(problem.empty()) << problem << "\n  case " << n << ": " << c.describe()
                                 << "\n  reproduce: UAA_PROPERTY_SEED=" << seed
                                 << " (case " << n << " of that sequence)";
  }
}

}  // namespace
}  // namespace uaa::test
