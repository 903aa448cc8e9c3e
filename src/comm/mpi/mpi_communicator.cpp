// MPI transport: a duplicated communicator with MPI_ERRORS_RETURN, 64-bit uneven exchange, deadlines.
//
// Every exchange is nonblocking point-to-point messages polled until done or until the deadline
// passes, so that a peer that never arrives becomes ErrorCode::timeout naming exactly the ranks whose
// messages are missing (a collective request could only say "incomplete").
//   allgather: one MPI_Irecv per peer and one MPI_Isend per peer, tag kGatherTag.
//   alltoallv: per peer pair, messages of at most max_count elements (the element of each pair's
//     message is gcd(4096, its byte count) — a number sender and receiver derive alike, so they cut
//     the message at the same places), tags 1 + chunk index. This is what Open MPI's linear
//     MPI_Alltoallv does internally; measured equal to MPI_Alltoallv at 2 ranks (FAILURE_MODEL.md).
// Messages between one pair on one tag never overtake each other, and the handshake that opens
// every forward() uses its own tag: payloads of different calls cannot be confused with headers.
//
// Polling: MPI_Testsome in a tight loop for the first 100 µs (an exchange in step costs nothing
// extra), then yielding the core between polls (oversubscribed ranks), and after 20 ms sleeping
// 100 µs between polls (a long wait is a peer still computing: <= 0.5% extra latency).
//
// Peer reads (uaa/mpi.h): decided once in the constructor (collective: allreduce of the local
// permission, MPI_Comm_split_type to see one node, all-gather of (pid, probe address, probe value),
// a process_vm_readv of every rank's probe, allreduce of the verdicts). read_peers walks each side
// of a run of consecutive same-peer reads as a stream of iovecs (adjacent runs merged into one),
// hands the kernel up to IOV_MAX of each side per process_vm_readv call, and advances both streams
// by what the call copied, so that partial transfers and sides cut into different runs just work.
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <numeric>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sys/prctl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdio>
#define UAA_HAVE_PROCESS_VM_READV 1
#else
#define UAA_HAVE_PROCESS_VM_READV 0
#endif

#include "common/strings.h"
#include "uaa/error.h"
#include "uaa/mpi.h"

namespace uaa {
namespace {

using detail::cat;
using Clock = std::chrono::steady_clock;

constexpr int kGatherTag = 0;  // payload chunks use tags 1 .. kMaxTag
constexpr int kMaxTag = 32767;  // the MPI standard guarantees tags up to 32767

// The deadline in seconds (<= 0: none) from the option, else UAA_TIMEOUT_SECONDS, else the default.
double resolve_timeout(const MpiOptions& o) {
  if (o.timeout_seconds) {
    if (std::isnan(*o.timeout_seconds))
      throw Error(ErrorCode::invalid_argument, "uaa::make_mpi_communicator: timeout_seconds is NaN");
    return *o.timeout_seconds;
  }
  const char* env = std::getenv("UAA_TIMEOUT_SECONDS");
  if (env == nullptr || *env == '\0') return MpiOptions::kDefaultTimeoutSeconds;
  char* end = nullptr;
  const double v = std::strtod(env, &end);
  if (end == env || *end != '\0' || std::isnan(v))
    throw Error(ErrorCode::invalid_argument,
                cat("uaa::make_mpi_communicator: UAA_TIMEOUT_SECONDS='", env,
                    "' is not a number of seconds"));
  return v;
}

// UAA_PEER_READS: unset, empty or 1: peer reads as MpiOptions::peer_reads says; 0: disabled.
bool env_allows_peer_reads() {
  const char* env = std::getenv("UAA_PEER_READS");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "1") == 0) return true;
  if (std::strcmp(env, "0") == 0) return false;
  throw Error(ErrorCode::invalid_argument,
              cat("uaa::make_mpi_communicator: UAA_PEER_READS='", env, "' is not 0 or 1"));
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
  if (__builtin_mul_overflow(s.n0, s.n1, &blocks) || __builtin_mul_overflow(blocks, s.run, &bytes)) {
    why = "n0 * n1 * run overflows 64 bits";
    return false;
  }
  if (bytes > 0 && s.address == 0) {
    why = cat("null address for ", bytes, " bytes");
    return false;
  }
  return true;
}

#if UAA_HAVE_PROCESS_VM_READV
constexpr std::size_t kIovMax = IOV_MAX;

// The segments of one side of a list of reads, in order, as iovecs: runs that touch are one segment.
class IovecStream {
 public:
  IovecStream(std::span<const PeerRead> reads, bool from_side) : reads_(reads), from_(from_side) {}

  // Appends segments to `out` until it holds kIovMax entries or the stream is exhausted.
  void fill(std::vector<iovec>& out) {
    while (out.size() < kIovMax) {
      if (i0_ >= n0_) {
        if (next_ == reads_.size()) return;
        start(from_ ? reads_[next_].from : reads_[next_].to);
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

  std::span<const PeerRead> reads_;
  bool from_;
  std::size_t next_ = 0;
  std::int64_t n0_ = 0, n1_ = 0, run_ = 0, i0_ = 0, i1_ = 0;
  std::uintptr_t block_ = 0, s0_ = 0, s1_ = 0;
};

// Drops the first `n` bytes of an iovec list (the part a process_vm_readv call copied).
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
#endif

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(MPI_Comm comm, const MpiOptions& options) : options_(options) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized)
      throw Error(ErrorCode::invalid_argument, "uaa::make_mpi_communicator: MPI is not initialized");
    if (options_.max_count < 1 || options_.max_count > 2147483647)
      throw Error(ErrorCode::invalid_argument,
                  cat("uaa::make_mpi_communicator: max_count ", options_.max_count,
                      " is outside [1, 2^31-1]"));
    timeout_s_ = resolve_timeout(options_);
    const bool env_peer_reads = env_allows_peer_reads();
    check(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup");
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    decide_peer_reads(options_.peer_reads && env_peer_reads,
                      !options_.peer_reads ? "MpiOptions::peer_reads is false"
                                           : "UAA_PEER_READS=0");
  }

  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;  // too late to free anything; MPI already released it
    // Poisoned: requests of the failed exchange may still be pending on comm_; leave it to MPI.
    if (!poisoned_.empty()) return;
    for (auto& [unit, type] : types_) MPI_Type_free(&type);
    MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* transport() const override { return "mpi"; }

  bool can_read_peers() const override { return peer_reads_; }

  void read_peers(std::span<const PeerRead> reads) override {
    refuse_if_poisoned("read_peers");
    if (!peer_reads_)
      throw Error(ErrorCode::unsupported,
                  cat("uaa mpi: rank ", rank_, ": read_peers (", reads.size(), " read(s)",
                      reads.empty() ? std::string() : cat(", the first from peer ", reads[0].peer),
                      "): peer reads are off on this communicator: ", no_peer_reads_));
    // Every read is checked before anything is written.
    for (std::size_t i = 0; i < reads.size(); ++i) {
      const PeerRead& r = reads[i];
      auto fail = [&](const std::string& what) {
        throw Error(ErrorCode::invalid_argument,
                    cat("uaa mpi: rank ", rank_, ": read_peers: read ", i, " of ", reads.size(),
                        " (peer ", r.peer, "): ", what));
      };
      if (r.peer < 0 || r.peer >= size_)
        fail(cat("peer ", r.peer, " is not a rank of this communicator (size ", size_, ")"));
      std::int64_t from_bytes = 0, to_bytes = 0;
      std::string why;
      if (!region_bytes(r.from, from_bytes, why)) fail(cat("from ", describe(r.from), ": ", why));
      if (!region_bytes(r.to, to_bytes, why)) fail(cat("to ", describe(r.to), ": ", why));
      if (from_bytes != to_bytes)
        fail(cat("from ", describe(r.from), " has ", from_bytes, " bytes but to ", describe(r.to),
                 " has ", to_bytes));
    }
#if UAA_HAVE_PROCESS_VM_READV
    for (std::size_t g = 0; g < reads.size();) {
      std::size_t h = g + 1;
      while (h < reads.size() && reads[h].peer == reads[g].peer) ++h;
      read_group(reads.subspan(g, h - g), g);
      g = h;
    }
#endif
  }

  void allgather(const void* send, std::size_t bytes, void* recv) override {
    refuse_if_poisoned("allgather");
    if (bytes > static_cast<std::size_t>(2147483647))
      throw Error(ErrorCode::invalid_argument,
                  cat("uaa mpi: rank ", rank_, ": allgather of ", bytes, " bytes per rank"));
    std::memmove(static_cast<char*>(recv) + rank_ * bytes, send, bytes);
    if (size_ == 1 || bytes == 0) return;
    clear_requests();
    const int n = static_cast<int>(bytes);
    for (int j = 0; j < size_; ++j) {
      if (j == rank_) continue;
      MPI_Request req;
      check(MPI_Irecv(static_cast<char*>(recv) + j * bytes, n, MPI_BYTE, j, kGatherTag, comm_, &req),
            "MPI_Irecv");
      add_request(req, j, false);
    }
    for (int j = 0; j < size_; ++j) {
      if (j == rank_) continue;
      MPI_Request req;
      check(MPI_Isend(send, n, MPI_BYTE, j, kGatherTag, comm_, &req), "MPI_Isend");
      add_request(req, j, true);
    }
    wait_all({"allgather (", static_cast<std::int64_t>(bytes), " bytes per rank)"});
  }

  void alltoallv(const void* send, std::span<const std::int64_t> sc,
                 std::span<const std::int64_t> sd, void* recv,
                 std::span<const std::int64_t> rc, std::span<const std::int64_t> rd,
                 std::int64_t max_total_bytes) override {
    refuse_if_poisoned("alltoallv");
    const std::int64_t chunk = options_.max_count;
    clear_requests();
    auto post = [&](bool is_send, int peer, std::int64_t bytes, std::int64_t displ) {
      if (bytes == 0) return;
      const std::int64_t unit = std::gcd(std::int64_t{4096}, bytes);
      const MPI_Datatype type = unit_type(unit);
      const std::int64_t units = bytes / unit;
      for (std::int64_t c = 0, at = 0; at < units; ++c, at += chunk) {
        const int n = static_cast<int>(std::min(chunk, units - at));
        const int tag = 1 + static_cast<int>(c % kMaxTag);
        MPI_Request req;
        if (is_send) {
          const char* p = static_cast<const char*>(send) + displ + at * unit;
          check(MPI_Isend(p, n, type, peer, tag, comm_, &req), "MPI_Isend");
        } else {
          char* p = static_cast<char*>(recv) + displ + at * unit;
          check(MPI_Irecv(p, n, type, peer, tag, comm_, &req), "MPI_Irecv");
        }
        add_request(req, peer, is_send);
      }
    };
    for (int j = 0; j < size_; ++j)
      if (j != rank_) post(false, j, rc[j], rd[j]);
    for (int j = 0; j < size_; ++j)
      if (j != rank_) post(true, j, sc[j], sd[j]);
    if (sc[rank_] > 0)
      std::memmove(static_cast<char*>(recv) + rd[rank_],
                   static_cast<const char*>(send) + sd[rank_], static_cast<std::size_t>(sc[rank_]));
    if (!requests_.empty())
      wait_all({"alltoallv (largest buffer ", max_total_bytes, " bytes)"});
  }

 private:
  void check(int rc, const char* what) const {
    if (rc == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, text, &len);
    throw Error(ErrorCode::comm_failure,
                cat("uaa mpi: rank ", rank_, ": ", what, " failed: ", std::string(text, len)));
  }

  MPI_Datatype unit_type(std::int64_t unit) {
    auto it = types_.find(unit);
    if (it != types_.end()) return it->second;
    MPI_Datatype t;
    check(MPI_Type_contiguous(static_cast<int>(unit), MPI_BYTE, &t), "MPI_Type_contiguous");
    check(MPI_Type_commit(&t), "MPI_Type_commit");
    types_.emplace(unit, t);
    return t;
  }

  // Collective (constructor): sets peer_reads_ identically on every rank, else no_peer_reads_.
  void decide_peer_reads(bool allowed_here, const char* why_not_here) {
#if !UAA_HAVE_PROCESS_VM_READV
    if (allowed_here) why_not_here = "this OS has no process_vm_readv (Linux only)";
    allowed_here = false;
#endif
    const int mine = allowed_here ? 1 : 0;
    int all = 0;
    check(MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_LAND, comm_), "MPI_Allreduce");
    if (!all) {
      no_peer_reads_ = allowed_here
                           ? "disabled on another rank (MpiOptions::peer_reads or UAA_PEER_READS)"
                           : why_not_here;
      return;
    }
#if UAA_HAVE_PROCESS_VM_READV
    MPI_Comm node = MPI_COMM_NULL;
    check(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node),
          "MPI_Comm_split_type");
    int node_size = 0;
    MPI_Comm_size(node, &node_size);
    MPI_Comm_free(&node);
    if (node_size != size_) {  // then every rank's node holds fewer than size_ ranks
      no_peer_reads_ = cat("the ranks span more than one node (", node_size, " of ", size_,
                           " share rank ", rank_, "'s node)");
      return;
    }
    allow_sibling_reads();
    struct Probe {
      std::int64_t pid;
      std::uint64_t address, value;
    };
    const pid_t pid = getpid();
    probe_ = 0x7561612d70656572ull ^ (static_cast<std::uint64_t>(pid) << 20) ^
             static_cast<std::uint64_t>(rank_);
    const Probe me{pid, reinterpret_cast<std::uintptr_t>(&probe_), probe_};
    std::vector<Probe> probes(static_cast<std::size_t>(size_));
    check(MPI_Allgather(&me, sizeof(Probe), MPI_BYTE, probes.data(), sizeof(Probe), MPI_BYTE,
                        comm_),
          "MPI_Allgather");
    int ok = 1;
    std::string failure;
    for (int j = 0; j < size_ && ok; ++j) {
      const Probe& p = probes[static_cast<std::size_t>(j)];
      std::uint64_t got = 0;
      iovec local{&got, sizeof got}, remote{reinterpret_cast<void*>(p.address), sizeof got};
      ssize_t n;
      do n = process_vm_readv(static_cast<pid_t>(p.pid), &local, 1, &remote, 1, 0);
      while (n < 0 && errno == EINTR);
      if (n != static_cast<ssize_t>(sizeof got)) {
        ok = 0;
        failure = cat("rank ", rank_, " could not read rank ", j, " (pid ", p.pid, "): ",
                      n < 0 ? std::strerror(errno) : "short read");
      } else if (got != p.value) {
        ok = 0;
        failure = cat("rank ", rank_, " read a wrong value from rank ", j, " (pid ", p.pid,
                      "; ranks in different PID namespaces?)");
      }
    }
    int verdict = 0;  // also keeps every probe_ alive until every rank has read it
    check(MPI_Allreduce(&ok, &verdict, 1, MPI_INT, MPI_LAND, comm_), "MPI_Allreduce");
    if (!verdict) {
      no_peer_reads_ = ok ? std::string("the probe read failed on another rank")
                          : cat("the probe read failed: ", failure);
      return;
    }
    pids_.resize(static_cast<std::size_t>(size_));
    for (int j = 0; j < size_; ++j)
      pids_[static_cast<std::size_t>(j)] = static_cast<pid_t>(probes[static_cast<std::size_t>(j)].pid);
    peer_reads_ = true;
#endif
  }

#if UAA_HAVE_PROCESS_VM_READV
  // Copies validated reads, all from one peer, with as few process_vm_readv calls as IOV_MAX allows.
  void read_group(std::span<const PeerRead> reads, std::size_t first_index) {
    const int peer = reads[0].peer;
    if (local_.capacity() < kIovMax) {
      local_.reserve(kIovMax);
      remote_.reserve(kIovMax);
    }
    local_.clear();
    remote_.clear();
    IovecStream to(reads, false), from(reads, true);
    std::uint64_t copied = 0;
    for (;;) {
      to.fill(local_);
      from.fill(remote_);
      if (local_.empty() || remote_.empty()) break;  // both, since both sides have equal bytes
      const ssize_t n = process_vm_readv(pids_[static_cast<std::size_t>(peer)], local_.data(),
                                         local_.size(), remote_.data(), remote_.size(), 0);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        const int err = n < 0 ? errno : EFAULT;
        std::uint64_t total = 0;
        for (const PeerRead& r : reads) total += static_cast<std::uint64_t>(r.from.bytes());
        throw Error(ErrorCode::comm_failure,
                    cat("uaa mpi: rank ", rank_, ": read_peers: reading peer ", peer, " (pid ",
                        pids_[static_cast<std::size_t>(peer)], ") failed in read(s) ", first_index,
                        "..", first_index + reads.size() - 1, " after ", copied, " of ", total,
                        " bytes: process_vm_readv: ", std::strerror(err)));
      }
      copied += static_cast<std::uint64_t>(n);
      consume(local_, static_cast<std::size_t>(n));
      consume(remote_, static_cast<std::size_t>(n));
    }
  }
#endif

  void refuse_if_poisoned(const char* what) const {
    if (!poisoned_.empty())
      throw Error(ErrorCode::comm_failure,
                  cat("uaa mpi: rank ", rank_, ": ", what,
                      " refused: this communicator is unusable since an earlier exchange timed out (",
                      poisoned_, "); abort the job (MPI_Abort) or build a new communicator"));
  }

  void clear_requests() {
    requests_.clear();
    request_peer_.clear();
  }
  void add_request(MPI_Request r, int peer, bool is_send) {
    requests_.push_back(r);
    request_peer_.push_back(is_send ? -1 - peer : peer);
  }

  // What an exchange was, for the timeout message only: formatted when it fails, never per call.
  struct Operation {
    const char* before;
    std::int64_t bytes;
    const char* after;
    std::string text() const { return cat(before, bytes, after); }
  };

  // Completes every request in requests_, or throws ErrorCode::timeout when the deadline passes.
  void wait_all(const Operation& op) {
    const int n = static_cast<int>(requests_.size());
    if (n == 0) return;
    if (!(timeout_s_ > 0) || std::isinf(timeout_s_)) {
      check(MPI_Waitall(n, requests_.data(), MPI_STATUSES_IGNORE), "MPI_Waitall");
      return;
    }
    indices_.resize(n);
    const Clock::time_point start = Clock::now();
    const auto deadline = start + std::chrono::duration_cast<Clock::duration>(
                                      std::chrono::duration<double>(timeout_s_));
    int left = n;
    for (;;) {
      int done = 0;
      check(MPI_Testsome(n, requests_.data(), &done, indices_.data(), MPI_STATUSES_IGNORE),
            "MPI_Testsome");
      if (done != MPI_UNDEFINED) left -= done;
      if (left == 0 || done == MPI_UNDEFINED) return;
      const Clock::time_point now = Clock::now();
      if (now >= deadline) break;
      const auto waited = now - start;
      if (waited > std::chrono::milliseconds(20))
        std::this_thread::sleep_for(std::chrono::microseconds(100));
      else if (waited > std::chrono::microseconds(100))
        std::this_thread::yield();
    }
    timed_out(op.text());
  }

  [[noreturn]] void timed_out(const std::string& what) {
    std::vector<int> no_data, not_taken;  // peers whose message to us / from us is incomplete
    for (std::size_t i = 0; i < requests_.size(); ++i) {
      if (requests_[i] == MPI_REQUEST_NULL) continue;
      std::vector<int>& list = request_peer_[i] >= 0 ? no_data : not_taken;
      const int peer = request_peer_[i] >= 0 ? request_peer_[i] : -1 - request_peer_[i];
      if (list.empty() || list.back() != peer) list.push_back(peer);
      // An unmatched receive cancels cleanly (nothing will be written into the caller's buffer);
      // anything else is left to MPI, which is why the communicator is poisoned from here on.
      if (request_peer_[i] >= 0) {
        MPI_Cancel(&requests_[i]);
        int flag = 0;
        MPI_Test(&requests_[i], &flag, MPI_STATUS_IGNORE);
      }
      if (requests_[i] != MPI_REQUEST_NULL) MPI_Request_free(&requests_[i]);
    }
    auto list_text = [](const std::vector<int>& v) {
      std::string t;
      for (std::size_t i = 0; i < v.size(); ++i) t += cat(i ? ", " : "", v[i]);
      return t;
    };
    std::string msg = cat("uaa mpi: rank ", rank_, ": ", what, " timed out after ", timeout_s_,
                          " s: ");
    if (!no_data.empty()) msg += cat("no data from rank(s) ", list_text(no_data));
    if (!not_taken.empty())
      msg += cat(no_data.empty() ? "" : "; ", "rank(s) ", list_text(not_taken),
                 " did not take this rank's data");
    msg += " (they never joined this exchange: crashed, skipped a call, or are blocked in another)";
    poisoned_ = cat(what, " timed out on rank ", rank_);
    throw Error(ErrorCode::timeout,
                msg + "; this communicator is now unusable (UAA_TIMEOUT_SECONDS sets the deadline)");
  }

  MpiOptions options_;
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  std::map<std::int64_t, MPI_Datatype> types_;
  double timeout_s_ = MpiOptions::kDefaultTimeoutSeconds;  // <= 0 or inf: no deadline
  std::string poisoned_;  // why this communicator refuses further use; empty while usable
  std::vector<MPI_Request> requests_;
  std::vector<int> request_peer_;  // peer of requests_[i]: j for a receive, -1 - j for a send
  std::vector<int> indices_;
  bool peer_reads_ = false;    // identical on every rank
  std::string no_peer_reads_;  // why peer_reads_ is false
#if UAA_HAVE_PROCESS_VM_READV
  std::uint64_t probe_ = 0;          // read by every rank at construction
  std::vector<pid_t> pids_;          // by rank, when peer_reads_
  std::vector<iovec> local_, remote_;  // read_peers' iovec windows, kept across calls
#endif
};

}  // namespace

std::shared_ptr<Communicator> make_mpi_communicator(MPI_Comm comm, const MpiOptions& options) {
  return std::make_shared<MpiCommunicator>(comm, options);
}

}  // namespace uaa
