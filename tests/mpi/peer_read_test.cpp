// Peer reads and writes (Communicator::can_read_peers / read_peers / write_peers on the MPI
// transport): every rank reads strided regions of every rank's memory (itself included) into
// strided local memory, or writes strided local memory into strided regions of every rank's
// memory, and checks every byte against a formula of (owner rank, byte offset); the capability is
// the same on every rank and can be switched off; malformed accesses fail on the rank that made them
// only, before anything is copied, and leave the communicator usable.
//
// read_peers and write_peers are not collective: the tests synchronize on MPI_COMM_WORLD (an
// all-gather of buffer addresses before the accesses, a barrier after them) so that the memory
// accessed is ready and alive.
#include <gtest/gtest.h>

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "mpi_test_util.h"
#include "uaa/communicator.h"
#include "uaa/error.h"
#include "uaa/mpi.h"

namespace uaa::test {
namespace {

// The byte at `offset` of rank `rank`'s source buffer.
std::uint8_t pattern(int rank, std::int64_t offset) {
  std::uint64_t x = static_cast<std::uint64_t>(offset) * 0x9e3779b97f4a7c15ull +
                    static_cast<std::uint64_t>(rank + 1) * 0xbf58476d1ce4e5b9ull;
  x ^= x >> 29;
  x *= 0x94d049bb133111ebull;
  return static_cast<std::uint8_t>(x >> 56);
}

constexpr std::uint8_t kUntouched = 0xa5;

// A region relative to the start of a buffer: its byte offsets in visiting order.
std::vector<std::int64_t> offsets(const StridedBytes& r) {
  std::vector<std::int64_t> out;
  for (std::int64_t i0 = 0; i0 < r.n0; ++i0)
    for (std::int64_t i1 = 0; i1 < r.n1; ++i1)
      for (std::int64_t b = 0; b < r.run; ++b)
        out.push_back(static_cast<std::int64_t>(r.address) + i0 * r.s0 + i1 * r.s1 + b);
  return out;
}

// One read of the test, in offsets relative to the source buffer (from) and the destination (to).
struct Case {
  const char* name;
  StridedBytes from, to;
};

StridedBytes region(std::int64_t offset, std::int64_t n0, std::int64_t s0, std::int64_t n1,
                    std::int64_t s1, std::int64_t run) {
  return StridedBytes{static_cast<std::uintptr_t>(offset), n0, s0, n1, s1, run};
}

// A [T][H][D] tensor of 4-byte elements (token-major) in the source buffer; sub-views of it.
constexpr std::int64_t T = 23, H = 7, D = 12, E = 4;
constexpr std::int64_t kRow = H * D * E;  // token stride
constexpr std::int64_t kHead = D * E;     // head stride
constexpr std::int64_t kSourceBytes = 64 * 1024;
constexpr std::int64_t kDestBytes = 64 * 1024;

std::vector<Case> cases() {
  std::vector<Case> c;
  // The whole tensor, contiguous to contiguous: one iovec per side.
  c.push_back({"whole", region(0, 1, 0, 1, 0, T * kRow), region(0, 1, 0, 1, 0, T * kRow)});
  // Tokens 3..12, heads 2..5 -> a compact [10][4][D] block.
  c.push_back({"subview_to_compact", region(3 * kRow + 2 * kHead, 10, kRow, 4, kHead, kHead),
               region(16, 10, 4 * kHead, 4, kHead, kHead)});
  // Tokens 3..12, heads 2..5 -> head-major [4][10][D] (token stride kHead, head stride 10 kHead).
  c.push_back({"subview_to_head_major", region(3 * kRow + 2 * kHead, 10, kRow, 4, kHead, kHead),
               region(40, 10, kHead, 4, 10 * kHead, kHead)});
  // The source read as head-major [H][T][D]: heads 1..3, tokens 5..20 -> token-major with a gap.
  c.push_back({"head_major_source", region(1 * T * kHead + 5 * kHead, 3, T * kHead, 16, kHead, kHead),
               region(8, 3, kHead, 16, 3 * kHead + 24, kHead)});
  // Whole rows on one side (runs merge), quarter rows of a wider buffer on the other: the two sides
  // are cut into different runs.
  c.push_back({"different_cuts", region(kRow, 6, kRow, 1, 0, kRow),
               region(0, 6 * 4, kRow / 2, 1, 0, kRow / 4)});
  // Odd sizes and offsets, run of 1 byte, 3 levels everywhere.
  c.push_back({"bytes", region(5, 9, 37, 5, 3, 1), region(3, 5, 11, 9, 2, 1)});
  // Negative block stride (rows in reverse order) into forward rows.
  c.push_back({"reversed_blocks", region(20 * kRow, 8, -kRow, 2, kHead, kHead),
               region(0, 8, 2 * kHead, 2, kHead, kHead)});
  // Empty reads of every kind (address 0 is fine when there are no bytes).
  c.push_back({"empty_n0", region(0, 0, 0, 5, 8, 8), region(0, 0, 0, 3, 8, 8)});
  c.push_back({"empty_run", region(0, 4, 8, 5, 8, 0), region(0, 1, 0, 1, 0, 0)});
  c.push_back({"empty_n1", region(0, 4, 8, 0, 8, 8), region(0, 7, 8, 3, 8, 0)});
  // More runs than IOV_MAX on both sides (5000 runs of 8 bytes, different strides).
  c.push_back({"many_runs", region(3, 50, 1200, 100, 12, 8), region(1, 5000, 13, 1, 0, 8)});
  // 5000 runs on one side, one contiguous run on the other.
  c.push_back({"many_runs_to_one", region(0, 5000, 12, 1, 0, 8), region(0, 1, 0, 1, 0, 40000)});
  c.push_back({"one_to_many_runs", region(100, 1, 0, 1, 0, 40000), region(0, 100, 600, 50, 12, 8)});
  return c;
}

struct Fixture {
  std::shared_ptr<Communicator> comm;
  std::vector<std::uint8_t> source;            // this rank's pattern
  std::vector<std::uintptr_t> source_address;  // every rank's source buffer, by rank

  explicit Fixture(const MpiOptions& options = {}) {
    comm = make_mpi_communicator(MPI_COMM_WORLD, options);
    const int me = world_rank();
    source.resize(kSourceBytes);
    for (std::int64_t i = 0; i < kSourceBytes; ++i) source[i] = pattern(me, i);
    source_address.resize(static_cast<std::size_t>(world_size()));
    const std::uintptr_t mine = reinterpret_cast<std::uintptr_t>(source.data());
    comm->allgather(&mine, sizeof mine, source_address.data());
  }
};

// Checks that `dest` holds peer's bytes of `c.from` at the places of `c.to`, and kUntouched elsewhere.
void expect_read(const Case& c, int peer, const std::vector<std::uint8_t>& dest) {
  const std::vector<std::int64_t> from = offsets(c.from), to = offsets(c.to);
  ASSERT_EQ(from.size(), to.size());
  std::vector<std::uint8_t> want(dest.size(), kUntouched);
  for (std::size_t k = 0; k < from.size(); ++k) {
    ASSERT_GE(from[k], 0);
    ASSERT_LT(from[k], kSourceBytes);
    ASSERT_GE(to[k], 0);
    ASSERT_LT(to[k], static_cast<std::int64_t>(dest.size()));
    want[static_cast<std::size_t>(to[k])] = pattern(peer, from[k]);
  }
  std::size_t bad = 0, first_bad = 0;
  for (std::size_t i = 0; i < dest.size(); ++i)
    if (dest[i] != want[i] && bad++ == 0) first_bad = i;
  EXPECT_EQ(bad, 0u) << "case " << c.name << " from rank " << peer << ": first bad byte at " << first_bad
                     << " (" << int(dest[first_bad]) << " vs " << int(want[first_bad]) << ")";
}

PeerRead absolute(const Case& c, int peer, std::uintptr_t source, std::uint8_t* dest) {
  PeerRead r{peer, c.from, c.to};
  r.from.address = c.from.bytes() > 0 ? source + c.from.address : 0;
  r.to.address = c.to.bytes() > 0 ? reinterpret_cast<std::uintptr_t>(dest) + c.to.address : 0;
  return r;
}

TEST(PeerRead, CapabilityIsTheSameOnEveryRank) {
  Fixture f;
  const bool can = f.comm->can_read_peers();
  EXPECT_EQ(allreduce_and(can), !allreduce_and(!can)) << "ranks disagree on can_read_peers()";
  if (!can && world_rank() == 0)
    std::printf("note: peer reads unavailable here; the data tests skip\n");
}

TEST(PeerRead, EveryCaseFromEveryPeer) {
  Fixture f;
  if (!f.comm->can_read_peers()) GTEST_SKIP() << "peer reads unavailable on this machine";
  const int P = world_size();
  for (const Case& c : cases()) {
    for (int peer = 0; peer < P; ++peer) {
      std::vector<std::uint8_t> dest(kDestBytes, kUntouched);
      const PeerRead r = absolute(c, peer, f.source_address[peer], dest.data());
      const Outcome o = capture([&] { f.comm->read_peers(std::span<const PeerRead>(&r, 1)); });
      EXPECT_EQ(o.kind, Outcome::ok) << c.name << " from rank " << peer << ": " << o.str();
      expect_read(c, peer, dest);
    }
  }
  MPI_Barrier(MPI_COMM_WORLD);  // peers' sources stay alive until every rank has read them
}

// All cases from all peers in one call (consecutive same-peer reads share system calls), twice:
// the second call reuses the communicator's iovec windows.
TEST(PeerRead, ManyReadsInOneCall) {
  Fixture f;
  if (!f.comm->can_read_peers()) GTEST_SKIP() << "peer reads unavailable on this machine";
  const int P = world_size();
  const std::vector<Case> cs = cases();
  for (int round = 0; round < 2; ++round) {
    std::vector<std::vector<std::uint8_t>> dests;
    std::vector<PeerRead> reads;
    for (int k = 0; k < 2 * P; ++k) {  // peers in the order 0,0,1,1,... per case pair
      const int peer = k / 2;
      for (const Case& c : cs) {
        dests.emplace_back(kDestBytes, kUntouched);
        reads.push_back(absolute(c, peer, f.source_address[peer], dests.back().data()));
      }
    }
    const Outcome o = capture([&] { f.comm->read_peers(reads); });
    EXPECT_EQ(o.kind, Outcome::ok) << o.str();
    for (std::size_t i = 0; i < reads.size(); ++i)
      expect_read(cs[i % cs.size()], reads[i].peer, dests[i]);
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

TEST(PeerRead, OptionOffMeansUnsupported) {
  Fixture f(MpiOptions{.peer_reads = false});
  EXPECT_FALSE(f.comm->can_read_peers());
  std::vector<std::uint8_t> dest(16);
  const PeerRead r{0, StridedBytes{f.source_address[0], 1, 0, 1, 0, 16},
                   StridedBytes{reinterpret_cast<std::uintptr_t>(dest.data()), 1, 0, 1, 0, 16}};
  const Outcome o = capture([&] { f.comm->read_peers(std::span<const PeerRead>(&r, 1)); });
  EXPECT_EQ(o.kind, Outcome::uaa_error) << o.str();
  EXPECT_EQ(o.code, ErrorCode::unsupported) << o.str();
  EXPECT_NE(o.message.find("rank " + std::to_string(world_rank())), std::string::npos) << o.message;
  EXPECT_NE(o.message.find("peer_reads"), std::string::npos) << o.message;
  // Writes are covered by the same capability.
  const PeerWrite w{0, r.to, r.from};
  const Outcome ow = capture([&] { f.comm->write_peers(std::span<const PeerWrite>(&w, 1)); });
  EXPECT_EQ(ow.code, ErrorCode::unsupported) << ow.str();
  EXPECT_NE(ow.message.find("write_peers"), std::string::npos) << ow.message;
  EXPECT_NE(ow.message.find("the first to peer 0"), std::string::npos) << ow.message;
  EXPECT_NE(ow.message.find("peer_reads"), std::string::npos) << ow.message;
  EXPECT_EQ(dest, std::vector<std::uint8_t>(16, 0));
  MPI_Barrier(MPI_COMM_WORLD);
}

// Sets an environment variable for the lifetime of the object.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    setenv(name, value, 1);
  }
  ~ScopedEnv() {
    if (old_)
      setenv(name_, old_->c_str(), 1);
    else
      unsetenv(name_);
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

TEST(PeerRead, EnvironmentZeroDisables) {
  {
    ScopedEnv env("UAA_PEER_READS", "0");
    auto comm = make_mpi_communicator(MPI_COMM_WORLD);
    EXPECT_FALSE(comm->can_read_peers());
    const Outcome o = capture([&] { comm->read_peers({}); });
    EXPECT_EQ(o.code, ErrorCode::unsupported) << o.str();
    EXPECT_NE(o.message.find("UAA_PEER_READS=0"), std::string::npos) << o.message;
  }
  {
    ScopedEnv env("UAA_PEER_READS", "1");
    auto comm = make_mpi_communicator(MPI_COMM_WORLD);
    auto plain = make_mpi_communicator(MPI_COMM_WORLD, MpiOptions{.peer_reads = true});
    EXPECT_EQ(comm->can_read_peers(), plain->can_read_peers());
  }
  {
    ScopedEnv env("UAA_PEER_READS", "yes");
    const Outcome o = capture([&] { make_mpi_communicator(MPI_COMM_WORLD); });
    EXPECT_EQ(o.kind, Outcome::uaa_error) << o.str();
    EXPECT_EQ(o.code, ErrorCode::invalid_argument) << o.str();
    EXPECT_NE(o.message.find("UAA_PEER_READS"), std::string::npos) << o.message;
    EXPECT_NE(o.message.find("'yes'"), std::string::npos) << o.message;
  }
  EXPECT_EQ(std::getenv("UAA_PEER_READS"), nullptr);
  MPI_Barrier(MPI_COMM_WORLD);
}

// The last rank makes malformed reads (alone: read_peers is not collective); each fails there with
// invalid_argument naming the rank and the peer, before anything is written, and every rank's
// communicator then still exchanges correctly.
TEST(PeerRead, MalformedReadsFailLocallyAndLeaveTheCommunicatorUsable) {
  Fixture f;
  const int P = world_size(), me = world_rank();
  if (f.comm->can_read_peers() && me == P - 1) {
    std::vector<std::uint8_t> dest(256, kUntouched);
    const std::uintptr_t d = reinterpret_cast<std::uintptr_t>(dest.data());
    const std::uintptr_t s = f.source_address[0];
    struct Bad {
      PeerRead read;
      std::vector<std::string> needles;
    };
    const std::vector<Bad> bad = {
        {{0, region(s, 1, 0, 1, 0, 16), region(d, 1, 0, 1, 0, 15)}, {"16 bytes", "15"}},
        {{0, region(s, 2, 64, 4, 8, 4), region(d, 1, 0, 1, 0, 33)}, {"32 bytes", "33"}},
        {{P, region(s, 1, 0, 1, 0, 8), region(d, 1, 0, 1, 0, 8)}, {"peer " + std::to_string(P)}},
        {{-1, region(s, 1, 0, 1, 0, 8), region(d, 1, 0, 1, 0, 8)}, {"peer -1"}},
        {{0, region(s, -1, 0, 1, 0, 8), region(d, 1, 0, 1, 0, 8)}, {"n0 -1", "negative"}},
        {{0, region(s, 1, 0, -2, 0, 8), region(d, 1, 0, 1, 0, 8)}, {"n1 -2", "negative"}},
        {{0, region(s, 1, 0, 1, 0, -8), region(d, 1, 0, 1, 0, -8)}, {"run -8", "negative"}},
        {{0, region(s, 1LL << 40, 0, 1LL << 40, 0, 8), region(d, 1, 0, 1, 0, 8)}, {"overflow"}},
        {{0, region(0, 1, 0, 1, 0, 8), region(d, 1, 0, 1, 0, 8)}, {"null address"}},
        {{0, region(s, 1, 0, 1, 0, 8), region(0, 1, 0, 1, 0, 8)}, {"null address"}},
    };
    for (const Bad& b : bad) {
      // A good read first: nothing may be written when a later read of the call is malformed.
      const PeerRead good{0, region(s, 1, 0, 1, 0, 64), region(d + 64, 1, 0, 1, 0, 64)};
      const PeerRead reads[2] = {good, b.read};
      const Outcome o = capture([&] { f.comm->read_peers(reads); });
      SCOPED_TRACE(o.message);
      EXPECT_EQ(o.kind, Outcome::uaa_error) << o.str();
      EXPECT_EQ(o.code, ErrorCode::invalid_argument) << o.str();
      EXPECT_NE(o.message.find("rank " + std::to_string(me)), std::string::npos);
      EXPECT_NE(o.message.find("peer " + std::to_string(b.read.peer)), std::string::npos);
      EXPECT_NE(o.message.find("read 1 of 2"), std::string::npos);
      for (const std::string& n : b.needles) EXPECT_NE(o.message.find(n), std::string::npos) << n;
      for (std::uint8_t x : dest) ASSERT_EQ(x, kUntouched) << "a malformed call wrote data";
    }
    // And an OS refusal (an unmapped address in the peer) is comm_failure naming rank and peer.
    const PeerRead unmapped{0, region(8, 1, 0, 1, 0, 8), region(d, 1, 0, 1, 0, 8)};
    const Outcome o = capture([&] { f.comm->read_peers(std::span<const PeerRead>(&unmapped, 1)); });
    EXPECT_EQ(o.code, ErrorCode::comm_failure) << o.str();
    EXPECT_NE(o.message.find("rank " + std::to_string(me)), std::string::npos) << o.message;
    EXPECT_NE(o.message.find("peer 0"), std::string::npos) << o.message;
  }

  // Everybody: the communicator still works (allgather, alltoallv, and a correct read).
  std::vector<int> ranks(static_cast<std::size_t>(P), -1);
  const Outcome g = capture([&] { f.comm->allgather(&me, sizeof me, ranks.data()); });
  expect_ok_everywhere(g);
  for (int j = 0; j < P; ++j) EXPECT_EQ(ranks[j], j);

  std::vector<std::int64_t> counts(P), displs(P);
  for (int j = 0; j < P; ++j) {
    counts[j] = 8;
    displs[j] = 8 * j;
  }
  std::vector<std::uint8_t> send(8 * P), recv(8 * P, 0);
  for (int j = 0; j < P; ++j)
    for (int b = 0; b < 8; ++b) send[8 * j + b] = static_cast<std::uint8_t>(16 * me + j + b);
  const Outcome a = capture([&] {
    f.comm->alltoallv(send.data(), counts, displs, recv.data(), counts, displs);
  });
  expect_ok_everywhere(a);
  for (int j = 0; j < P; ++j)
    for (int b = 0; b < 8; ++b)
      EXPECT_EQ(recv[8 * j + b], static_cast<std::uint8_t>(16 * j + me + b));

  if (f.comm->can_read_peers()) {
    const Case c = cases()[2];
    const int peer = (me + 1) % P;
    std::vector<std::uint8_t> dest(kDestBytes, kUntouched);
    const PeerRead r = absolute(c, peer, f.source_address[peer], dest.data());
    const Outcome o = capture([&] { f.comm->read_peers(std::span<const PeerRead>(&r, 1)); });
    EXPECT_EQ(o.kind, Outcome::ok) << o.str();
    expect_read(c, peer, dest);
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

// ---- Writes: the mirror of the read tests ----

// Every rank's landing area for writes: one kDestBytes slot per (writer, case).
struct WriteFixture : Fixture {
  std::vector<std::uint8_t> landing;
  std::vector<std::uintptr_t> landing_address;  // by rank
  std::size_t slots_per_writer;

  explicit WriteFixture(std::size_t slots) : slots_per_writer(slots) {
    const int P = world_size();
    landing.assign(static_cast<std::size_t>(P) * slots * kDestBytes, kUntouched);
    landing_address.resize(static_cast<std::size_t>(P));
    const std::uintptr_t mine = reinterpret_cast<std::uintptr_t>(landing.data());
    comm->allgather(&mine, sizeof mine, landing_address.data());
  }
  std::size_t slot_offset(int writer, std::size_t slot) const {
    return (static_cast<std::size_t>(writer) * slots_per_writer + slot) * kDestBytes;
  }
  // Case c written by this rank into peer's slot (writer = this rank).
  PeerWrite write(const Case& c, int peer, std::size_t slot) const {
    PeerWrite w{peer, c.from, c.to};
    w.from.address =
        c.from.bytes() > 0 ? reinterpret_cast<std::uintptr_t>(source.data()) + c.from.address : 0;
    w.to.address = c.to.bytes() > 0 ? landing_address[static_cast<std::size_t>(peer)] +
                                          slot_offset(world_rank(), slot) + c.to.address
                                    : 0;
    return w;
  }
  // The slot as a vector, to check with expect_read (the writer's bytes, at c.to's places).
  std::vector<std::uint8_t> slot(int writer, std::size_t s) const {
    const std::size_t at = slot_offset(writer, s);
    const auto first = landing.begin() + static_cast<std::ptrdiff_t>(at);
    return std::vector<std::uint8_t>(first, first + kDestBytes);
  }
};

// Every rank writes every case into every rank (itself included), one call per write; each rank
// then checks what every writer left in its memory.
TEST(PeerWrite, EveryCaseToEveryPeer) {
  const std::vector<Case> cs = cases();
  WriteFixture f(cs.size());
  if (!f.comm->can_read_peers()) GTEST_SKIP() << "peer access unavailable on this machine";
  const int P = world_size();
  for (std::size_t i = 0; i < cs.size(); ++i)
    for (int peer = 0; peer < P; ++peer) {
      const PeerWrite w = f.write(cs[i], peer, i);
      const Outcome o = capture([&] { f.comm->write_peers(std::span<const PeerWrite>(&w, 1)); });
      EXPECT_EQ(o.kind, Outcome::ok) << cs[i].name << " to rank " << peer << ": " << o.str();
    }
  MPI_Barrier(MPI_COMM_WORLD);  // every write has landed
  for (int writer = 0; writer < P; ++writer)
    for (std::size_t i = 0; i < cs.size(); ++i) expect_read(cs[i], writer, f.slot(writer, i));
  MPI_Barrier(MPI_COMM_WORLD);
}

// All cases to all peers in one call, ordered by peer (consecutive same-peer writes share system
// calls), twice: the second call reuses the iovec windows and rewrites the same bytes.
TEST(PeerWrite, ManyWritesInOneCall) {
  const std::vector<Case> cs = cases();
  WriteFixture f(cs.size());
  if (!f.comm->can_read_peers()) GTEST_SKIP() << "peer access unavailable on this machine";
  const int P = world_size();
  std::vector<PeerWrite> writes;
  for (int peer = 0; peer < P; ++peer)
    for (std::size_t i = 0; i < cs.size(); ++i) writes.push_back(f.write(cs[i], peer, i));
  for (int round = 0; round < 2; ++round) {
    const Outcome o = capture([&] { f.comm->write_peers(writes); });
    EXPECT_EQ(o.kind, Outcome::ok) << o.str();
  }
  MPI_Barrier(MPI_COMM_WORLD);
  for (int writer = 0; writer < P; ++writer)
    for (std::size_t i = 0; i < cs.size(); ++i) expect_read(cs[i], writer, f.slot(writer, i));
  MPI_Barrier(MPI_COMM_WORLD);
}

// The last rank makes malformed writes (a good write into its own memory first): each fails with
// invalid_argument naming the rank and the peer, before anything is written; an unmapped target is
// comm_failure; the communicator then still works for everybody.
TEST(PeerWrite, MalformedWritesFailLocallyAndLeaveTheCommunicatorUsable) {
  WriteFixture f(1);
  const int P = world_size(), me = world_rank();
  if (f.comm->can_read_peers() && me == P - 1) {
    const std::uintptr_t s = reinterpret_cast<std::uintptr_t>(f.source.data());
    const std::uintptr_t d = f.landing_address[0];  // peer 0's landing area
    const std::uintptr_t own = reinterpret_cast<std::uintptr_t>(f.landing.data());
    struct Bad {
      PeerWrite write;
      std::vector<std::string> needles;
    };
    const std::vector<Bad> bad = {
        {{0, region(s, 1, 0, 1, 0, 16), region(d, 1, 0, 1, 0, 15)}, {"16 bytes", "15"}},
        {{0, region(s, 2, 64, 4, 8, 4), region(d, 1, 0, 1, 0, 33)}, {"32 bytes", "33"}},
        {{P, region(s, 1, 0, 1, 0, 8), region(d, 1, 0, 1, 0, 8)}, {"peer " + std::to_string(P)}},
        {{-1, region(s, 1, 0, 1, 0, 8), region(d, 1, 0, 1, 0, 8)}, {"peer -1"}},
        {{0, region(s, -1, 0, 1, 0, 8), region(d, 1, 0, 1, 0, 8)}, {"n0 -1", "negative"}},
        {{0, region(s, 1, 0, 1, 0, 8), region(d, 1, 0, -2, 0, 8)}, {"n1 -2", "negative"}},
        {{0, region(s, 1LL << 40, 0, 1LL << 40, 0, 8), region(d, 1, 0, 1, 0, 8)}, {"overflow"}},
        {{0, region(0, 1, 0, 1, 0, 8), region(d, 1, 0, 1, 0, 8)}, {"null address"}},
        {{0, region(s, 1, 0, 1, 0, 8), region(0, 1, 0, 1, 0, 8)}, {"null address"}},
    };
    for (const Bad& b : bad) {
      const PeerWrite good{me, region(s, 1, 0, 1, 0, 64), region(own + 64, 1, 0, 1, 0, 64)};
      const PeerWrite writes[2] = {good, b.write};
      const Outcome o = capture([&] { f.comm->write_peers(writes); });
      SCOPED_TRACE(o.message);
      EXPECT_EQ(o.code, ErrorCode::invalid_argument) << o.str();
      EXPECT_NE(o.message.find("rank " + std::to_string(me)), std::string::npos);
      EXPECT_NE(o.message.find("peer " + std::to_string(b.write.peer)), std::string::npos);
      EXPECT_NE(o.message.find("write_peers: write 1 of 2"), std::string::npos);
      for (const std::string& n : b.needles) EXPECT_NE(o.message.find(n), std::string::npos) << n;
      for (std::uint8_t x : f.landing) ASSERT_EQ(x, kUntouched) << "a malformed call wrote data";
    }
    const PeerWrite unmapped{0, region(s, 1, 0, 1, 0, 8), region(8, 1, 0, 1, 0, 8)};
    const Outcome o =
        capture([&] { f.comm->write_peers(std::span<const PeerWrite>(&unmapped, 1)); });
    EXPECT_EQ(o.code, ErrorCode::comm_failure) << o.str();
    EXPECT_NE(o.message.find("rank " + std::to_string(me)), std::string::npos) << o.message;
    EXPECT_NE(o.message.find("peer 0"), std::string::npos) << o.message;
    EXPECT_NE(o.message.find("process_vm_writev"), std::string::npos) << o.message;
  }
  MPI_Barrier(MPI_COMM_WORLD);
  if (me == 0) {  // nothing landed in rank 0's memory either
    EXPECT_EQ(f.slot(P - 1, 0), std::vector<std::uint8_t>(kDestBytes, kUntouched));
  }
  MPI_Barrier(MPI_COMM_WORLD);
  // Everybody: a correct write to the next rank still works.
  if (f.comm->can_read_peers()) {
    const Case c = cases()[1];
    const PeerWrite w = f.write(c, (me + 1) % P, 0);
    const Outcome o = capture([&] { f.comm->write_peers(std::span<const PeerWrite>(&w, 1)); });
    EXPECT_EQ(o.kind, Outcome::ok) << o.str();
    MPI_Barrier(MPI_COMM_WORLD);
    const int writer = (me - 1 + P) % P;
    expect_read(c, writer, f.slot(writer, 0));
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

// After a timeout the communicator is poisoned: read_peers refuses with comm_failure too.
TEST(PeerRead, PoisonedCommunicatorRefuses) {
  if (world_size() < 2) GTEST_SKIP() << "needs a peer that does not arrive";
  MpiOptions o;
  o.timeout_seconds = 0.3;
  auto comm = make_mpi_communicator(MPI_COMM_WORLD, o);
  if (world_rank() == 0) {
    int x = 0;
    std::vector<int> all(static_cast<std::size_t>(world_size()));
    const Outcome t = capture([&] { comm->allgather(&x, sizeof x, all.data()); });
    EXPECT_EQ(t.code, ErrorCode::timeout) << t.str();
    const Outcome r = capture([&] { comm->read_peers({}); });
    EXPECT_EQ(r.code, ErrorCode::comm_failure) << r.str();
    EXPECT_NE(r.message.find("read_peers refused"), std::string::npos) << r.message;
    const Outcome w = capture([&] { comm->write_peers({}); });
    EXPECT_EQ(w.code, ErrorCode::comm_failure) << w.str();
    EXPECT_NE(w.message.find("write_peers refused"), std::string::npos) << w.message;
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

}  // namespace
}  // namespace uaa::test
