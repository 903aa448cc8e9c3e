// The control plane of the MPI transport (src/comm/control_plane.h): agree() combines every rank's
// vote into one Verdict, identical on every rank (min/max of kind, fingerprint, sequence and kernel
// with the lowest rank holding each max, OR of flags, count of failed votes and the lowest failed
// rank, whose code and message every rank gets). Checked on every world size (powers of two and
// not), with every rank as the failing one, with long messages, many agreements in a row mixed with
// other traffic, and by counting the messages the transport sends: a successful agreement is
// O(log P) point-to-point messages of 64 bytes per rank.
//
// The message count comes from the MPI profiling interface: this binary defines MPI_Isend (and
// forwards to PMPI_Isend), so it sees every send the transport posts.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "comm/control_plane.h"
#include "mpi_test_util.h"
#include "uaa/communicator.h"
#include "uaa/error.h"
#include "uaa/mpi.h"

namespace {

// Sends posted while g_recording is set: bytes of each.
bool g_recording = false;
std::vector<long long> g_sends;

}  // namespace

extern "C" int MPI_Isend(const void* buf, int count, MPI_Datatype type, int dest, int tag,
                         MPI_Comm comm, MPI_Request* request) {
  if (g_recording) {
    int size = 0;
    PMPI_Type_size(type, &size);
    g_sends.push_back(static_cast<long long>(count) * size);
  }
  return PMPI_Isend(buf, count, type, dest, tag, comm, request);
}

namespace uaa::test {
namespace {

using detail::control_plane;
using detail::ControlPlane;
using detail::Verdict;
using detail::Vote;
using detail::VoteKind;

std::string str(const Verdict& v) {
  return "kind " + std::to_string(v.kind_min) + ".." + std::to_string(v.kind_max) + " fp " +
         std::to_string(v.fingerprint_min) + ".." + std::to_string(v.fingerprint_max) + "@" +
         std::to_string(v.fingerprint_max_rank) + " seq " + std::to_string(v.sequence_min) + ".." +
         std::to_string(v.sequence_max) + "@" + std::to_string(v.sequence_max_rank) + " kernel " +
         std::to_string(v.kernel_min) + ".." + std::to_string(v.kernel_max) + "@" +
         std::to_string(v.kernel_max_rank) + " flags " + std::to_string(v.flags) + " failed " +
         std::to_string(v.failed_count) + " first " + std::to_string(v.first_failed_rank) +
         (v.failed_count > 0 ? " code " + std::string(error_code_name(v.code)) + " '" + v.message +
                                   "'"
                             : std::string());
}

// Collective: every rank holds the same verdict.
void expect_identical_everywhere(const Verdict& v) {
  const std::vector<std::string> all = allgather_strings(str(v));
  for (std::size_t j = 1; j < all.size(); ++j)
    EXPECT_EQ(all[j], all[0]) << "rank " << j << " got another verdict than rank 0";
}

std::shared_ptr<Communicator> make() { return make_mpi_communicator(MPI_COMM_WORLD); }

TEST(ControlPlane, IsReachableFromTheCommunicator) {
  auto comm = make();
  ControlPlane& cp = control_plane(*comm);
  EXPECT_EQ(cp.agreements(), 0u) << "construction's own agreements are not counted";
}

// A transport without a control plane: control_plane() says so, naming the transport.
class Plain final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  const char* transport() const override { return "plain"; }
  void allgather(const void*, std::size_t, void*) override {}
  void exchange(std::span<const Message>, std::span<const Message>) override {}
};

TEST(ControlPlane, OtherTransportsAreUnsupported) {
  Plain p;
  const Outcome o = capture([&] { control_plane(p); });
  EXPECT_EQ(o.code, ErrorCode::unsupported) << o.str();
  EXPECT_NE(o.message.find("plain"), std::string::npos) << o.message;
  const Outcome w = capture([&] { p.write_peers({}); });
  EXPECT_EQ(w.code, ErrorCode::unsupported) << w.str();
  EXPECT_NE(w.message.find("write_peers"), std::string::npos) << w.message;
}

TEST(ControlPlane, IdenticalVotesGiveTheSameVerdictAndTheSequenceAdvances) {
  auto comm = make();
  ControlPlane& cp = control_plane(*comm);
  for (std::uint64_t i = 0; i < 3; ++i) {
    Vote mine;
    mine.kind = VoteKind::forward;
    mine.fingerprint = 0xfeedface12345678ull + i;
    mine.kernel = 77;
    mine.flags = 0x0101;
    ASSERT_EQ(cp.agreements(), i);
    const Verdict v = cp.agree(mine);
    EXPECT_EQ(cp.agreements(), i + 1);
    EXPECT_EQ(v.kind_min, static_cast<std::uint8_t>(VoteKind::forward));
    EXPECT_EQ(v.kind_max, v.kind_min);
    EXPECT_EQ(v.fingerprint_min, mine.fingerprint);
    EXPECT_EQ(v.fingerprint_max, mine.fingerprint);
    EXPECT_EQ(v.fingerprint_max_rank, 0);
    EXPECT_EQ(v.sequence_min, i);
    EXPECT_EQ(v.sequence_max, i);
    EXPECT_EQ(v.sequence_max_rank, 0);
    EXPECT_EQ(v.kernel_min, 77u);
    EXPECT_EQ(v.kernel_max, 77u);
    EXPECT_EQ(v.kernel_max_rank, 0);
    EXPECT_EQ(v.flags, 0x0101);
    EXPECT_EQ(v.failed_count, 0);
    EXPECT_EQ(v.first_failed_rank, -1);
    EXPECT_TRUE(v.message.empty());
    expect_identical_everywhere(v);
  }
}

// Values that differ by rank, with ties on the maximum: the min, the max and the lowest rank with
// the max, as computed here from every rank's vote.
TEST(ControlPlane, DifferingVotesCombineToMinMaxAndTheLowestMaxRank) {
  auto comm = make();
  ControlPlane& cp = control_plane(*comm);
  const int P = world_size(), me = world_rank();
  auto fp = [](int r) { return 1000 + static_cast<std::uint64_t>((r * 5) % 3); };  // ties
  auto kernel = [](int r) { return static_cast<std::uint32_t>(r % 2 == 1 ? 9 : 4 + r); };
  auto kind = [](int r) { return r == 1 ? VoteKind::plan_create : VoteKind::tool; };
  Vote mine;
  mine.kind = kind(me);
  mine.fingerprint = fp(me);
  mine.kernel = kernel(me);
  mine.flags = static_cast<std::uint16_t>(1u << (me % 16));
  const Verdict v = cp.agree(mine);

  std::uint64_t fmin = ~0ull, fmax = 0;
  std::uint32_t kmin = ~0u, kmax = 0;
  int fmax_rank = -1, kmax_rank = -1;
  std::uint8_t kind_min = 255, kind_max = 0;
  std::uint16_t flags = 0;
  for (int r = 0; r < P; ++r) {
    fmin = std::min(fmin, fp(r));
    if (fp(r) > fmax || fmax_rank < 0) fmax = fp(r), fmax_rank = r;
    kmin = std::min(kmin, kernel(r));
    if (kernel(r) > kmax || kmax_rank < 0) kmax = kernel(r), kmax_rank = r;
    kind_min = std::min(kind_min, static_cast<std::uint8_t>(kind(r)));
    kind_max = std::max(kind_max, static_cast<std::uint8_t>(kind(r)));
    flags = static_cast<std::uint16_t>(flags | (1u << (r % 16)));
  }
  EXPECT_EQ(v.fingerprint_min, fmin);
  EXPECT_EQ(v.fingerprint_max, fmax);
  EXPECT_EQ(v.fingerprint_max_rank, fmax_rank);
  EXPECT_EQ(v.kernel_min, kmin);
  EXPECT_EQ(v.kernel_max, kmax);
  EXPECT_EQ(v.kernel_max_rank, kmax_rank);
  EXPECT_EQ(v.kind_min, kind_min);
  EXPECT_EQ(v.kind_max, kind_max);
  EXPECT_EQ(v.flags, flags);
  EXPECT_EQ(v.failed_count, 0);
  expect_identical_everywhere(v);
}

// Each rank in turn is the one that fails (the failure report then travels down a tree rooted at
// every possible rank): every rank gets its code and message.
TEST(ControlPlane, OneFailedVoteReachesEveryRank) {
  auto comm = make();
  ControlPlane& cp = control_plane(*comm);
  const int P = world_size(), me = world_rank();
  for (int bad = 0; bad < P; ++bad) {
    Vote mine;
    mine.fingerprint = 5;
    if (me == bad) {
      mine.failed = true;
      mine.code = ErrorCode::invalid_argument;
      mine.message = "rank " + std::to_string(me) + ": q.tokens 17 vs plan 16";
    }
    const Verdict v = cp.agree(mine);
    SCOPED_TRACE("failing rank " + std::to_string(bad));
    EXPECT_EQ(v.failed_count, 1);
    EXPECT_EQ(v.first_failed_rank, bad);
    EXPECT_EQ(v.code, ErrorCode::invalid_argument);
    EXPECT_EQ(v.message, "rank " + std::to_string(bad) + ": q.tokens 17 vs plan 16");
    EXPECT_EQ(v.fingerprint_min, 5u);
    EXPECT_EQ(v.sequence_min, static_cast<std::uint64_t>(bad));
    expect_identical_everywhere(v);
  }
  EXPECT_EQ(cp.agreements(), static_cast<std::uint64_t>(P));
  // And the communicator goes on: failed votes are an agreement like any other.
  const Verdict ok = cp.agree(Vote{});
  EXPECT_EQ(ok.failed_count, 0);
}

// Two ranks fail with different errors: the lowest one's error wins, and the count says two.
TEST(ControlPlane, TwoFailedVotesReportTheLowestRank) {
  const int P = world_size(), me = world_rank();
  if (P < 2) GTEST_SKIP() << "needs two ranks";
  auto comm = make();
  ControlPlane& cp = control_plane(*comm);
  const int low = P / 2, high = P - 1;
  Vote mine;
  if (me == low || me == high) {
    mine.failed = true;
    mine.code = me == low ? ErrorCode::unsupported : ErrorCode::mismatch;
    mine.message = "failure of rank " + std::to_string(me);
  }
  const Verdict v = cp.agree(mine);
  EXPECT_EQ(v.failed_count, low == high ? 1 : 2);
  EXPECT_EQ(v.first_failed_rank, low);
  EXPECT_EQ(v.code, ErrorCode::unsupported);
  EXPECT_EQ(v.message, "failure of rank " + std::to_string(low));
  expect_identical_everywhere(v);
}

// A message longer than the report record is cut the same way on every rank.
TEST(ControlPlane, LongMessagesAreTruncatedAlike) {
  auto comm = make();
  ControlPlane& cp = control_plane(*comm);
  const int P = world_size(), me = world_rank();
  Vote mine;
  if (me == P - 1) {
    mine.failed = true;
    mine.code = ErrorCode::internal;
    mine.message = "rank " + std::to_string(me) + ": " + std::string(5000, 'x');
  }
  const Verdict v = cp.agree(mine);
  EXPECT_EQ(v.code, ErrorCode::internal);
  EXPECT_LE(v.message.size(), 1008u);
  EXPECT_EQ(v.message.rfind("rank " + std::to_string(P - 1) + ": xxx", 0), 0u) << v.message;
  EXPECT_NE(v.message.find("truncated"), std::string::npos);
  expect_identical_everywhere(v);
}

// Many agreements in a row, with allgathers and exchanges in between (different tags and
// communicators must never be confused), and values that change every time.
TEST(ControlPlane, ManyAgreementsInARowMixedWithOtherTraffic) {
  auto comm = make();
  ControlPlane& cp = control_plane(*comm);
  const int P = world_size(), me = world_rank();
  std::uint64_t digest = 0;
  for (int i = 0; i < 300; ++i) {
    Vote mine;
    mine.kind = static_cast<VoteKind>(1 + (i + me) % 4);
    mine.fingerprint =
        static_cast<std::uint64_t>(i) * 1000003u + static_cast<std::uint64_t>(me % 3);
    mine.kernel = static_cast<std::uint32_t>((i * 7 + me) % 11);
    mine.flags = static_cast<std::uint16_t>(i % 3 == 0 ? 1u << (me % 16) : 0);
    if (i % 37 == 5 && me == i % P) {
      mine.failed = true;
      mine.code = ErrorCode::mismatch;
      mine.message = "round " + std::to_string(i);
    }
    const Verdict v = cp.agree(mine);
    ASSERT_EQ(v.sequence_min, static_cast<std::uint64_t>(i));
    ASSERT_EQ(v.sequence_max, static_cast<std::uint64_t>(i));
    ASSERT_EQ(v.fingerprint_min, static_cast<std::uint64_t>(i) * 1000003u);
    ASSERT_EQ(v.failed_count, i % 37 == 5 ? 1 : 0);
    if (v.failed_count) {
      ASSERT_EQ(v.message, "round " + std::to_string(i));
    }
    digest = digest * 31 + std::hash<std::string>()(str(v));
    if (i % 10 == 0) {
      std::vector<int> ranks(static_cast<std::size_t>(P), -1);
      comm->allgather(&i, sizeof i, ranks.data());
      for (int j = 0; j < P; ++j) ASSERT_EQ(ranks[static_cast<std::size_t>(j)], i);
    }
    if (i % 10 == 3) {  // a ring: to the next rank, from the previous one
      int out = i * 100 + me, in = -1;
      const Message s{(me + 1) % P, &out, sizeof out}, r{(me + P - 1) % P, &in, sizeof in};
      comm->exchange(std::span<const Message>(&s, 1), std::span<const Message>(&r, 1));
      ASSERT_EQ(in, i * 100 + (me + P - 1) % P);
    }
  }
  EXPECT_EQ(cp.agreements(), 300u);
  const std::vector<std::string> all = allgather_strings(std::to_string(digest));
  for (std::size_t j = 1; j < all.size(); ++j) EXPECT_EQ(all[j], all[0]) << "rank " << j;
}

// Message sizes: each send of a successful agreement is one 64-byte record, at most
// floor(log2 P) + 1 per rank, and (P - p2) * 2 + p2 * log2(p2) over all ranks. A failed agreement
// adds exactly P - 1 report records (1024 bytes) over all ranks.
TEST(ControlPlane, AgreementsAreLogPMessagesOf64Bytes) {
  auto comm = make();
  ControlPlane& cp = control_plane(*comm);
  const int P = world_size(), me = world_rank();
  int p2 = 1, L = 0;
  while (p2 * 2 <= P) p2 *= 2, ++L;

  g_sends.clear();
  g_recording = true;
  cp.agree(Vote{});
  g_recording = false;
  for (long long b : g_sends) EXPECT_EQ(b, 64) << "a successful agreement sent another record";
  EXPECT_LE(static_cast<int>(g_sends.size()), L + 1);
  int mine = static_cast<int>(g_sends.size()), total = 0;
  MPI_Allreduce(&mine, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  EXPECT_EQ(total, (P - p2) * 2 + p2 * L);

  Vote failing;
  failing.failed = me == P / 2;
  failing.message = "no";
  g_sends.clear();
  g_recording = true;
  cp.agree(failing);
  g_recording = false;
  int reports = 0;
  for (long long b : g_sends) {
    EXPECT_TRUE(b == 64 || b == 1024) << b;
    reports += b == 1024;
  }
  int all_reports = 0;
  MPI_Allreduce(&reports, &all_reports, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  EXPECT_EQ(all_reports, P - 1);
}

}  // namespace
}  // namespace uaa::test
