// MPI transport: a duplicated communicator with MPI_ERRORS_RETURN, 64-bit uneven exchange.
//
// Strategy by size class, chosen from `max_total_bytes` (identical on every rank, so every rank picks
// the same one): when no rank's buffer exceeds max_count bytes, one MPI_Alltoallv whose element is
// the largest byte unit (up to 4 KiB) dividing this rank's counts and displacements; otherwise
// point-to-point messages of at most max_count elements, the element of each pair's message being
// gcd(4096, its byte count) — a number sender and receiver derive alike, so they cut the message
// at the same places.
#include <cstring>
#include <map>
#include <numeric>
#include <vector>

#include "common/strings.h"
#include "uaa/error.h"
#include "uaa/mpi.h"

namespace uaa {
namespace {

using detail::cat;

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
    check(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup");
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }

  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;  // too late to free anything; MPI already released it
    for (auto& [unit, type] : types_) MPI_Type_free(&type);
    MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* transport() const override { return "mpi"; }

  void allgather(const void* send, std::size_t bytes, void* recv) override {
    if (bytes > static_cast<std::size_t>(2147483647))
      throw Error(ErrorCode::invalid_argument,
                  cat("uaa mpi: rank ", rank_, ": allgather of ", bytes, " bytes per rank"));
    check(MPI_Allgather(send, static_cast<int>(bytes), MPI_BYTE, recv, static_cast<int>(bytes),
                        MPI_BYTE, comm_),
          "MPI_Allgather");
  }

  void alltoallv(const void* send, std::span<const std::int64_t> send_counts,
                 std::span<const std::int64_t> send_displs, void* recv,
                 std::span<const std::int64_t> recv_counts,
                 std::span<const std::int64_t> recv_displs,
                 std::int64_t max_total_bytes) override {
    if (max_total_bytes <= options_.max_count) {
      std::int64_t unit = 4096;
      for (auto* side : {&send_counts, &send_displs, &recv_counts, &recv_displs})
        for (std::int64_t v : *side) unit = std::gcd(unit, v);
      exchange_collective(send, send_counts, send_displs, recv, recv_counts, recv_displs, unit);
    } else {
      exchange_chunked(send, send_counts, send_displs, recv, recv_counts, recv_displs);
    }
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

  void exchange_collective(const void* send, std::span<const std::int64_t> sc,
                           std::span<const std::int64_t> sd, void* recv,
                           std::span<const std::int64_t> rc, std::span<const std::int64_t> rd,
                           std::int64_t unit) {
    const MPI_Datatype type = unit_type(unit);
    ints_.resize(4 * size_);
    int* isc = ints_.data();
    int* isd = isc + size_;
    int* irc = isd + size_;
    int* ird = irc + size_;
    for (int j = 0; j < size_; ++j) {
      isc[j] = static_cast<int>(sc[j] / unit);
      isd[j] = static_cast<int>(sd[j] / unit);
      irc[j] = static_cast<int>(rc[j] / unit);
      ird[j] = static_cast<int>(rd[j] / unit);
    }
    check(MPI_Alltoallv(send, isc, isd, type, recv, irc, ird, type, comm_), "MPI_Alltoallv");
  }

  // Every peer pair exchanges ceil(count / (max_count units)) messages, tagged by chunk index.
  void exchange_chunked(const void* send, std::span<const std::int64_t> sc,
                        std::span<const std::int64_t> sd, void* recv,
                        std::span<const std::int64_t> rc, std::span<const std::int64_t> rd) {
    const std::int64_t chunk = options_.max_count;
    requests_.clear();
    auto post = [&](bool is_send, int peer, std::int64_t bytes, std::int64_t displ) {
      if (bytes == 0) return;
      const std::int64_t unit = std::gcd(std::int64_t{4096}, bytes);
      const MPI_Datatype type = unit_type(unit);
      const std::int64_t units = bytes / unit;
      for (std::int64_t c = 0, at = 0; at < units; ++c, at += chunk) {
        const int n = static_cast<int>(std::min(chunk, units - at));
        const int tag = static_cast<int>(c % 32768);
        MPI_Request req;
        if (is_send) {
          const char* p = static_cast<const char*>(send) + displ + at * unit;
          check(MPI_Isend(p, n, type, peer, tag, comm_, &req), "MPI_Isend");
        } else {
          char* p = static_cast<char*>(recv) + displ + at * unit;
          check(MPI_Irecv(p, n, type, peer, tag, comm_, &req), "MPI_Irecv");
        }
        requests_.push_back(req);
      }
    };
    for (int j = 0; j < size_; ++j)
      if (j != rank_) post(false, j, rc[j], rd[j]);
    for (int j = 0; j < size_; ++j)
      if (j != rank_) post(true, j, sc[j], sd[j]);
    if (sc[rank_] > 0)
      std::memmove(static_cast<char*>(recv) + rd[rank_],
                   static_cast<const char*>(send) + sd[rank_], static_cast<std::size_t>(sc[rank_]));
    check(MPI_Waitall(static_cast<int>(requests_.size()), requests_.data(), MPI_STATUSES_IGNORE),
          "MPI_Waitall");
  }

  MpiOptions options_;
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  std::map<std::int64_t, MPI_Datatype> types_;
  std::vector<int> ints_;
  std::vector<MPI_Request> requests_;
};

}  // namespace

std::shared_ptr<Communicator> make_mpi_communicator(MPI_Comm comm, const MpiOptions& options) {
  return std::make_shared<MpiCommunicator>(comm, options);
}

}  // namespace uaa
