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
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <numeric>
#include <thread>
#include <vector>

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
    check(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup");
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
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
};

}  // namespace

std::shared_ptr<Communicator> make_mpi_communicator(MPI_Comm comm, const MpiOptions& options) {
  return std::make_shared<MpiCommunicator>(comm, options);
}

}  // namespace uaa
