// Exchange programs (src/program/program.h) of every strategy, every rank of a world compiled in one
// process and checked against each other and against a simulated transport (the checks are in
// tests/unit/program_checks.h; the randomized sweep is tests/fuzz/plan_property_test.cpp). Also: the
// byte counts each strategy promises, derived here independently, 64-bit exact counts, the cost of
// one rank's program at 65,536 ranks, and mutations of correct programs that every check must
// catch (so that none of them passes vacuously).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "common/test_rng.h"
#include "plan/layout.h"
#include "program/program.h"
#include "unit/program_checks.h"

namespace {

using uaa::detail::compile_uaa_forward;
using uaa::detail::ComputeStep;
using uaa::detail::Geometry;
using uaa::detail::Part;
using uaa::detail::PeerParts;
using uaa::detail::Program;
using uaa::detail::RankWork;
using uaa::detail::Slot;
using uaa::test::check_programs;
using uaa::test::compile_all;
using uaa::test::compile_and_check;
using uaa::test::Gen;
using uaa::test::geometry_str;
using Lens = std::vector<std::int64_t>;
using i64 = std::int64_t;

Geometry geom(Lens q, Lens kv, i64 hq, i64 hkv, i64 d, i64 elem = 4, bool causal = false,
              bool lse = false) {
  Geometry g;
  g.q_lens = std::move(q);
  g.kv_lens = std::move(kv);
  g.q_heads = hq;
  g.kv_heads = hkv;
  g.head_dim = d;
  g.elem_bytes = elem;
  g.causal = causal;
  g.with_lse = lse;
  return g;
}

std::vector<i64> divisors(i64 n) {
  std::vector<i64> d;
  for (i64 i = 1; i <= n; ++i)
    if (n % i == 0) d.push_back(i);
  return d;
}

bool ulysses_runs(const Geometry& g) {  // what strategy ulysses requires (plan.h)
  const i64 P = static_cast<i64>(g.q_lens.size());
  for (std::size_t r = 0; r < g.q_lens.size(); ++r)
    if (g.q_lens[r] != g.q_lens[0] || g.kv_lens[r] != g.kv_lens[0]) return false;
  return g.q_heads % P == 0;
}

// Simulations left out for size (each test that sweeps expects none).
int g_round_trips_skipped = 0;

// Every generator, every property; "" or the problems found. (Strategy ulysses compiles with the
// padded generator: on geometries it accepts, that is plain Ulysses.)
std::string check_all(const Geometry& g) {
  std::string problems;
  for (Gen k : {Gen::uaa, Gen::padded, Gen::allgather}) {
    try {
      const uaa::test::CheckResult r = compile_and_check(g, k);
      g_round_trips_skipped += r.round_trip_skipped;
      if (!r.problem.empty()) problems += r.problem + "\n";
    } catch (const std::exception& e) {
      problems += std::string(uaa::test::gen_name(k)) + " threw " + e.what() + " on " + geometry_str(g) + "\n";
    }
  }
  return problems;
}

// ---- every property, hand-picked and swept ------------------------------------------------------

TEST(Program, HandPickedGeometries) {
  const std::vector<Geometry> cases = {
      geom({4096, 4096}, {4096, 4096}, 24, 24, 128),
      geom({3969, 512, 0}, {3969, 512, 0}, 24, 24, 128, 2, false, true),  // FLUX.1 at 1008^2
      geom({1121, 1120, 1120, 1120}, {1121, 1120, 1120, 1120}, 30, 30, 128, 2, true, true),
      geom({1}, {0}, 30, 1, 8, 4, false, true),
      geom({0, 0, 0, 0, 0, 0, 0, 0, 0}, {0, 0, 0, 0, 0, 0, 0, 0, 0}, 3, 3, 4),  // nothing at all
      geom({0, 0, 5}, {7, 0, 0}, 6, 2, 3, 2, true, true),
      geom({5, 0, 7, 11}, {3, 1, 0, 2}, 7, 7, 100, 4, true, true),
      geom({2, 9, 0}, {5, 5, 5}, 6, 2, 8),
      geom({50, 3, 97, 0}, {60, 0, 41, 7}, 6, 3, 4, 2, true, true),   // q > kv: rows that see no key
      geom({13, 13, 13, 13, 13}, {1, 1, 1, 1, 1}, 40, 8, 5, 2, true, false),
      geom({48, 48, 48}, {48, 48, 48}, 5, 1, 2, 4, true, true),        // MQA, heads shared by ranks
      geom({97, 1, 0, 61, 2, 3, 5, 7}, {3, 1, 4, 1, 5, 9, 2, 6}, 24, 8, 7, 2, true, true),
      geom({4481, 0}, {1, 4480}, 1, 1, 1, 2, true, true),
  };
  g_round_trips_skipped = 0;
  for (const Geometry& g : cases) {
    const std::string p = check_all(g);
    EXPECT_TRUE(p.empty()) << p;
  }
  EXPECT_EQ(g_round_trips_skipped, 0);
}

// More ranks than heads and than tokens: most ranks compute rows of one head, some hold nothing.
TEST(Program, SixtyFourRanksTinyShards) {
  Geometry g = geom({}, {}, 24, 8, 3, 2, true, true);
  for (int r = 0; r < 64; ++r) {
    g.q_lens.push_back(r % 4);
    g.kv_lens.push_back((r * 7) % 5);
  }
  g_round_trips_skipped = 0;
  const std::string p = check_all(g);
  EXPECT_TRUE(p.empty()) << p;
  EXPECT_EQ(g_round_trips_skipped, 0);
}

// Programs are pure functions of the geometry and the rank.
TEST(Program, CompilingTwiceGivesTheSameProgram) {
  const Geometry g = geom({50, 3, 97, 0}, {60, 0, 41, 7}, 6, 3, 4, 2, true, true);
  for (Gen k : {Gen::uaa, Gen::padded, Gen::allgather}) {
    const std::vector<Program> a = compile_all(g, k), b = compile_all(g, k);
    for (std::size_t r = 0; r < a.size(); ++r)
      EXPECT_EQ(uaa::detail::describe(a[r]), uaa::detail::describe(b[r])) << uaa::test::gen_name(k) << " rank " << r;
  }
}

TEST(Program, AwkwardLengthsHeadsAndWorlds) {
  const i64 lens[] = {0, 1, 2, 3, 5, 7, 13, 47, 48, 49, 97};
  const i64 heads[] = {1, 3, 5, 7, 24, 30, 40};
  uaa::test::Rng rng(20250611);
  int checked = 0;
  g_round_trips_skipped = 0;
  for (int P : {1, 2, 3, 4, 5, 7, 8, 12, 16}) {
    for (i64 hq : heads) {
      const std::vector<i64> kv = divisors(hq);
      for (int rep = 0; rep < 3; ++rep) {
        Geometry g;
        const bool cross = rng.uniform(0, 2) == 0;
        for (int r = 0; r < P; ++r) {
          g.q_lens.push_back(rng.pick(lens));
          g.kv_lens.push_back(cross ? rng.pick(lens) : g.q_lens.back());
        }
        g.q_heads = hq;
        g.kv_heads = kv[static_cast<std::size_t>(rng.uniform(0, static_cast<i64>(kv.size()) - 1))];
        g.head_dim = rng.uniform(1, 6);
        g.elem_bytes = rng.uniform(0, 1) ? 2 : 4;
        g.causal = rng.uniform(0, 1);
        g.with_lse = rng.uniform(0, 1);
        const std::string p = check_all(g);
        ASSERT_TRUE(p.empty()) << p;
        ++checked;
      }
    }
  }
  EXPECT_GT(checked, 100);
  EXPECT_EQ(g_round_trips_skipped, 0);
}

TEST(Program, UlyssesShapedGeometriesAllStrategies) {
  // What strategy ulysses accepts (equal shards, heads dividing): nothing to pad.
  for (int P : {1, 2, 3, 4, 6, 8})
    for (i64 per : {0, 1, 5, 48, 49})
      for (i64 group : {1, 2, 3}) {
        const i64 hq = P * 2 * group;
        Geometry g = geom(Lens(P, per), Lens(P, per + (group == 2 ? 3 : 0)), hq, hq / group, 3, 2,
                          group != 3, group == 1);
        ASSERT_TRUE(ulysses_runs(g));
        const std::string p = check_all(g);
        ASSERT_TRUE(p.empty()) << p;
      }
}

// ---- uaa ----------------------------------------------------------------------------------------

// Plain Ulysses (MHA, S/P tokens per rank, heads dividing, no lse): every rank sends q, k, v of its
// tokens for the other ranks' heads and gets back their output: 4 * S * H * D * es * (P-1) / P^2.
TEST(ProgramUaa, WholeHeadsMovePlainUlyssesBytes) {
  for (int P : {2, 3, 4, 8})
    for (i64 es : {2, 4}) {
      const i64 S = 96 * P, H = 24, D = 128;
      const Geometry g = geom(Lens(P, S / P), Lens(P, S / P), H, H, D, es, true, false);
      const std::vector<Program> all = compile_all(g, Gen::uaa);
      const i64 want = 4 * S * H * D * es * (P - 1) / (i64{P} * P);
      for (int r = 0; r < P; ++r) {
        EXPECT_EQ(all[r].bytes_sent(), want) << "P " << P << " rank " << r;
        EXPECT_EQ(all[r].bytes_received(), want) << "P " << P << " rank " << r;
        // The own block never travels; one step (whole heads), own rows read in place.
        ASSERT_EQ(all[r].compute.size(), 1u);
        EXPECT_EQ(all[r].compute[0].q_head_begin, r * H / P);
        EXPECT_EQ(all[r].compute[0].q_heads, H / P);
      }
    }
}

// 30 heads on 4 ranks, 4481 tokens (FLUX.1): uaa moves less than padded Ulysses (which pads the
// heads to 32 and the tokens to 4 x 1121).
TEST(ProgramUaa, SharedHeadsMoveLessThanPaddedUlysses) {
  const Lens lens = {1121, 1120, 1120, 1120};
  const Geometry g = geom(lens, lens, 30, 30, 128, 2, false, false);
  const std::vector<Program> u = compile_all(g, Gen::uaa), p = compile_all(g, Gen::padded);
  for (int r = 0; r < 4; ++r) {
    EXPECT_LT(u[r].bytes_sent(), p[r].bytes_sent()) << "rank " << r;
    EXPECT_LT(u[r].bytes_received(), p[r].bytes_received()) << "rank " << r;
  }
}

// A rank's own rows are read from and written to the caller's tensors, never staged.
TEST(ProgramUaa, OwnRowsStayInTheCallersTensors) {
  const Geometry g = geom({50, 3, 97, 0}, {60, 0, 41, 7}, 6, 3, 4, 2, true, true);
  const std::vector<Program> all = compile_all(g, Gen::uaa);
  for (int r = 0; r < 4; ++r) {
    i64 own_rows = 0;
    for (const ComputeStep& c : all[r].compute)
      for (const auto& q : c.q)
        if (q.q.slot == Slot::q) {
          EXPECT_EQ(q.out.slot, Slot::out);
          EXPECT_EQ(q.lse.slot, Slot::lse);
          own_rows += q.tokens * c.q_heads;
        } else {
          EXPECT_EQ(q.q.slot, Slot::stage_in);
          EXPECT_EQ(q.out.slot, Slot::stage_out);
        }
    // q rows (token x head) of this rank that leave it: all but the ones it computes itself.
    i64 q_left = 0;
    for (const Part& pt : all[r].in.send_parts)
      if (pt.src.slot == Slot::q) q_left += pt.tokens * pt.heads;
    EXPECT_EQ(q_left + own_rows, g.q_lens[r] * g.q_heads) << "rank " << r;
  }
}

// ---- ulysses / ulysses_pad ----------------------------------------------------------------------

TEST(ProgramPadded, PadsTokensToCeilAndHeadsToAMultipleOfTheRanks) {
  // 4481 tokens (FLUX at 1008^2) on 4 ranks, Z-Image's 30 heads: blocks of 1121 rows x 8 heads.
  const Lens lens = {1121, 1120, 1120, 1120};
  const Geometry g = geom(lens, lens, 30, 30, 128, 4, false, true);
  const std::vector<Program> all = compile_all(g, Gen::padded);
  const i64 part = 1121 * 8 * 128 * 4, lse = 1121 * 8 * 4;
  for (int r = 0; r < 4; ++r) {
    const Program& p = all[r];
    ASSERT_EQ(p.in.send.size(), 4u) << "every block travels, the own one included";
    ASSERT_EQ(p.out.recv.size(), 4u);
    EXPECT_EQ(p.in.send[r].peer, r);
    EXPECT_EQ(p.bytes_sent(), 3 * (3 * part + part + lse));
    EXPECT_EQ(p.bytes_received(), 3 * (3 * part + part + lse));
    // Padding is read from Slot::pad: padded heads (rank 3 computes heads 24..31 of 30) and rows.
    i64 pad_bytes = 0;
    for (const Part& pt : p.in.send_parts)
      if (pt.src.slot == Slot::pad) pad_bytes += pt.bytes();
    const i64 pad_rows = 1121 - lens[r];  // to every rank, q/k/v rows past the shard
    const i64 pad_heads_q = 2 * lens[r];  // to rank 3 only: q heads 30 and 31 of my rows
    const i64 pad_heads_kv = 2 * 2 * lens[r];
    EXPECT_EQ(pad_bytes, (4 * pad_rows * 8 * 3 + pad_heads_q + pad_heads_kv) * 128 * 4) << "rank " << r;
  }
  const std::string problem = check_programs(g, all, Gen::padded).problem;
  EXPECT_TRUE(problem.empty()) << problem;
}

TEST(ProgramPadded, NothingToPadIsPlainUlyssesWithTheOwnBlockTravelling) {
  const Lens lens = {8, 8};
  const Geometry g = geom(lens, lens, 4, 4, 16, 4, true, false);
  const std::vector<Program> pad = compile_all(g, Gen::padded), u = compile_all(g, Gen::uaa);
  for (int r = 0; r < 2; ++r) {
    for (const auto* parts : {&pad[r].in.send_parts, &pad[r].in.recv_parts, &pad[r].out.send_parts,
                              &pad[r].out.recv_parts})
      for (const Part& pt : *parts) EXPECT_TRUE(pt.src.slot != Slot::pad && pt.dst.slot != Slot::pad);
    // To other ranks: exactly what uaa sends; plus the own block through the exchange.
    EXPECT_EQ(pad[r].bytes_sent(), u[r].bytes_sent());
    EXPECT_EQ(pad[r].bytes_received(), u[r].bytes_received());
    ASSERT_EQ(pad[r].in.send.size(), 2u);
  }
}

TEST(ProgramPadded, UnevenShardsPadToTheLongestAndGqaCoversEveryQueryHead) {
  // q rows padded to 9 (longer than ceil(11 / 3) = 4), kv rows to 5; q heads [0,2) [2,4) [4,6),
  // group 3: kv heads [0,1) [0,2) [1,2), two per rank.
  const Geometry g = geom({2, 9, 0}, {5, 5, 5}, 6, 2, 8, 4, true, true);
  const std::vector<Program> all = compile_all(g, Gen::padded);
  const i64 row = 8 * 4;
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(all[r].bytes_sent(), 2 * ((9 * 2 + 2 * 5 * 2) * row + 9 * 2 * (row + 4)));
    ASSERT_FALSE(all[r].compute.empty());
    EXPECT_EQ(all[r].compute[0].q_head_begin, 2 * r);
    EXPECT_EQ(all[r].compute[0].q_heads, 2);
  }
  const std::string problem = check_programs(g, all, Gen::padded).problem;
  EXPECT_TRUE(problem.empty()) << problem;
}

// ---- allgather_kv -------------------------------------------------------------------------------

TEST(ProgramAllgather, EveryRankGetsEveryOthersKeysAndValues) {
  const Lens q = {3, 0, 7, 1}, kv = {5, 11, 0, 2};
  const Geometry g = geom(q, kv, 6, 3, 8, 4, true, true);
  const std::vector<Program> all = compile_all(g, Gen::allgather);
  const i64 row = 8 * 4;
  for (int r = 0; r < 4; ++r) {
    const Program& p = all[r];
    EXPECT_TRUE(p.out.send.empty() && p.out.recv.empty());
    EXPECT_EQ(p.bytes_sent(), 3 * 2 * kv[r] * 3 * row);
    i64 others = 0;
    for (int j = 0; j < 4; ++j)
      if (j != r) others += kv[j];
    EXPECT_EQ(p.bytes_received(), 2 * others * 3 * row);
    EXPECT_EQ(p.compute.size(), q[r] > 0 ? 1u : 0u);
  }
  const std::string problem = check_programs(g, all, Gen::allgather).problem;
  EXPECT_TRUE(problem.empty()) << problem;
}

// ---- scale --------------------------------------------------------------------------------------

// Counts past 2^31 bytes and token offsets past 2^31 are exact: bytes recomputed in 128-bit.
TEST(Program, LargeCountsAre64BitExact) {
  using i128 = __int128;
  struct Big {
    Lens q, kv;
    i64 hq, hkv, dim, elem;
  };
  const Big bigs[] = {
      {{10'000'000, 10'000'001, 9'999'999}, {10'000'000, 10'000'001, 9'999'999}, 39, 39, 128, 4},
      {{10'000'000, 7}, {3, 12'345'678}, 40, 8, 128, 2},
      {{1'500'000'000, 1'500'000'001, 1'499'999'999, 1'000'000'007},
       {2'000'000'000, 1, 0, 2'100'000'000}, 32, 1, 256, 4},
  };
  uaa::test::CheckOptions structural;
  structural.round_trip = false;
  for (const Big& b : bigs) {
    const Geometry g = geom(b.q, b.kv, b.hq, b.hkv, b.dim, b.elem, true, true);
    SCOPED_TRACE(geometry_str(g));
    const int P = static_cast<int>(b.q.size());
    const i128 row = static_cast<i128>(b.dim) * b.elem;
    bool past_2_31 = false;
    for (Gen k : {Gen::uaa, Gen::padded, Gen::allgather}) {
      const std::vector<Program> all = compile_all(g, k);
      const uaa::test::CheckResult res = check_programs(g, all, k, structural);
      EXPECT_TRUE(res.problem.empty()) << res.problem;
      for (int r = 0; r < P; ++r)
        for (const Part& pt : all[r].in.send_parts) {
          EXPECT_TRUE(static_cast<i128>(pt.tokens) * pt.heads * pt.row_bytes == static_cast<i128>(pt.bytes()));
          past_2_31 |= pt.bytes() > (i64{1} << 31) || pt.src.token > (i64{1} << 31);
        }
      if (k == Gen::uaa && b.hq % P == 0) {
        // Whole heads: recomputed in 128-bit.
        for (int r = 0; r < P; ++r) {
          i128 want = 0;
          for (int j = 0; j < P; ++j) {
            if (j == r) continue;
            const i128 h = b.hq / P, g2 = b.hq / b.hkv;
            const i128 nkv = ((j + 1) * h - 1) / g2 - (j * h) / g2 + 1;
            want += b.q[r] * h * row + 2 * b.kv[r] * nkv * row + b.q[j] * h * (row + 4);
          }
          EXPECT_TRUE(static_cast<i128>(all[r].bytes_sent()) == want)
              << "rank " << r << ": " << all[r].bytes_sent() << " vs " << static_cast<long double>(want);
        }
      }
      if (k == Gen::allgather) {
        for (int r = 0; r < P; ++r) {
          EXPECT_TRUE(static_cast<i128>(all[r].bytes_sent()) == (P - 1) * 2 * b.kv[r] * b.hkv * row);
        }
      }
    }
    EXPECT_TRUE(past_2_31) << "case does not exercise counts past 2^31";
  }
}

// One rank's uaa program at 65,536 ranks (1..7 tokens each, 24 heads) holds O(P) parts: at most 5
// per peer and exchange side (in: up to 3 query pieces + k + v; out: one part per piece). No time is
// asserted.
TEST(Program, OneRankAtSixtyFiveThousandRanksIsLinear) {
  const int P = 65536;
  Geometry g;
  uaa::test::Rng rng(7);
  for (int r = 0; r < P; ++r) {
    g.q_lens.push_back(rng.uniform(1, 7));
    g.kv_lens.push_back(g.q_lens.back());
  }
  g.q_heads = g.kv_heads = 24;
  g.head_dim = 128;
  g.elem_bytes = 2;
  g.causal = true;
  const std::vector<RankWork> work = uaa::detail::split_work(uaa::test::work_input_of(g));
  for (int r : {0, 1, 12345, P / 2, P - 1}) {
    const Program p = compile_uaa_forward(g, work, r);
    EXPECT_LE(p.in.send.size(), static_cast<std::size_t>(P - 1));
    EXPECT_LE(p.in.recv.size(), static_cast<std::size_t>(P - 1));
    EXPECT_LE(p.in.send_parts.size(), 5 * p.in.send.size()) << "rank " << r;
    EXPECT_LE(p.in.recv_parts.size(), 5 * p.in.recv.size()) << "rank " << r;
    EXPECT_LE(p.out.send_parts.size(), 5 * p.out.send.size()) << "rank " << r;
    EXPECT_LE(p.out.recv_parts.size(), 5 * p.out.recv.size()) << "rank " << r;
    std::size_t segments = 0;
    for (const ComputeStep& c : p.compute) segments += c.q.size() + c.kv.size();
    EXPECT_LE(segments, 6u * P) << "rank " << r;
    EXPECT_LE(p.compute.size(), 3u);
  }
}

// ---- the checks themselves: mutations of correct programs must be caught -------------------------

// A geometry whose uaa programs have everything: heads shared by two ranks (6 heads on 4 ranks),
// GQA, causal with q > kv, lse, an empty rank.
Geometry mutation_geometry() { return geom({50, 3, 97, 0}, {60, 0, 41, 7}, 6, 3, 4, 2, true, true); }

// Applies `mutate` to a copy of the programs and returns the problem the checks report.
std::string after(const Geometry& g, Gen k, const std::function<bool(std::vector<Program>&)>& mutate) {
  std::vector<Program> all = compile_all(g, k);
  if (!mutate(all)) return "mutation found nothing to mutate";
  return check_programs(g, all, k).problem;
}

// The i-th part r sends to j (and j's matching receive part), or null.
std::pair<Part*, Part*> part_pair(std::vector<Program>& all, bool in, int r, int j, std::size_t i) {
  auto& a = in ? all[r].in : all[r].out;
  auto& b = in ? all[j].in : all[j].out;
  const PeerParts* s = nullptr;
  const PeerParts* t = nullptr;
  for (const PeerParts& e : a.send)
    if (e.peer == j) s = &e;
  for (const PeerParts& e : b.recv)
    if (e.peer == r) t = &e;
  if (!s || !t || s->begin + i >= s->end) return {nullptr, nullptr};
  return {&a.send_parts[s->begin + i], &b.recv_parts[t->begin + i]};
}

// Removes the i-th part r sends to j from both sides, fixing the ranges.
bool drop_part(std::vector<Program>& all, bool in, int r, int j, std::size_t i) {
  auto drop = [&](std::vector<Part>& parts, std::vector<PeerParts>& list, int peer) {
    for (std::size_t e = 0; e < list.size(); ++e) {
      if (list[e].peer != peer) continue;
      const std::uint32_t at = list[e].begin + static_cast<std::uint32_t>(i);
      parts.erase(parts.begin() + at);
      for (PeerParts& x : list) {
        if (x.begin > at) --x.begin;
        if (x.end > at) --x.end;
      }
      if (list[e].begin == list[e].end) list.erase(list.begin() + static_cast<std::ptrdiff_t>(e));
      return;
    }
  };
  if (!part_pair(all, in, r, j, i).first) return false;
  auto& a = in ? all[r].in : all[r].out;
  auto& b = in ? all[j].in : all[j].out;
  drop(a.send_parts, a.send, j);
  drop(b.recv_parts, b.recv, r);
  return true;
}

bool starts_with(const std::string& s, const char* prefix) { return s.rfind(prefix, 0) == 0; }

TEST(ProgramChecks, CorrectProgramsPass) {
  for (Gen k : {Gen::uaa, Gen::padded, Gen::allgather}) {
    const std::string p = after(mutation_geometry(), k, [](std::vector<Program>&) { return true; });
    EXPECT_TRUE(p.empty()) << p;
  }
}

TEST(ProgramChecks, CatchBrokenPeerLists) {
  std::string p = after(mutation_geometry(), Gen::uaa, [](std::vector<Program>& all) {
    if (all[0].in.send.size() < 2) return false;
    std::swap(all[0].in.send[0], all[0].in.send[1]);
    return true;
  });
  EXPECT_TRUE(starts_with(p, "[peers]")) << p;
  p = after(mutation_geometry(), Gen::uaa, [](std::vector<Program>& all) {
    all[2].out.recv[0].end = all[2].out.recv[0].begin;
    return true;
  });
  EXPECT_TRUE(starts_with(p, "[peers]")) << p;
  p = after(mutation_geometry(), Gen::padded, [](std::vector<Program>& all) {
    all[1].in.send_parts.push_back(all[1].in.send_parts[0]);  // in no peer's range
    return true;
  });
  EXPECT_TRUE(starts_with(p, "[peers]")) << p;
}

TEST(ProgramChecks, CatchAsymmetricParts) {
  std::string p = after(mutation_geometry(), Gen::uaa, [](std::vector<Program>& all) {
    auto [s, t] = part_pair(all, true, 0, 2, 0);
    if (!t) return false;
    t->dst.offset += 64;  // the receiver expects it elsewhere
    return true;
  });
  EXPECT_TRUE(starts_with(p, "[symmetry]")) << p;
  // The receiver splits its parts between two senders differently (counts differ).
  p = after(mutation_geometry(), Gen::allgather, [](std::vector<Program>& all) {
    auto& recv = all[0].in.recv;
    if (recv.size() < 2 || recv[0].end - recv[0].begin < 2 || recv[0].end != recv[1].begin) return false;
    --recv[0].end;
    --recv[1].begin;
    return true;
  });
  EXPECT_TRUE(starts_with(p, "[symmetry]")) << p;
}

TEST(ProgramChecks, CatchPlacesOutOfBounds) {
  std::string p = after(mutation_geometry(), Gen::uaa, [](std::vector<Program>& all) {
    auto [s, t] = part_pair(all, true, 2, 0, 0);
    if (!s) return false;
    s->dst.offset = t->dst.offset = all[0].stage_in_bytes - 2;  // runs past the receiver's staging
    return true;
  });
  EXPECT_TRUE(starts_with(p, "[bounds]")) << p;
  const Geometry mg = mutation_geometry();
  p = after(mg, Gen::uaa, [&](std::vector<Program>& all) {
    for (int r = 0; r < 4; ++r)
      for (int j = 0; j < 4; ++j) {
        auto [s, t] = part_pair(all, false, r, j, 0);
        if (!s || s->dst.slot != Slot::out) continue;
        s->dst.token = t->dst.token = mg.q_lens[j] - s->tokens + 1;  // one token past j's out
        return true;
      }
    return false;
  });
  EXPECT_TRUE(starts_with(p, "[bounds]")) << p;
  p = after(mg, Gen::uaa, [](std::vector<Program>& all) {
    for (Program& prog : all)
      for (ComputeStep& c : prog.compute)
        for (auto& q : c.q)
          if (q.q.slot == Slot::q) {
            q.q.head = 6 - c.q_heads + 1;  // the block's last head one past the tensor's
            return true;
          }
    return false;
  });
  EXPECT_TRUE(starts_with(p, "[bounds]")) << p;
  p = after(mutation_geometry(), Gen::padded, [](std::vector<Program>& all) {
    all[1].stage_out_bytes /= 2;
    return true;
  });
  EXPECT_TRUE(starts_with(p, "[bounds]")) << p;
}

TEST(ProgramChecks, CatchWastedStaging) {
  for (Gen k : {Gen::uaa, Gen::padded, Gen::allgather}) {
    const std::string p = after(mutation_geometry(), k, [](std::vector<Program>& all) {
      all[2].stage_in_bytes += 4096;
      return true;
    });
    EXPECT_TRUE(starts_with(p, "[staging]")) << p;
  }
}

TEST(ProgramChecks, CatchOverlappingStaging) {
  std::string p = after(mutation_geometry(), Gen::uaa, [](std::vector<Program>& all) {
    // A receive moved onto an earlier one of another sender (still inside the staging).
    const auto& recv = all[0].in.recv;
    if (recv.size() < 2) return false;
    auto [s0, t0] = part_pair(all, true, recv[0].peer, 0, 0);
    auto [s1, t1] = part_pair(all, true, recv[1].peer, 0, 0);
    if (!t0 || !t1 || t0->dst.slot != Slot::stage_in || t1->dst.slot != Slot::stage_in) return false;
    if (t1->dst.offset < t0->dst.offset) {
      std::swap(s0, s1);
      std::swap(t0, t1);
    }
    s1->dst.offset = t1->dst.offset = t0->dst.offset;
    return true;
  });
  EXPECT_TRUE(starts_with(p, "[overlap]")) << p;
  p = after(mutation_geometry(), Gen::uaa, [](std::vector<Program>& all) {
    for (Program& prog : all)
      for (ComputeStep& c : prog.compute)
        for (std::size_t i = 1; i < c.q.size(); ++i)
        if (c.q[i].out.slot == Slot::stage_out && c.q[i - 1].out.slot == Slot::stage_out) {
          c.q[i].out.offset = c.q[i - 1].out.offset;
          return true;
        }
    return false;
  });
  EXPECT_TRUE(starts_with(p, "[overlap]")) << p;
}

TEST(ProgramChecks, CatchLostAndDuplicatedOutput) {
  // An output part dropped on both sides: computed rows never sent, out elements never written
  // (the bytes check sees it first).
  std::string p = after(mutation_geometry(), Gen::uaa, [](std::vector<Program>& all) {
    for (int r = 0; r < 4; ++r)
      for (int j = 0; j < 4; ++j)
        if (drop_part(all, false, r, j, 0)) return true;
    return false;
  });
  EXPECT_TRUE(starts_with(p, "[bytes]") || starts_with(p, "[coverage]")) << p;
  // An output part delivered one token off (same bytes, in bounds): one row written twice, one
  // never.
  const Geometry mg = mutation_geometry();
  p = after(mg, Gen::uaa, [&](std::vector<Program>& all) {
    for (int r = 0; r < 4; ++r)
      for (int j = 0; j < 4; ++j) {
        auto [s, t] = part_pair(all, false, r, j, 0);
        if (!s || s->dst.slot != Slot::out) continue;
        const i64 to = s->dst.token + s->tokens < mg.q_lens[j] ? s->dst.token + 1 : s->dst.token - 1;
        if (to < 0) continue;
        s->dst.token = t->dst.token = to;
        return true;
      }
    return false;
  });
  EXPECT_TRUE(starts_with(p, "[coverage]")) << p;
  // A compute step run twice: its rows written twice.
  p = after(mutation_geometry(), Gen::uaa, [](std::vector<Program>& all) {
    all[2].compute.push_back(all[2].compute[0]);
    return true;
  });
  EXPECT_TRUE(starts_with(p, "[overlap]") || starts_with(p, "[coverage]")) << p;
  p = after(mutation_geometry(), Gen::allgather, [](std::vector<Program>& all) {
    all[2].compute.push_back(all[2].compute[0]);
    return true;
  });
  EXPECT_FALSE(p.empty());
  // Without a step: what it would have sent is no longer written.
  p = after(mutation_geometry(), Gen::uaa, [](std::vector<Program>& all) {
    for (int r = 0; r < 4; ++r)
      if (!all[r].compute.empty() && !all[r].out.send.empty()) {
        all[r].compute.erase(all[r].compute.begin());
        return true;
      }
    return false;
  });
  EXPECT_TRUE(starts_with(p, "[coverage]") || starts_with(p, "[staging]")) << p;
}

TEST(ProgramChecks, CatchWhatTheKernelWouldReadWrong) {
  // Query segments out of global order: rows at the wrong causal position.
  std::string p = after(mutation_geometry(), Gen::uaa, [](std::vector<Program>& all) {
    for (Program& prog : all)
      for (ComputeStep& c : prog.compute)
        if (c.q.size() >= 2 && c.q[0].tokens != c.q[1].tokens) {
          std::swap(c.q[0], c.q[1]);
          return true;
        }
    return false;
  });
  EXPECT_TRUE(starts_with(p, "[round trip]")) << p;
  // A q part from the wrong tokens of the sender (same size, in bounds).
  const Geometry mg = mutation_geometry();
  p = after(mg, Gen::uaa, [&](std::vector<Program>& all) {
    for (int r = 0; r < 4; ++r)
      for (int j = 0; j < 4; ++j)
        for (std::size_t i = 0; part_pair(all, true, r, j, i).first; ++i) {
          auto [s, t] = part_pair(all, true, r, j, i);
          if (s->src.slot == Slot::q && s->src.token + s->tokens < mg.q_lens[r]) {
            s->src.token = t->src.token = s->src.token + 1;
            return true;
          }
        }
    return false;
  });
  EXPECT_TRUE(starts_with(p, "[round trip]")) << p;
  // Keys of another kv head.
  p = after(mutation_geometry(), Gen::padded, [](std::vector<Program>& all) {
    for (std::size_t i = 0;; ++i) {
      auto [s, t] = part_pair(all, true, 0, 1, i);
      if (!s) return false;
      if (s->src.slot != Slot::k) continue;
      const i64 head = s->src.head + s->heads < 3 ? s->src.head + 1 : s->src.head - 1;
      if (head < 0) return false;
      s->src.head = t->src.head = head;
      return true;
    }
  });
  EXPECT_TRUE(starts_with(p, "[round trip]")) << p;
  // A kernel told the wrong first row.
  p = after(mutation_geometry(), Gen::uaa, [](std::vector<Program>& all) {
    for (ComputeStep& c : all[1].compute)
      if (c.q_first >= 48) {
        c.q_first -= 48;
        return true;
      }
    return false;
  });
  EXPECT_TRUE(starts_with(p, "[round trip]") || starts_with(p, "[compute]")) << p;
}

TEST(ProgramChecks, CatchKernelContractAndStrategyViolations) {
  std::string p = after(mutation_geometry(), Gen::uaa, [](std::vector<Program>& all) {
    all[2].compute[0].kv_total += 1;
    return true;
  });
  EXPECT_TRUE(starts_with(p, "[compute]")) << p;
  p = after(mutation_geometry(), Gen::uaa, [](std::vector<Program>& all) {
    for (ComputeStep& c : all[0].compute)
      if (c.q_first == 0 && c.q[0].tokens > 1) {
        c.q_first = 1;  // off the granule (and off by one)
        c.q_total += 1;
        return true;
      }
    return false;
  });
  EXPECT_TRUE(starts_with(p, "[compute]")) << p;
  // uaa sending a block to itself (dropped into padding, so only the promise is broken).
  p = after(mutation_geometry(), Gen::uaa, [](std::vector<Program>& all) {
    Part x;
    x.tokens = x.heads = 1;
    x.row_bytes = 8;
    x.src.slot = Slot::q;
    x.dst.slot = Slot::pad;
    const auto n = static_cast<std::uint32_t>(all[0].in.send_parts.size());
    all[0].in.send_parts.push_back(x);
    all[0].in.recv_parts.push_back(x);
    all[0].in.send.insert(all[0].in.send.begin(), PeerParts{0, n, n + 1});
    const auto m = static_cast<std::uint32_t>(all[0].in.recv_parts.size()) - 1;
    all[0].in.recv.insert(all[0].in.recv.begin(), PeerParts{0, m, m + 1});
    return true;
  });
  EXPECT_TRUE(starts_with(p, "[strategy]")) << p;
  // allgather_kv without the step over the rank's rows.
  p = after(mutation_geometry(), Gen::allgather, [](std::vector<Program>& all) {
    all[0].compute.clear();
    return true;
  });
  EXPECT_TRUE(starts_with(p, "[strategy]")) << p;
}

TEST(ProgramChecks, CatchByteCountsOtherThanPromised) {
  // An extra part into padding moves bytes plain Ulysses would not (heads dividing: 8 on 4 ranks).
  const Geometry g = geom({50, 3, 97, 0}, {60, 0, 41, 7}, 8, 4, 4, 2, true, true);
  std::string p = after(g, Gen::uaa, [](std::vector<Program>& all) {
    auto [s, t] = part_pair(all, true, 0, 1, 0);
    if (!s) return false;
    Part x = *s;
    x.dst.slot = Slot::pad;
    for (PeerParts& e : all[0].in.send)
      if (e.peer == 1) {
        all[0].in.send_parts.insert(all[0].in.send_parts.begin() + e.end, x);
        for (PeerParts& f : all[0].in.send)
          if (f.peer > 1) ++f.begin, ++f.end;
        ++e.end;
      }
    for (PeerParts& e : all[1].in.recv)
      if (e.peer == 0) {
        all[1].in.recv_parts.insert(all[1].in.recv_parts.begin() + e.end, x);
        for (PeerParts& f : all[1].in.recv)
          if (f.peer > 0) ++f.begin, ++f.end;
        ++e.end;
      }
    return true;
  });
  EXPECT_TRUE(starts_with(p, "[bytes]")) << p;
  EXPECT_TRUE(after(g, Gen::uaa, [](std::vector<Program>&) { return true; }).empty());
}

TEST(Program, DescribeNamesEveryPart) {
  const std::vector<Program> all = compile_all(mutation_geometry(), Gen::uaa);
  const std::string d = uaa::detail::describe(all[0]);
  EXPECT_NE(d.find("stage_in"), std::string::npos) << d;
  EXPECT_NE(d.find("compute"), std::string::npos) << d;
  EXPECT_EQ(uaa::detail::slot_name(Slot::stage_out), std::string("stage_out"));
}

}  // namespace
