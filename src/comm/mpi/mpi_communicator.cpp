// MPI transport: two duplicated communicators with MPI_ERRORS_RETURN, a control plane of small
// fixed-size records, 64-bit point-to-point exchanges, deadlines and failure notices.
//
// Communicators (both MPI_Comm_idup of the caller's, made under the deadline):
//   data_:    every exchange() message, one tag (kDataTag). MPI never lets two messages of one
//             (source, tag, communicator) overtake each other, and a rank posts its receives in the
//             order they are listed, so the i-th message from j meets the i-th receive for j.
//   control_: agreements (kAgreeTag, and kBcastTag for the failure report), allgather (kGatherTag)
//             and failure notices (kNoticeTag). Only fixed-size records travel here.
// A message of any size is cut into point-to-point messages of at most max_count elements; the
// element of a message is gcd(4096, its byte count), a number sender and receiver derive alike, so
// they cut it at the same places. A message to this rank itself is a memmove, in listed order.
//
// Agreement (ControlPlane::agree): recursive doubling of one 64-byte WireVote per rank. With P not
// a power of two, the ranks p2 .. P-1 (p2 the largest power of two <= P) first fold their vote into
// rank r - p2 (round 0) and get the result back from it at the end (round L+1). The combination is
// exact (integer min, max, sum, or; ties of a maximum go to the lowest rank), so every rank holds
// the identical Verdict. If any vote failed, a second round broadcasts the lowest failing rank's
// ErrorRecord (code + message, 1024 bytes) down a binomial tree rooted at it.
//
// Deadlines: an operation starts its clock when it is entered; a wait fails at start + timeout
// (plus grace_ per agreement round: a rank waiting in round i of an agreement waits for a partner
// that is stuck in an earlier round, so the rank next to a stopped rank times out first and its
// notice, which names the stopped rank, reaches the others before their own deadlines blame a
// healthy neighbour; and, in an exchange, a stagger of min(rank, 16) x 5% of the timeout (20-250
// ms) per rank, so that ranks waiting on the same missing peer time out in rank order and all raise
// the first one's notice). Polling: MPI_Testsome in a tight loop for the first 100 µs, then yielding
// the core between polls, after 20 ms sleeping 100 µs between polls. MPICH raises errors of
// request completion on MPI_COMM_WORLD's handler, not ours (uaa/mpi.h): nothing to do about it.
//
// Failure notices: every communicator keeps one MPI_Irecv(ANY_SOURCE, kNoticeTag) posted on
// control_; every wait loop tests it. The rank that detects a failure which leaves peers waiting (a
// timeout, an MPI error, a malformed exchange) sends its ErrorRecord to every other rank, cleans up
// its requests (receives cancelled, sends given ~1 s, the rest released with MPI_Request_free),
// poisons the communicator and throws. A rank that receives a notice cleans up, poisons and throws
// the failing rank's own code and message. Buffers MPI may still touch after that are kept until
// the process exits (keep_forever), never freed.
//
// Construction cannot throw on one rank alone: local problems (UAA_TIMEOUT_SECONDS,
// UAA_PEER_READS, the options) are remembered, the communicators are duplicated anyway (a rank with
// a malformed timeout waits the default), and the first agreement carries the problem as a failed
// vote, so every rank throws the same error.
//
// Peer reads and writes (uaa/mpi.h): decided once in the constructor from an all-gather of one
// record per rank (node identity, pid, probe address and value), then an agreement (every rank has
// allowed reads), a process_vm_readv of every rank's probe, and an agreement on the result. Each
// side of a run of consecutive same-peer accesses is walked as a stream of iovecs (adjacent runs
// merged), handed to the kernel up to IOV_MAX at a time; both streams advance by what each call
// copied, so that partial transfers and sides cut into different runs just work.
#include <algorithm>
#include <bit>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iomanip>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <sstream>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/prctl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#define UAA_HAVE_PROCESS_VM_READV 1
#else
#define UAA_HAVE_PROCESS_VM_READV 0
#endif

#include "comm/control_plane.h"
#include "common/strings.h"
#include "uaa/error.h"
#include "uaa/mpi.h"

namespace uaa {
namespace {

using detail::cat;
using detail::Verdict;
using detail::Vote;
using Clock = std::chrono::steady_clock;

constexpr int kDataTag = 1;  // on data_
constexpr int kAgreeTag = 1, kBcastTag = 2, kGatherTag = 3, kNoticeTag = 4;  // on control_

constexpr double kNoDeadlineAbove = 1e9;  // seconds; more (or inf, or <= 0): no deadline
constexpr double kCleanupSeconds = 1.0;   // how long failed sends may still complete
constexpr std::uint8_t kConstructKind = 0;  // the transport's own agreements (not counted)

// One rank's vote, and the combination of several: the only record of a successful agreement.
struct WireVote {
  std::uint64_t fingerprint_min, fingerprint_max;
  std::uint64_t sequence_min, sequence_max;
  std::uint32_t kernel_min, kernel_max;
  std::int32_t fingerprint_max_rank, sequence_max_rank, kernel_max_rank;
  std::int32_t failed_count;
  std::int32_t first_failed_rank;  // INT32_MAX: none
  std::uint16_t flags;
  std::uint8_t kind_min, kind_max;
};
static_assert(sizeof(WireVote) == 64, "the agreement's wire record is 64 bytes");
static_assert(std::is_trivially_copyable_v<WireVote>);

// Keeps the maximum, and the lowest rank holding it.
template <class T>
void keep_max(T& value, std::int32_t& rank, T other, std::int32_t other_rank) {
  if (other > value) {
    value = other;
    rank = other_rank;
  } else if (other == value) {
    rank = std::min(rank, other_rank);
  }
}

// Exact, commutative and associative: any order of combination gives the same record.
void combine(WireVote& a, const WireVote& b) {
  a.fingerprint_min = std::min(a.fingerprint_min, b.fingerprint_min);
  keep_max(a.fingerprint_max, a.fingerprint_max_rank, b.fingerprint_max, b.fingerprint_max_rank);
  a.sequence_min = std::min(a.sequence_min, b.sequence_min);
  keep_max(a.sequence_max, a.sequence_max_rank, b.sequence_max, b.sequence_max_rank);
  a.kernel_min = std::min(a.kernel_min, b.kernel_min);
  keep_max(a.kernel_max, a.kernel_max_rank, b.kernel_max, b.kernel_max_rank);
  a.failed_count += b.failed_count;
  a.first_failed_rank = std::min(a.first_failed_rank, b.first_failed_rank);
  a.flags = static_cast<std::uint16_t>(a.flags | b.flags);
  a.kind_min = std::min(a.kind_min, b.kind_min);
  a.kind_max = std::max(a.kind_max, b.kind_max);
}

// An error travelling between ranks: the second round of a failed agreement, or a failure notice.
constexpr std::uint32_t kReportMagic = 0x55414145;  // "UAAE"
constexpr std::uint32_t kNoticeMagic = 0x5541414e;  // "UAAN"
struct ErrorRecord {
  std::uint32_t magic = 0;
  std::int32_t code = 0;
  std::int32_t rank = -1;  // the rank whose error this is
  std::uint32_t length = 0;
  char text[1008] = {};
};
static_assert(sizeof(ErrorRecord) == 1024);

// A message as it fits an ErrorRecord (every rank reports exactly this text).
std::string fit(const std::string& message) {
  constexpr std::size_t room = sizeof(ErrorRecord::text);
  if (message.size() <= room) return message;
  static constexpr char tail[] = " [... truncated]";
  return message.substr(0, room - (sizeof tail - 1)) + tail;
}

ErrorRecord make_record(std::uint32_t magic, ErrorCode code, int rank, const std::string& fitted) {
  ErrorRecord r;
  r.magic = magic;
  r.code = static_cast<std::int32_t>(code);
  r.rank = rank;
  r.length = static_cast<std::uint32_t>(fitted.size());
  std::memcpy(r.text, fitted.data(), fitted.size());
  return r;
}

bool valid_record(const ErrorRecord& r, std::uint32_t magic) {
  return r.magic == magic && r.length <= sizeof r.text;
}

// Any code error_code_name knows (codes added to ErrorCode travel without a change here), else
// internal.
ErrorCode code_of(const ErrorRecord& r) {
  if (r.code < 0 || r.code > 255) return ErrorCode::internal;
  const ErrorCode c = static_cast<ErrorCode>(r.code);
  return std::strcmp(error_code_name(c), "unknown") == 0 ? ErrorCode::internal : c;
}

std::string text_of(const ErrorRecord& r) { return std::string(r.text, r.length); }

std::string seconds_text(double s) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(s < 10 ? 2 : 1) << s;
  return os.str();
}

std::string error_text(int rc) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(rc, text, &len) != MPI_SUCCESS) return cat("MPI error ", rc);
  return std::string(text, static_cast<std::size_t>(len));
}

std::string rank_list(const std::vector<int>& v) {
  std::string t;
  for (std::size_t i = 0; i < v.size(); ++i) t += cat(i ? ", " : "", v[i]);
  return t;
}

// Memory that MPI may still touch after a failure (buffers of requests that could be neither
// completed nor cancelled, handles of an unfinished MPI_Comm_idup): kept, reachable, until exit.
void keep_forever(std::shared_ptr<void> p) {
  static std::mutex mutex;
  static auto* kept = new std::vector<std::shared_ptr<void>>;
  const std::lock_guard<std::mutex> lock(mutex);
  kept->push_back(std::move(p));
}

void backoff(Clock::duration waited) {
  if (waited > std::chrono::milliseconds(20))
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  else if (waited > std::chrono::microseconds(100))
    std::this_thread::yield();
}

std::string describe(const StridedBytes& s) {
  return cat("{address 0x", std::hex, s.address, std::dec, ", n0 ", s.n0, ", s0 ", s.s0, ", n1 ",
             s.n1, ", s1 ", s.s1, ", run ", s.run, "}");
}

// Sets `bytes` to s.bytes() (computed without overflow), or returns false with `why` set when s is
// malformed.
bool region_bytes(const StridedBytes& s, std::int64_t& bytes, std::string& why) {
  if (s.n0 < 0 || s.n1 < 0 || s.run < 0) {
    why = "negative count";
    return false;
  }
  std::int64_t blocks = 0;
  if (__builtin_mul_overflow(s.n0, s.n1, &blocks) ||
      __builtin_mul_overflow(blocks, s.run, &bytes)) {
    why = "n0 * n1 * run overflows 64 bits";
    return false;
  }
  if (bytes > 0 && s.address == 0) {
    why = cat("null address for ", bytes, " bytes");
    return false;
  }
  return true;
}

// The names peer reads and peer writes use in their messages.
template <class Access>
struct AccessWords;
template <>
struct AccessWords<PeerRead> {
  static constexpr const char* call = "read_peers";
  static constexpr const char* noun = "read";
  static constexpr const char* direction = "from";
  static constexpr const char* verb = "reading";
  static constexpr const char* syscall = "process_vm_readv";
};
template <>
struct AccessWords<PeerWrite> {
  static constexpr const char* call = "write_peers";
  static constexpr const char* noun = "write";
  static constexpr const char* direction = "to";
  static constexpr const char* verb = "writing";
  static constexpr const char* syscall = "process_vm_writev";
};

#if UAA_HAVE_PROCESS_VM_READV
constexpr std::size_t kIovMax = IOV_MAX;

// The segments of one side of a list of peer accesses, in order, as iovecs: runs that touch are one
// segment.
template <class Access>
class IovecStream {
 public:
  IovecStream(std::span<const Access> list, bool from_side) : list_(list), from_(from_side) {}

  // Appends segments to `out` until it holds kIovMax entries or the stream is exhausted.
  void fill(std::vector<iovec>& out) {
    while (out.size() < kIovMax) {
      if (i0_ >= n0_) {
        if (next_ == list_.size()) return;
        start(from_ ? list_[next_].from : list_[next_].to);
        ++next_;
        continue;
      }
      const std::uintptr_t a = block_ + static_cast<std::uintptr_t>(i1_) * s1_;
      const std::size_t len = static_cast<std::size_t>(run_);
      if (!out.empty() && reinterpret_cast<std::uintptr_t>(out.back().iov_base) +
                                  out.back().iov_len == a)
        out.back().iov_len += len;
      else
        out.push_back(iovec{reinterpret_cast<void*>(a), len});
      if (++i1_ == n1_) {
        i1_ = 0;
        ++i0_;
        block_ += s0_;
      }
    }
  }

 private:
  // Normalizes a validated region: contiguous runs become one run, contiguous blocks one block.
  void start(const StridedBytes& s) {
    i0_ = i1_ = 0;
    n0_ = s.n0;
    n1_ = s.n1;
    run_ = s.run;
    block_ = s.address;
    s0_ = static_cast<std::uintptr_t>(s.s0);  // modular arithmetic: negative strides work
    s1_ = static_cast<std::uintptr_t>(s.s1);
    if (n0_ == 0 || n1_ == 0 || run_ == 0) {
      n0_ = 0;  // empty
      return;
    }
    if (n1_ == 1 || s.s1 == run_) {
      run_ *= n1_;
      n1_ = 1;
      if (n0_ == 1 || s.s0 == run_) {
        run_ *= n0_;
        n0_ = 1;
      }
    }
  }

  std::span<const Access> list_;
  bool from_;
  std::size_t next_ = 0;
  std::int64_t n0_ = 0, n1_ = 0, run_ = 0, i0_ = 0, i1_ = 0;
  std::uintptr_t block_ = 0, s0_ = 0, s1_ = 0;
};

// Drops the first `n` bytes of an iovec list (the part a process_vm_readv/writev call copied).
void consume(std::vector<iovec>& v, std::size_t n) {
  std::size_t i = 0;
  while (i < v.size() && n >= v[i].iov_len) n -= v[i++].iov_len;
  if (i < v.size() && n > 0) {
    v[i].iov_base = static_cast<char*>(v[i].iov_base) + n;
    v[i].iov_len -= n;
  }
  v.erase(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(i));
}

// Linux Yama with ptrace_scope 1 lets a process read only its descendants' memory unless the target
// allows it. Open MPI's vader transport calls prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY) itself
// when it uses cross-memory attach, so in an MPI job this usually grants nothing new; we do the
// same, and only when Yama's scope is 1 (scopes 2 and 3 cannot be relaxed: the probe then fails).
// Processes of other users remain excluded by the kernel's ordinary uid checks.
void allow_sibling_reads() {
  std::FILE* f = std::fopen("/proc/sys/kernel/yama/ptrace_scope", "r");
  if (f == nullptr) return;
  int scope = -1;
  if (std::fscanf(f, "%d", &scope) != 1) scope = -1;
  std::fclose(f);
  if (scope == 1) prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0UL, 0UL, 0UL);
}

// One node: the same host name and the same kernel boot (FNV-1a of both).
std::uint64_t node_identity() {
  std::string id;
  char host[256] = {};
  if (gethostname(host, sizeof host - 1) == 0) id = host;
  id += '\n';
  if (std::FILE* f = std::fopen("/proc/sys/kernel/random/boot_id", "r")) {
    char boot[64] = {};
    const std::size_t n = std::fread(boot, 1, sizeof boot, f);
    std::fclose(f);
    id.append(boot, n);
  }
  std::uint64_t h = 14695981039346656037ull;
  for (unsigned char c : id) h = (h ^ c) * 1099511628211ull;
  return h;
}
#endif

// What the constructor gathers from every rank to decide on peer reads.
struct HostRecord {
  std::uint64_t node = 0;
  std::int64_t pid = 0;
  std::uint64_t address = 0, value = 0;
  std::uint32_t allowed = 0, zero = 0;
};
static_assert(sizeof(HostRecord) == 40);

// The results of MPI_Comm_idup, on the heap: if the deadline passes they stay MPI's forever.
struct Duplicates {
  MPI_Comm comm[2] = {MPI_COMM_NULL, MPI_COMM_NULL};
  MPI_Request request[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
};

// Records the control plane sends and receives; they outlive a poisoned communicator.
struct Buffers {
  WireVote vote_out{}, vote_in{};
  ErrorRecord report_out, report_in;  // second round of a failed agreement
  ErrorRecord notice_in;              // the posted notice receive
  ErrorRecord notice_out;             // this rank's failure notice
};

// The MPI objects of a communicator. A member (destroyed last, also when the constructor throws):
// frees them when healthy, leaves them to MPI (and keeps the buffers) when poisoned.
struct MpiResources {
  MPI_Comm data = MPI_COMM_NULL, control = MPI_COMM_NULL;
  std::shared_ptr<Buffers> buffers = std::make_shared<Buffers>();
  MPI_Request notice = MPI_REQUEST_NULL;
  std::map<std::int64_t, MPI_Datatype> types;
  bool poisoned = false;

  MpiResources() = default;
  MpiResources(const MpiResources&) = delete;
  MpiResources& operator=(const MpiResources&) = delete;

  ~MpiResources() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;  // too late to free anything; MPI already released it
    if (notice != MPI_REQUEST_NULL) {
      MPI_Cancel(&notice);
      const Clock::time_point start = Clock::now();
      int flag = 0;
      while (!flag && Clock::now() - start < std::chrono::duration<double>(kCleanupSeconds)) {
        if (MPI_Test(&notice, &flag, MPI_STATUS_IGNORE) != MPI_SUCCESS) break;
        if (!flag) backoff(Clock::now() - start);
      }
      if (notice != MPI_REQUEST_NULL) {
        MPI_Request_free(&notice);
        poisoned = true;  // the receive may still land in notice_in
      }
    }
    if (poisoned) {
      // Requests of the failed operation may still be pending on the communicators: leave them
      // to MPI, and their buffers alive.
      keep_forever(buffers);
      return;
    }
    for (auto& [unit, type] : types) MPI_Type_free(&type);
    if (data != MPI_COMM_NULL) MPI_Comm_free(&data);
    if (control != MPI_COMM_NULL) MPI_Comm_free(&control);
  }
};

class MpiCommunicator final : public Communicator, public detail::ControlPlane {
 public:
  MpiCommunicator(MPI_Comm comm, const MpiOptions& options) : options_(options) {
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    if (!initialized || finalized)
      throw Error(ErrorCode::invalid_argument,
                  cat("uaa::make_mpi_communicator: MPI is ",
                      finalized ? "already finalized" : "not initialized"));
    if (comm == MPI_COMM_NULL)
      throw Error(ErrorCode::invalid_argument, "uaa::make_mpi_communicator: comm is MPI_COMM_NULL");
    MPI_Comm_rank(comm, &rank_);
    MPI_Comm_size(comm, &size_);

    // 1. Local checks: remembered, not thrown, so that no rank leaves the others behind.
    std::string problem;
    auto note = [&](const std::string& what) {
      if (problem.empty())
        problem = cat("uaa::make_mpi_communicator: rank ", rank_, ": ", what);
    };
    if (options_.max_count < 1 || options_.max_count > 2147483647)
      note(cat("MpiOptions::max_count ", options_.max_count, " is outside [1, 2^31-1]"));
    double timeout = MpiOptions::kDefaultTimeoutSeconds;
    if (options_.timeout_seconds) {
      if (std::isnan(*options_.timeout_seconds))
        note("MpiOptions::timeout_seconds is NaN");
      else
        timeout = *options_.timeout_seconds;
    } else if (const char* env = std::getenv("UAA_TIMEOUT_SECONDS"); env != nullptr && *env) {
      char* end = nullptr;
      const double v = std::strtod(env, &end);
      if (end == env || *end != '\0' || std::isnan(v))
        note(cat("UAA_TIMEOUT_SECONDS='", env, "' is not a number of seconds"));
      else
        timeout = v;
    }
    set_timeout(timeout);
    bool env_peer_reads = true;
    if (const char* env = std::getenv("UAA_PEER_READS"); env != nullptr && *env) {
      if (std::strcmp(env, "0") == 0)
        env_peer_reads = false;
      else if (std::strcmp(env, "1") != 0)
        note(cat("UAA_PEER_READS='", env, "' is not 0 or 1"));
    }

    // 2. The communicators, under the deadline.
    duplicate(comm);
    post_notice_receive();

    // 3. Every rank learns every rank's problem; all throw the lowest failing rank's error.
    Vote v;
    v.fingerprint = static_cast<std::uint64_t>(options_.max_count);
    v.failed = !problem.empty();
    v.code = ErrorCode::invalid_argument;
    v.message = problem;
    const Verdict c = agree_as(kConstructKind, v, false);
    if (c.failed_count > 0) throw Error(c.code, c.message);
    if (c.fingerprint_min != c.fingerprint_max)
      throw Error(ErrorCode::invalid_argument,
                  cat("uaa::make_mpi_communicator: ranks disagree on MpiOptions::max_count: rank ",
                      c.fingerprint_max_rank, " has ", c.fingerprint_max, ", another rank ",
                      c.fingerprint_min, " (it must be the same on every rank)"));

    // 4. Peer reads, decided alike on every rank.
    const char* why_not = !options_.peer_reads ? "MpiOptions::peer_reads is false"
                                               : "UAA_PEER_READS=0";
    decide_peer_reads(options_.peer_reads && env_peer_reads, why_not);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* transport() const override { return "mpi"; }

  bool can_read_peers() const override { return peer_reads_; }

  void read_peers(std::span<const PeerRead> reads) override { access_peers(reads); }
  void write_peers(std::span<const PeerWrite> writes) override { access_peers(writes); }

  std::uint64_t agreements() const override { return agreements_; }

  Verdict agree(const Vote& mine) override {
    return agree_as(static_cast<std::uint8_t>(mine.kind), mine, true);
  }

  void allgather(const void* send, std::size_t bytes, void* recv) override {
    refuse_if_poisoned("allgather");
    if (bytes > static_cast<std::size_t>(INT_MAX))
      throw Error(ErrorCode::invalid_argument,
                  cat("uaa mpi: rank ", rank_, ": allgather of ", bytes, " bytes per rank"));
    poll_notice();
    std::memmove(static_cast<char*>(recv) + rank_ * bytes, send, bytes);
    if (size_ == 1 || bytes == 0) return;
    const Clock::time_point start = Clock::now();
    clear_requests();
    const int n = static_cast<int>(bytes);
    for (int j = 0; j < size_; ++j)
      if (j != rank_)
        post(false, static_cast<char*>(recv) + j * bytes, n, MPI_BYTE, j, kGatherTag, res_.control);
    for (int j = 0; j < size_; ++j)
      if (j != rank_) post(true, const_cast<void*>(send), n, MPI_BYTE, j, kGatherTag, res_.control);
    auto what = [&] { return cat("allgather (", bytes, " bytes per rank)"); };
    if (!wait_requests(start, deadline_after(start, 0), what))
      timed_out(start, what(), "this allgather");
  }

  void exchange(std::span<const Message> sends, std::span<const Message> recvs) override {
    refuse_if_poisoned("exchange");
    poll_notice();
    const Clock::time_point start = Clock::now();
    clear_requests();
    // Checks first: nothing is posted for a malformed exchange (which still stops the collective:
    // the peers are told).
    std::int64_t largest = 0;
    std::size_t self_sends = 0, self_recvs = 0;
    auto check_list = [&](std::span<const Message> list, const char* kind) {
      for (std::size_t i = 0; i < list.size(); ++i) {
        const Message& m = list[i];
        std::string why;
        if (m.peer < 0 || m.peer >= size_)
          why = cat("peer ", m.peer, " is not a rank of this communicator (size ", size_, ")");
        else if (m.bytes < 0)
          why = cat(m.bytes, " bytes");
        else if (m.bytes > 0 && m.data == nullptr)
          why = cat("null data for ", m.bytes, " bytes");
        if (!why.empty())
          fail(ErrorCode::invalid_argument,
               cat("uaa mpi: rank ", rank_, ": exchange: ", kind, " ", i, " of ", list.size(),
                   " (peer ", m.peer, "): ", why));
        largest = std::max(largest, m.bytes);
      }
    };
    check_list(sends, "send");
    check_list(recvs, "receive");
    for (const Message& m : sends) self_sends += m.peer == rank_ && m.bytes > 0;
    for (const Message& m : recvs) self_recvs += m.peer == rank_ && m.bytes > 0;
    if (self_sends != self_recvs)
      fail(ErrorCode::invalid_argument,
           cat("uaa mpi: rank ", rank_, ": exchange: ", self_sends, " non-empty message(s) to this "
               "rank itself but ", self_recvs, " from it"));
    for (std::size_t i = 0, k = 0; i < sends.size(); ++i) {
      if (sends[i].peer != rank_ || sends[i].bytes == 0) continue;
      while (recvs[k].peer != rank_ || recvs[k].bytes == 0) ++k;
      if (recvs[k].bytes != sends[i].bytes)
        fail(ErrorCode::invalid_argument,
             cat("uaa mpi: rank ", rank_, ": exchange: send ", i, " to this rank itself has ",
                 sends[i].bytes, " bytes but receive ", k, " from it has ", recvs[k].bytes));
      ++k;
    }

    for (const Message& m : recvs)
      if (m.peer != rank_ && m.bytes > 0) post_message(false, m);
    for (const Message& m : sends)
      if (m.peer != rank_ && m.bytes > 0) post_message(true, m);
    for (std::size_t i = 0, k = 0; i < sends.size(); ++i) {
      if (sends[i].peer != rank_ || sends[i].bytes == 0) continue;
      while (recvs[k].peer != rank_ || recvs[k].bytes == 0) ++k;
      std::memmove(recvs[k].data, sends[i].data, static_cast<std::size_t>(sends[i].bytes));
      ++k;
    }
    if (requests_.empty()) return;
    auto what = [&] {
      return cat("exchange (", sends.size(), " send(s), ", recvs.size(), " receive(s), largest ",
                 largest, " bytes)");
    };
    // Ranks waiting on the same missing peer time out in rank order (a short stagger): the first
    // one's failure notice reaches the others before their own deadline, so every rank raises that
    // one error instead of each its own view of it.
    Deadline deadline = deadline_after(start, 0);
    if (!deadline.none) deadline.at += std::min(rank_, 16) * stagger_;
    if (!wait_requests(start, deadline, what)) timed_out(start, what(), "this exchange");
  }

 private:
  // ---- Deadlines ----------------------------------------------------------------------------

  void set_timeout(double seconds) {
    has_deadline_ = seconds > 0 && seconds <= kNoDeadlineAbove;  // false for inf and NaN too
    if (has_deadline_) {
      timeout_ =
          std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
      grace_ = std::chrono::duration_cast<Clock::duration>(
          std::chrono::duration<double>(std::clamp(seconds * 0.25, 0.05, 5.0)));
      stagger_ = std::chrono::duration_cast<Clock::duration>(
          std::chrono::duration<double>(std::clamp(seconds * 0.05, 0.02, 0.25)));
    }
  }

  struct Deadline {
    bool none = true;
    Clock::time_point at{};
  };
  // The deadline of a wait that started at `start`, in round `round` of an agreement (0 otherwise).
  Deadline deadline_after(Clock::time_point start, int round) const {
    if (!has_deadline_) return {};
    return {false, start + timeout_ + round * grace_};
  }

  // ---- Requests and waits -------------------------------------------------------------------

  void clear_requests() {
    requests_.clear();
    request_peer_.clear();
  }
  void add_request(MPI_Request r, int peer, bool is_send) {
    requests_.push_back(r);
    request_peer_.push_back(is_send ? -1 - peer : peer);
  }

  // Posts one nonblocking send or receive; an MPI error fails the operation (see fail()).
  void post(bool is_send, void* p, int count, MPI_Datatype type, int peer, int tag, MPI_Comm c) {
    MPI_Request req = MPI_REQUEST_NULL;
    const int rc = is_send ? MPI_Isend(p, count, type, peer, tag, c, &req)
                           : MPI_Irecv(p, count, type, peer, tag, c, &req);
    if (rc != MPI_SUCCESS)
      fail(ErrorCode::comm_failure,
           cat("uaa mpi: rank ", rank_, ": ", is_send ? "MPI_Isend to" : "MPI_Irecv from", " rank ",
               peer, " failed: ", error_text(rc)));
    add_request(req, peer, is_send);
  }

  // One exchange message: point-to-point messages of at most max_count units of gcd(4096, bytes).
  void post_message(bool is_send, const Message& m) {
    const std::int64_t unit = std::gcd(std::int64_t{4096}, m.bytes);
    const MPI_Datatype type = unit_type(unit);
    const std::int64_t units = m.bytes / unit, chunk = options_.max_count;
    char* p = static_cast<char*>(m.data);
    for (std::int64_t at = 0; at < units; at += chunk)
      post(is_send, p + at * unit, static_cast<int>(std::min(chunk, units - at)), type, m.peer,
           kDataTag, res_.data);
  }

  MPI_Datatype unit_type(std::int64_t unit) {
    auto it = res_.types.find(unit);
    if (it != res_.types.end()) return it->second;
    MPI_Datatype t;
    int rc = MPI_Type_contiguous(static_cast<int>(unit), MPI_BYTE, &t);
    if (rc == MPI_SUCCESS) {
      rc = MPI_Type_commit(&t);
      if (rc != MPI_SUCCESS) MPI_Type_free(&t);
    }
    if (rc != MPI_SUCCESS)
      fail(ErrorCode::comm_failure, cat("uaa mpi: rank ", rank_, ": creating a ", unit,
                                        "-byte MPI datatype failed: ", error_text(rc)));
    res_.types.emplace(unit, t);
    return t;
  }

  // Waits for every request in requests_ until the deadline: true when all completed, false when
  // the deadline passed first. Throws when a failure notice arrives or MPI reports an error.
  template <class Describe>
  bool wait_requests(Clock::time_point start, Deadline deadline, const Describe& what) {
    const int n = static_cast<int>(requests_.size());
    indices_.resize(static_cast<std::size_t>(n));
    statuses_.resize(static_cast<std::size_t>(n));
    int left = 0;
    for (MPI_Request r : requests_) left += r != MPI_REQUEST_NULL;
    for (;;) {
      if (left > 0) {
        int done = 0;
        const int rc = MPI_Testsome(n, requests_.data(), &done, indices_.data(), statuses_.data());
        if (rc != MPI_SUCCESS) failed_in_wait(rc, done, what());
        left = done == MPI_UNDEFINED ? 0 : left - done;
      }
      if (left == 0) return true;
      poll_notice();
      const Clock::time_point now = Clock::now();
      if (!deadline.none && now >= deadline.at) return false;
      backoff(now - start);
    }
  }

  // An MPI error completing a request: names the request's peer and direction when MPI says which.
  [[noreturn]] void failed_in_wait(int rc, int done, const std::string& what) {
    std::string detail = cat("MPI_Testsome failed: ", error_text(rc));
    if (rc == MPI_ERR_IN_STATUS && done != MPI_UNDEFINED) {
      for (int k = 0; k < done; ++k) {
        const int err = statuses_[static_cast<std::size_t>(k)].MPI_ERROR;
        if (err == MPI_SUCCESS || err == MPI_ERR_PENDING) continue;
        const std::size_t i = static_cast<std::size_t>(indices_[static_cast<std::size_t>(k)]);
        const int code = request_peer_[i];
        detail = code >= 0 ? cat("receiving from rank ", code, " failed: ", error_text(err))
                           : cat("sending to rank ", -1 - code, " failed: ", error_text(err));
        break;
      }
    }
    fail(ErrorCode::comm_failure,
         cat("uaa mpi: rank ", rank_, ": ", what, ": ", detail, "; this communicator is now "
             "unusable (keep the buffers of this call alive and abort)"));
  }

  // The deadline passed: names the ranks whose messages are incomplete.
  [[noreturn]] void timed_out(Clock::time_point start, const std::string& what, const char* scope,
                              const std::string& where = std::string()) {
    std::vector<int> no_data, not_taken;  // peers whose message to us / from us is incomplete
    for (std::size_t i = 0; i < requests_.size(); ++i) {
      if (requests_[i] == MPI_REQUEST_NULL) continue;
      std::vector<int>& list = request_peer_[i] >= 0 ? no_data : not_taken;
      const int peer = request_peer_[i] >= 0 ? request_peer_[i] : -1 - request_peer_[i];
      if (std::find(list.begin(), list.end(), peer) == list.end()) list.push_back(peer);
    }
    std::sort(no_data.begin(), no_data.end());
    std::sort(not_taken.begin(), not_taken.end());
    const double waited = std::chrono::duration<double>(Clock::now() - start).count();
    std::string msg = cat("uaa mpi: rank ", rank_, ": ", what, " timed out after ",
                          seconds_text(waited), " s", where, ": ");
    if (!no_data.empty()) msg += cat("no data from rank(s) ", rank_list(no_data));
    if (!not_taken.empty())
      msg += cat(no_data.empty() ? "" : "; ", "rank(s) ", rank_list(not_taken),
                 " did not take this rank's data");
    msg += cat(" (they never joined ", scope,
               ": crashed, skipped a call, or are blocked in another); this communicator is now "
               "unusable (UAA_TIMEOUT_SECONDS sets the deadline)");
    fail(ErrorCode::timeout, msg);
  }

  // ---- Failures -----------------------------------------------------------------------------

  // This rank cannot finish a collective: tell every rank, clean up, poison, throw. If another
  // rank's notice is already here, its error is the one raised (the first failure wins).
  [[noreturn]] void fail(ErrorCode code, const std::string& message) {
    poll_notice();
    const std::string text = fit(message);
    ErrorRecord& n = res_.buffers->notice_out;
    n = make_record(kNoticeMagic, code, rank_, text);
    // Each send is released at once; the record lives in buffers, which a poisoned communicator
    // never frees.
    for (int j = 0; j < size_; ++j) {
      if (j == rank_) continue;
      MPI_Request r = MPI_REQUEST_NULL;
      if (MPI_Isend(&n, sizeof n, MPI_BYTE, j, kNoticeTag, res_.control, &r) == MPI_SUCCESS &&
          r != MPI_REQUEST_NULL)
        MPI_Request_free(&r);
    }
    abandon_requests();
    poison(text);
    throw Error(code, text);
  }

  // Throws the error of a failure notice if one has arrived.
  void poll_notice() {
    if (res_.notice == MPI_REQUEST_NULL) return;
    int flag = 0;
    if (MPI_Test(&res_.notice, &flag, MPI_STATUS_IGNORE) != MPI_SUCCESS) {
      // Cannot happen for a fixed-size record; stop listening rather than fail on it.
      res_.notice = MPI_REQUEST_NULL;
      res_.poisoned = true;  // the request's fate is MPI's: keep its buffer
      return;
    }
    if (!flag) return;
    const ErrorRecord& n = res_.buffers->notice_in;
    if (!valid_record(n, kNoticeMagic)) {  // not a notice of ours: listen again
      post_notice_receive();
      return;
    }
    const std::string text = text_of(n);
    abandon_requests();
    poison(cat("rank ", n.rank, " failed: ", text));
    throw Error(code_of(n), text);
  }

  void post_notice_receive() {
    ErrorRecord& n = res_.buffers->notice_in;
    n = ErrorRecord{};
    if (MPI_Irecv(&n, sizeof n, MPI_BYTE, MPI_ANY_SOURCE, kNoticeTag, res_.control, &res_.notice) !=
        MPI_SUCCESS)
      res_.notice = MPI_REQUEST_NULL;  // no notices then; deadlines still hold
  }

  // Cancels every outstanding receive, gives sends kCleanupSeconds to complete, and releases
  // whatever is left (the communicator is poisoned right after: its buffers stay the caller's to
  // keep alive).
  void abandon_requests() {
    for (std::size_t i = 0; i < requests_.size(); ++i)
      if (requests_[i] != MPI_REQUEST_NULL && request_peer_[i] >= 0) MPI_Cancel(&requests_[i]);
    const Clock::time_point start = Clock::now();
    for (;;) {
      bool left = false;
      for (MPI_Request& r : requests_) {
        if (r == MPI_REQUEST_NULL) continue;
        int flag = 0;
        if (MPI_Test(&r, &flag, MPI_STATUS_IGNORE) != MPI_SUCCESS && r != MPI_REQUEST_NULL) {
          MPI_Request_free(&r);  // completed with an error
          continue;
        }
        left = left || r != MPI_REQUEST_NULL;
      }
      const Clock::duration waited = Clock::now() - start;
      if (!left || waited > std::chrono::duration<double>(kCleanupSeconds)) break;
      backoff(waited);
    }
    for (MPI_Request& r : requests_)
      if (r != MPI_REQUEST_NULL) MPI_Request_free(&r);
    clear_requests();
  }

  void poison(const std::string& why) {
    poisoned_ = why;
    res_.poisoned = true;
  }

  void refuse_if_poisoned(const char* what) const {
    if (!poisoned_.empty())
      throw Error(ErrorCode::comm_failure,
                  cat("uaa mpi: rank ", rank_, ": ", what,
                      " refused: this communicator is unusable since an earlier operation failed (",
                      poisoned_, "); abort the job (MPI_Abort) or build a new communicator"));
  }

  // ---- Construction -------------------------------------------------------------------------

  void duplicate(MPI_Comm parent) {
    auto dup = std::make_shared<Duplicates>();
    for (int i = 0; i < 2; ++i) {
      const int rc = MPI_Comm_idup(parent, &dup->comm[i], &dup->request[i]);
      if (rc != MPI_SUCCESS) {
        keep_forever(dup);
        throw Error(ErrorCode::comm_failure,
                    cat("uaa::make_mpi_communicator: rank ", rank_, ": MPI_Comm_idup failed: ",
                        error_text(rc)));
      }
    }
    // A rank whose own timeout is malformed waits the default (set_timeout got the default; its
    // error comes in the first agreement).
    const Clock::time_point start = Clock::now();
    const Deadline deadline = deadline_after(start, 0);
    for (;;) {
      int flag = 0;
      const int rc = MPI_Testall(2, dup->request, &flag, MPI_STATUSES_IGNORE);
      if (rc != MPI_SUCCESS) {
        keep_forever(dup);
        throw Error(ErrorCode::comm_failure,
                    cat("uaa::make_mpi_communicator: rank ", rank_, ": MPI_Comm_idup failed: ",
                        error_text(rc)));
      }
      if (flag) break;
      const Clock::time_point now = Clock::now();
      if (!deadline.none && now >= deadline.at) {
        keep_forever(dup);  // a nonblocking collective can be neither cancelled nor freed
        throw Error(ErrorCode::timeout,
                    cat("uaa::make_mpi_communicator: rank ", rank_, ": duplicating the "
                        "communicator (MPI_Comm_idup) timed out after ",
                        seconds_text(std::chrono::duration<double>(now - start).count()),
                        " s: some of its ", size_, " ranks never called make_mpi_communicator "
                        "(crashed, skipped it, or are blocked elsewhere)"));
      }
      backoff(now - start);
    }
    res_.data = dup->comm[0];
    res_.control = dup->comm[1];
    MPI_Comm_set_errhandler(res_.data, MPI_ERRORS_RETURN);
    MPI_Comm_set_errhandler(res_.control, MPI_ERRORS_RETURN);
    MPI_Comm_rank(res_.data, &rank_);
    MPI_Comm_size(res_.data, &size_);
  }

  // Collective: sets peer_reads_ identically on every rank, else no_peer_reads_ (also identical
  // unless it is this rank's own reason).
  void decide_peer_reads(bool allowed_here, std::string why_not_here) {
#if !UAA_HAVE_PROCESS_VM_READV
    if (allowed_here) why_not_here = "this OS has no process_vm_readv (Linux only)";
    allowed_here = false;
#endif
    HostRecord me;
    me.allowed = allowed_here ? 1 : 0;
#if UAA_HAVE_PROCESS_VM_READV
    const pid_t pid = getpid();
    probe_ = 0x7561612d70656572ull ^ (static_cast<std::uint64_t>(pid) << 20) ^
             static_cast<std::uint64_t>(rank_);
    me.node = node_identity();
    me.pid = pid;
    me.address = reinterpret_cast<std::uintptr_t>(&probe_);
    me.value = probe_;
#endif
    std::vector<HostRecord> all(static_cast<std::size_t>(size_));
    allgather(&me, sizeof me, all.data());
    for (int j = 0; j < size_; ++j) {
      if (all[static_cast<std::size_t>(j)].allowed) continue;
      no_peer_reads_ = allowed_here ? cat("disabled on rank ", j,
                                          " (MpiOptions::peer_reads, UAA_PEER_READS, or no "
                                          "process_vm_readv there)")
                                    : why_not_here;
      return;
    }
    for (int j = 1; j < size_; ++j) {
      if (all[static_cast<std::size_t>(j)].node == all[0].node) continue;
      no_peer_reads_ = cat("the ranks span more than one node (rank ", j,
                           " is not on rank 0's node)");
      return;
    }
#if UAA_HAVE_PROCESS_VM_READV
    allow_sibling_reads();
    agree_as(kConstructKind, Vote{}, false);  // every rank allows reads before any rank reads
    std::string failure;
    for (int j = 0; j < size_ && failure.empty(); ++j) {
      const HostRecord& p = all[static_cast<std::size_t>(j)];
      std::uint64_t got = 0;
      iovec local{&got, sizeof got}, remote{reinterpret_cast<void*>(p.address), sizeof got};
      ssize_t n;
      do n = process_vm_readv(static_cast<pid_t>(p.pid), &local, 1, &remote, 1, 0);
      while (n < 0 && errno == EINTR);
      if (n != static_cast<ssize_t>(sizeof got))
        failure = cat("rank ", rank_, " could not read rank ", j, " (pid ", p.pid, "): ",
                      n < 0 ? std::strerror(errno) : "short read");
      else if (got != p.value)
        failure = cat("rank ", rank_, " read a wrong value from rank ", j, " (pid ", p.pid,
                      "; ranks in different PID namespaces?)");
    }
    Vote v;  // also keeps every probe_ alive until every rank has read it
    v.failed = !failure.empty();
    v.message = failure;
    const Verdict verdict = agree_as(kConstructKind, v, false);
    if (verdict.failed_count > 0) {
      no_peer_reads_ = cat("the probe read failed: ", verdict.message);
      return;
    }
    pids_.resize(static_cast<std::size_t>(size_));
    for (int j = 0; j < size_; ++j)
      pids_[static_cast<std::size_t>(j)] = static_cast<pid_t>(all[static_cast<std::size_t>(j)].pid);
    peer_reads_ = true;
#endif
  }

  // ---- Agreement ----------------------------------------------------------------------------

  const char* kind_name(std::uint8_t kind) const {
    return kind == kConstructKind ? "make_mpi_communicator"
                                  : detail::vote_kind_name(static_cast<detail::VoteKind>(kind));
  }

  // One round of an agreement: posts the receive (from recv_peer, unless < 0) and the send (to
  // send_peer, unless < 0), waits under the round's deadline.
  void agree_round(int recv_peer, void* in, int send_peer, void* out, int bytes, int tag,
                   Clock::time_point start, int round, std::uint64_t seq, std::uint8_t kind,
                   const char* step) {
    clear_requests();
    if (recv_peer >= 0) post(false, in, bytes, MPI_BYTE, recv_peer, tag, res_.control);
    if (send_peer >= 0) post(true, out, bytes, MPI_BYTE, send_peer, tag, res_.control);
    auto what = [&] {
      return cat("agreement #", seq, " (", kind_name(kind), ") of ", size_, " ranks");
    };
    if (!wait_requests(start, deadline_after(start, round), what))
      timed_out(start, what(), "this agreement",
                cat(" in round ", round, " (", step, " ",
                    recv_peer >= 0 ? recv_peer : send_peer, ")"));
  }

  Verdict agree_as(std::uint8_t kind, const Vote& mine, bool counted) {
    refuse_if_poisoned("agree");
    poll_notice();
    const Clock::time_point start = Clock::now();
    const std::uint64_t seq = counted ? agreements_ : 0;
    WireVote acc{};
    acc.fingerprint_min = acc.fingerprint_max = mine.fingerprint;
    acc.sequence_min = acc.sequence_max = seq;
    acc.kernel_min = acc.kernel_max = mine.kernel;
    acc.fingerprint_max_rank = acc.sequence_max_rank = acc.kernel_max_rank = rank_;
    acc.failed_count = mine.failed ? 1 : 0;
    acc.first_failed_rank = mine.failed ? rank_ : INT32_MAX;
    acc.flags = mine.flags;
    acc.kind_min = acc.kind_max = kind;

    Buffers& b = *res_.buffers;
    const int P = size_, r = rank_;
    int p2 = 1, L = 0;
    while (p2 <= P / 2) {
      p2 *= 2;
      ++L;
    }
    constexpr int kVote = static_cast<int>(sizeof(WireVote));
    constexpr int kReport = static_cast<int>(sizeof(ErrorRecord));
    if (r >= p2) {  // folded into r - p2; the result comes back from it
      b.vote_out = acc;
      agree_round(r - p2, &b.vote_in, r - p2, &b.vote_out, kVote, kAgreeTag, start, L + 1, seq,
                  kind, "folding this rank's vote into, and the result back from, rank");
      acc = b.vote_in;
    } else {
      if (r + p2 < P) {
        agree_round(r + p2, &b.vote_in, -1, nullptr, kVote, kAgreeTag, start, 0, seq, kind,
                    "folding in the vote of rank");
        combine(acc, b.vote_in);
      }
      for (int k = 0; k < L; ++k) {
        const int partner = r ^ (1 << k);
        b.vote_out = acc;
        agree_round(partner, &b.vote_in, partner, &b.vote_out, kVote, kAgreeTag, start, k + 1, seq,
                    kind, "recursive doubling with rank");
        combine(acc, b.vote_in);
      }
      if (r + p2 < P) {
        b.vote_out = acc;
        agree_round(-1, nullptr, r + p2, &b.vote_out, kVote, kAgreeTag, start, L + 1, seq, kind,
                    "handing the result to rank");
      }
    }

    Verdict v;
    v.kind_min = acc.kind_min;
    v.kind_max = acc.kind_max;
    v.fingerprint_min = acc.fingerprint_min;
    v.fingerprint_max = acc.fingerprint_max;
    v.fingerprint_max_rank = acc.fingerprint_max_rank;
    v.sequence_min = acc.sequence_min;
    v.sequence_max = acc.sequence_max;
    v.sequence_max_rank = acc.sequence_max_rank;
    v.kernel_min = acc.kernel_min;
    v.kernel_max = acc.kernel_max;
    v.kernel_max_rank = acc.kernel_max_rank;
    v.flags = acc.flags;
    v.failed_count = acc.failed_count;
    v.first_failed_rank = acc.failed_count > 0 ? acc.first_failed_rank : -1;
    if (acc.failed_count > 0) {
      // Second round: the lowest failing rank's error, down a binomial tree rooted at it.
      const int root = acc.first_failed_rank;
      const int vr = (r - root + P) % P;
      const int base = L + 2;
      int low = 1;  // children are vr + m for m < low (the root: every power of two below P)
      if (vr == 0) {
        b.report_out = make_record(kReportMagic, mine.code, r, fit(mine.message));
        while (low < P) low *= 2;
      } else {
        low = vr & -vr;
        const int parent = (vr - low + root) % P;
        agree_round(parent, &b.report_in, -1, nullptr, kReport, kBcastTag, start,
                    base + std::popcount(static_cast<unsigned>(vr)) - 1, seq, kind,
                    "the failure report from rank");
        if (!valid_record(b.report_in, kReportMagic))
          fail(ErrorCode::internal, cat("uaa mpi: rank ", r, ": agreement #", seq,
                                        ": malformed failure report from rank ", parent));
        b.report_out = b.report_in;
      }
      clear_requests();
      for (int m = low / 2; m >= 1; m /= 2)
        if (vr + m < P)
          post(true, &b.report_out, kReport, MPI_BYTE, (vr + m + root) % P, kBcastTag,
               res_.control);
      auto what = [&] {
        return cat("agreement #", seq, " (", kind_name(kind), ") of ", size_, " ranks");
      };
      const int send_round = base + std::popcount(static_cast<unsigned>(vr));
      if (!wait_requests(start, deadline_after(start, send_round), what))
        timed_out(start, what(), "this agreement", " (passing on the failure report)");
      v.code = code_of(b.report_out);
      v.message = text_of(b.report_out);
    }
    if (counted) ++agreements_;
    return v;
  }

  // ---- Peer reads and writes ----------------------------------------------------------------

  template <class Access>
  void access_peers(std::span<const Access> list) {
    using W = AccessWords<Access>;
    refuse_if_poisoned(W::call);
    if (!peer_reads_)
      throw Error(ErrorCode::unsupported,
                  cat("uaa mpi: rank ", rank_, ": ", W::call, " (", list.size(), " ", W::noun,
                      "(s)",
                      list.empty() ? std::string()
                                   : cat(", the first ", W::direction, " peer ", list[0].peer),
                      "): peer reads are off on this communicator: ", no_peer_reads_));
    // Every access is checked before anything is copied.
    for (std::size_t i = 0; i < list.size(); ++i) {
      const Access& a = list[i];
      auto bad = [&](const std::string& what) {
        throw Error(ErrorCode::invalid_argument,
                    cat("uaa mpi: rank ", rank_, ": ", W::call, ": ", W::noun, " ", i, " of ",
                        list.size(), " (peer ", a.peer, "): ", what));
      };
      if (a.peer < 0 || a.peer >= size_)
        bad(cat("peer ", a.peer, " is not a rank of this communicator (size ", size_, ")"));
      std::int64_t from_bytes = 0, to_bytes = 0;
      std::string why;
      if (!region_bytes(a.from, from_bytes, why)) bad(cat("from ", describe(a.from), ": ", why));
      if (!region_bytes(a.to, to_bytes, why)) bad(cat("to ", describe(a.to), ": ", why));
      if (from_bytes != to_bytes)
        bad(cat("from ", describe(a.from), " has ", from_bytes, " bytes but to ", describe(a.to),
                " has ", to_bytes));
    }
#if UAA_HAVE_PROCESS_VM_READV
    for (std::size_t g = 0; g < list.size();) {
      std::size_t h = g + 1;
      while (h < list.size() && list[h].peer == list[g].peer) ++h;
      transfer_group(list.subspan(g, h - g), g);
      g = h;
    }
#endif
  }

#if UAA_HAVE_PROCESS_VM_READV
  // Copies validated accesses, all of one peer, with as few system calls as IOV_MAX allows.
  template <class Access>
  void transfer_group(std::span<const Access> list, std::size_t first_index) {
    using W = AccessWords<Access>;
    constexpr bool write = std::is_same_v<Access, PeerWrite>;
    const int peer = list[0].peer;
    const pid_t pid = pids_[static_cast<std::size_t>(peer)];
    if (local_.capacity() < kIovMax) {
      local_.reserve(kIovMax);
      remote_.reserve(kIovMax);
    }
    local_.clear();
    remote_.clear();
    // The side in this process is `to` for a read and `from` for a write.
    IovecStream<Access> local(list, write), remote(list, !write);
    std::uint64_t copied = 0;
    for (;;) {
      local.fill(local_);
      remote.fill(remote_);
      if (local_.empty() || remote_.empty()) break;  // both, since both sides have equal bytes
      const ssize_t n =
          write ? process_vm_writev(pid, local_.data(), local_.size(), remote_.data(),
                                    remote_.size(), 0)
                : process_vm_readv(pid, local_.data(), local_.size(), remote_.data(),
                                   remote_.size(), 0);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        const int err = n < 0 ? errno : EFAULT;
        std::uint64_t total = 0;
        for (const Access& a : list) total += static_cast<std::uint64_t>(a.from.bytes());
        throw Error(ErrorCode::comm_failure,
                    cat("uaa mpi: rank ", rank_, ": ", W::call, ": ", W::verb, " peer ", peer,
                        " (pid ", pid, ") failed in ", W::noun, "(s) ", first_index, "..",
                        first_index + list.size() - 1, " after ", copied, " of ", total,
                        " bytes: ", W::syscall, ": ", std::strerror(err)));
      }
      copied += static_cast<std::uint64_t>(n);
      consume(local_, static_cast<std::size_t>(n));
      consume(remote_, static_cast<std::size_t>(n));
    }
  }
#endif

  MpiResources res_;  // first member: destroyed last
  MpiOptions options_;
  int rank_ = 0, size_ = 1;
  bool has_deadline_ = true;
  Clock::duration timeout_{}, grace_{}, stagger_{};  // stagger_: exchange timeouts, per rank
  std::uint64_t agreements_ = 0;
  std::string poisoned_;  // why this communicator refuses further use; empty while usable
  std::vector<MPI_Request> requests_;
  std::vector<int> request_peer_;  // peer of requests_[i]: j for a receive, -1 - j for a send
  std::vector<int> indices_;
  std::vector<MPI_Status> statuses_;
  bool peer_reads_ = false;    // identical on every rank
  std::string no_peer_reads_;  // why peer_reads_ is false
#if UAA_HAVE_PROCESS_VM_READV
  std::uint64_t probe_ = 0;            // read by every rank at construction
  std::vector<pid_t> pids_;            // by rank, when peer_reads_
  std::vector<iovec> local_, remote_;  // iovec windows of read_peers/write_peers, kept across calls
#endif
};

}  // namespace

std::shared_ptr<Communicator> make_mpi_communicator(MPI_Comm comm, const MpiOptions& options) {
  return std::make_shared<MpiCommunicator>(comm, options);
}

}  // namespace uaa
