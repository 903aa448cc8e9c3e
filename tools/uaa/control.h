// How `uaa run` keeps its ranks together: every step that may fail on some ranks only ends with an
// agreement on the library's control plane (src/comm/control_plane.h, VoteKind::tool), so every
// rank either goes on or raises the same error; every wait is under the communicator's deadline.
//
//   ToolControl ctl(*comm);
//   ctl.local_step("read inputs", [&] { ... may throw ... });   // AgreedError on every rank
//
// Errors:
//   AgreedError  the same on every rank (an agreement's verdict, or a library collective's error):
//                rank 0 prints it once, every rank exits with status 2.
//   fatal        this rank cannot go on and its peers may be left waiting (a deadline passed, a
//                transport failed, the communicator is poisoned, an unexpected local error): the
//                rank prints it itself, prefixed "rank N:", and aborts the job at once (MPI_Abort,
//                status 2), never MPI_Finalize (which would wait for a stuck peer) and without
//                unwinding (MPI may still own the buffers of the failed call).
#pragma once

#include <mpi.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <new>
#include <optional>
#include <string>
#include <string_view>
#include <thread>

#include "comm/control_plane.h"
#include "text.h"
#include "uaa/communicator.h"
#include "uaa/error.h"

namespace uaa::cli {

struct AgreedError {
  ErrorCode code = ErrorCode::invalid_argument;
  std::string message;  // names the failing rank
};

// Prints "uaa run: rank N: <message>" and aborts the whole job.
[[noreturn]] inline void abort_job(const std::string& message) {
  int rank = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  std::fflush(stdout);
  std::fprintf(stderr, "uaa run: rank %d: %s\n", rank, message.c_str());
  std::fflush(stderr);
  // Give the launcher a moment to forward the line: MPICH's kills the job at once and may drop
  // output still in the pipe.
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  MPI_Abort(MPI_COMM_WORLD, 2);
  std::_Exit(2);
}

inline std::uint64_t fnv1a(std::string_view s, std::uint64_t h = 1469598103934665603ull) {
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

// Timeouts and transport failures may have reached some ranks only, and leave the communicator
// poisoned: fatal. Every other error of a library collective is agreed (the same on every rank).
inline bool is_transport_failure(ErrorCode c) {
  return c == ErrorCode::timeout || c == ErrorCode::comm_failure;
}

// Runs a library collective (Plan::create, forward, make_mpi_communicator, exchange, allgather).
// `step` names what the command was doing, for a transport failure's report.
template <typename F>
auto collective(F&& f, const char* step = nullptr) -> decltype(f()) {
  try {
    return f();
  } catch (const Error& e) {
    if (is_transport_failure(e.code())) abort_job(step ? cat(step, ": ", e.what()) : std::string(e.what()));
    throw AgreedError{e.code(), e.what()};
  }
}

class ToolControl {
 public:
  explicit ToolControl(Communicator& comm) : comm_(comm), cp_(&detail::control_plane(comm)) {}

  Communicator& comm() { return comm_; }
  int rank() const { return comm_.rank(); }
  int size() const { return comm_.size(); }

  // One agreement of the step `step`. `reason` is empty when this rank is fine, else what went
  // wrong here (the message becomes "rank N: <reason>"). `flags` are OR-combined over ranks.
  // `fingerprint` (default: a hash of `step`) must be equal on every rank unless
  // `check_fingerprints` is false. Throws AgreedError when a rank failed or the ranks are not in
  // the same step; aborts the job on a transport failure (a deadline passed).
  detail::Verdict agree(const char* step, const std::string& reason,
                        ErrorCode code = ErrorCode::invalid_argument, std::uint16_t flags = 0,
                        std::optional<std::uint64_t> fingerprint = std::nullopt,
                        bool check_fingerprints = true) {
    detail::Vote v;
    v.kind = detail::VoteKind::tool;
    v.flags = flags;
    v.fingerprint = fingerprint ? *fingerprint : fnv1a(step);
    if (!reason.empty()) {
      v.failed = true;
      v.code = code;
      v.message = cat("rank ", rank(), ": ", reason);
      v.fingerprint = fnv1a(reason, 7);  // equal on every rank iff every rank failed alike
    }
    const detail::Verdict r = collective([&] { return cp_->agree(v); }, step);
    if (r.kind_min != r.kind_max || r.sequence_min != r.sequence_max)
      throw AgreedError{ErrorCode::mismatch,
                        cat("uaa run: ranks are out of step at '", step, "' (rank ",
                            r.sequence_max_rank, " is at agreement ", r.sequence_max,
                            ", another rank at ", r.sequence_min, "; operations ",
                            detail::vote_kind_name(static_cast<detail::VoteKind>(r.kind_min)), "/",
                            detail::vote_kind_name(static_cast<detail::VoteKind>(r.kind_max)),
                            "): a bug of uaa run, please report it")};
    if (r.failed_count > 0) {
      std::string msg = r.message;
      const bool all_alike = r.failed_count == size() && r.fingerprint_min == r.fingerprint_max;
      if (r.failed_count > 1 && !all_alike)
        msg += cat(" (and ", r.failed_count - 1, " more rank(s) failed)");
      throw AgreedError{r.code, msg};
    }
    if (check_fingerprints && r.fingerprint_min != r.fingerprint_max)
      throw AgreedError{ErrorCode::internal,
                        cat("uaa run: ranks are at different steps ('", step, "' on some, rank ",
                            r.fingerprint_max_rank, " elsewhere): a bug of uaa run, please report it")};
    return r;
  }

  // Runs this rank's part of a step, then agrees on the outcome: an exception here becomes this
  // rank's failed vote (its message reaches every rank). `flags` (read after f) are voted when
  // given. Returns the verdict.
  template <typename F>
  detail::Verdict local_step(const char* step, F&& f, const std::uint16_t* flags = nullptr) {
    std::string reason;
    ErrorCode code = ErrorCode::invalid_argument;
    try {
      f();
    } catch (const AgreedError&) {
      throw;
    } catch (const Error& e) {
      reason = e.what();
      code = e.code();
    } catch (const std::bad_alloc&) {
      reason = cat(step, ": out of memory (an allocation failed)");
      code = ErrorCode::out_of_memory;
    } catch (const std::exception& e) {
      reason = e.what();
    } catch (...) {
      reason = cat(step, ": unknown error");
      code = ErrorCode::internal;
    }
    if (!reason.empty() && reason.find_first_not_of(' ') == std::string::npos) reason = "error";
    return agree(step, reason, code, flags ? *flags : 0);
  }

 private:
  Communicator& comm_;
  detail::ControlPlane* cp_;
};

}  // namespace uaa::cli
