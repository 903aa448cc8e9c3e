// uaa/error.h — the one error mechanism of uaa: exceptions of type uaa::Error.
//
// Every public function either succeeds or throws uaa::Error. An error never leaves the caller's
// output buffers half written: all checks run before anything is written. Collective operations
// (Plan::create, forward) raise the *same* error on every rank of the communicator: a rank that finds
// bad input still takes part in the data exchange and tells its peers, so no rank is left waiting.
//
//   try {
//     uaa::forward(*comm, plan, args, ws);
//   } catch (const uaa::Error& e) {
//     if (e.code() == uaa::ErrorCode::invalid_argument) { /* fix the call */ }
//     std::fprintf(stderr, "%s\n", e.what());   // "rank 2: forward: q.tokens 17 vs plan 16"
//   }
#pragma once

#include <stdexcept>
#include <string>

namespace uaa {

enum class ErrorCode {
  invalid_argument,  // a value the caller passed is out of range or inconsistent with the plan
  mismatch,          // ranks disagree (shape, options, plan, call sequence)
  unsupported,       // valid request this build or kernel cannot serve (e.g. a dtype it lacks)
  comm_failure,      // the transport reported an error
  timeout,           // a peer did not arrive in time
  internal,          // a bug in uaa: please report
  out_of_memory,     // a rank could not allocate what the call needs (its workspace)
};

const char* error_code_name(ErrorCode code);

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

}  // namespace uaa
