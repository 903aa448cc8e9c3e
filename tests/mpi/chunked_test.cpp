// The large-message path at small sizes: MpiOptions::max_count caps the units handed to one MPI call,
// so a tiny max_count forces every exchange through chunked point-to-point messages. The results must
// be bit for bit those of the default communicator (which, with every rank on one node, moves data by
// peer reads instead of messages), and exchange() alone must deliver every byte in listed order.
#include <gtest/gtest.h>

#include <cstring>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "attention_harness.h"
#include "common/test_rng.h"
#include "mpi_test_util.h"
#include "uaa/attention.h"
#include "uaa/mpi.h"
#include "uaa/plan.h"

namespace uaa::test {
namespace {

struct ChunkCase {
  std::int64_t hq, hkv, dim;
  bool causal, lse;
  std::int64_t max_len;
  std::uint64_t seed;
};

// Odd head dims and odd lengths make per-peer byte counts with different factors of two, so ranks
// pick different MPI units; zero-length ranks make header-only blocks.
const ChunkCase kChunkCases[] = {
    {3, 1, 1, true, true, 9, 1},
    {7, 7, 5, false, true, 13, 2},
    {24, 8, 8, true, false, 7, 3},
    {2, 2, 33, true, true, 17, 4},
};

void PrintTo(const ChunkCase& c, std::ostream* os) {
  *os << "h" << c.hq << "kv" << c.hkv << "d" << c.dim << "_s" << c.seed;
}

std::vector<std::int64_t> lengths(std::uint64_t seed, int P, std::int64_t max_len) {
  Rng rng(seed * 7919u + static_cast<std::uint64_t>(P));
  std::vector<std::int64_t> v(P);
  for (auto& x : v) x = rng.uniform(0, max_len);
  if (P >= 3) v[seed % P] = 0;
  return v;
}

class Chunked : public ::testing::TestWithParam<std::tuple<ChunkCase, std::int64_t>> {};

TEST_P(Chunked, BitwiseEqualToDefaultCommunicator) {
  const ChunkCase& c = std::get<0>(GetParam());
  const std::int64_t max_count = std::get<1>(GetParam());
  const int P = world_size(), me = world_rank();
  AttentionShape s;
  s.q_heads = c.hq;
  s.kv_heads = c.hkv;
  s.head_dim = c.dim;
  s.causal = c.causal;
  s.return_lse = c.lse;
  const Problem pb = make_problem(s, lengths(c.seed, P, c.max_len),
                                  lengths(c.seed + 100, P, c.max_len), c.seed);
  SCOPED_TRACE(pb.str() + " max_count " + std::to_string(max_count));
  auto plain = make_mpi_communicator(MPI_COMM_WORLD);
  auto chunked = make_mpi_communicator(MPI_COMM_WORLD, MpiOptions{.max_count = max_count, .peer_reads = false});
  RunResult want, got;
  const Outcome o_want = capture([&] {
    const Plan plan = Plan::from_lengths(*plain, s, pb.q_lens, pb.kv_lens);
    Workspace ws;
    want = run_shard(plan, pb, Layouts{}, ws);
  });
  const Outcome o_got = capture([&] {
    const Plan plan = Plan::from_lengths(*chunked, s, pb.q_lens, pb.kv_lens);
    Workspace ws;
    got = run_shard(plan, pb, Layouts{}, ws);
    got = run_shard(plan, pb, Layouts{}, ws);  // and again, with a warm workspace
  });
  expect_ok_everywhere(o_want);
  expect_ok_everywhere(o_got);
  if (o_want.kind != Outcome::ok || o_got.kind != Outcome::ok) return;
  ASSERT_EQ(got.out.size(), want.out.size());
  EXPECT_TRUE(got.out.empty() ||
              std::memcmp(got.out.data(), want.out.data(), got.out.size() * sizeof(float)) == 0)
      << "rank " << me << ": chunked exchange changed the output";
  ASSERT_EQ(got.lse.size(), want.lse.size());
  EXPECT_TRUE(got.lse.empty() ||
              std::memcmp(got.lse.data(), want.lse.data(), got.lse.size() * sizeof(float)) == 0)
      << "rank " << me << ": chunked exchange changed the lse";
}

INSTANTIATE_TEST_SUITE_P(
    SmallMaxCount, Chunked,
    ::testing::Combine(::testing::ValuesIn(kChunkCases), ::testing::Values(1, 3, 7, 64)),
    [](const ::testing::TestParamInfo<std::tuple<ChunkCase, std::int64_t>>& info) {
      const ChunkCase& c = std::get<0>(info.param);
      std::ostringstream os;
      os << "h" << c.hq << "kv" << c.hkv << "d" << c.dim << "_s" << c.seed << "_max"
         << std::get<1>(info.param);
      return os.str();
    });

// A communicator must serve the plans built on it: Plan::create's all-gather of its fixed-size
// record has to work whatever max_count is.
TEST(ChunkedPlan, CreateWorksWithASmallMaxCount) {
  const int P = world_size(), me = world_rank();
  AttentionShape s;
  s.q_heads = 5;
  s.head_dim = 7;
  const std::vector<std::int64_t> q = lengths(9, P, 11), kv = lengths(10, P, 11);
  for (std::int64_t max_count : {1, 3, 255}) {
    auto chunked = make_mpi_communicator(MPI_COMM_WORLD, MpiOptions{.max_count = max_count, .peer_reads = false});
    std::uint64_t fp = 0, want = 0;
    const Outcome o = capture([&] {
      want = Plan::from_lengths(*chunked, s, q, kv).fingerprint();
      fp = Plan::create(*chunked, s, q[me], kv[me]).fingerprint();
    });
    SCOPED_TRACE("max_count " + std::to_string(max_count));
    expect_ok_everywhere(o);
    EXPECT_EQ(fp, want);
  }
}

// The transport alone: exchange() with several messages per pair (self included), of sizes with
// different factors of two (so different MPI units), cut into max_count-unit pieces. Every byte
// must land where the listed order says, for every max_count.
TEST(ChunkedExchange, MessagesLandInListedOrderForEveryMaxCount) {
  const int P = world_size(), me = world_rank();
  // Message k from `src` to `dst`: its size (0 included: such messages are skipped) and bytes.
  auto size_of = [](int src, int dst, int k) -> std::int64_t {
    const std::int64_t sizes[] = {1, 37, 96, 4160, 0, 4096, 250};
    return sizes[(src * 3 + dst * 5 + k) % 7];
  };
  auto byte_of = [](int src, int dst, int k, std::int64_t i) {
    return static_cast<char>((src * 131 + dst * 31 + k * 7 + i * 13) & 0xff);
  };
  constexpr int kPerPair = 4;
  for (std::int64_t max_count : {1, 3, 7, 64, 2147483647}) {
    SCOPED_TRACE("max_count " + std::to_string(max_count));
    std::vector<std::vector<char>> out, in;
    std::vector<Message> sends, recvs;
    out.reserve(static_cast<std::size_t>(P * kPerPair));
    in.reserve(static_cast<std::size_t>(P * kPerPair));
    for (int j = 0; j < P; ++j)
      for (int k = 0; k < kPerPair; ++k) {
        const std::int64_t n_out = size_of(me, j, k), n_in = size_of(j, me, k);
        out.emplace_back(static_cast<std::size_t>(n_out));
        for (std::int64_t i = 0; i < n_out; ++i)
          out.back()[static_cast<std::size_t>(i)] = byte_of(me, j, k, i);
        in.emplace_back(static_cast<std::size_t>(n_in), '\0');
        sends.push_back({j, out.back().data(), n_out});
        recvs.push_back({j, in.back().data(), n_in});
      }
    const Outcome o = capture([&] {
      auto comm = make_mpi_communicator(MPI_COMM_WORLD,
                                        MpiOptions{.max_count = max_count, .peer_reads = false});
      comm->exchange(sends, recvs);
      comm->exchange(sends, recvs);  // and again on the same communicator
    });
    expect_ok_everywhere(o);
    std::int64_t wrong = 0;
    for (int j = 0; j < P; ++j)
      for (int k = 0; k < kPerPair; ++k) {
        const std::vector<char>& got = in[static_cast<std::size_t>(j * kPerPair + k)];
        for (std::size_t i = 0; i < got.size(); ++i)
          wrong += got[i] != byte_of(j, me, k, static_cast<std::int64_t>(i));
      }
    EXPECT_EQ(wrong, 0) << "rank " << me;
  }
}

}  // namespace
}  // namespace uaa::test
