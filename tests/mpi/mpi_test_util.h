// Helpers for multi-rank tests: world rank/size, gathering values from every rank, and checking that
// a collective failed the same way everywhere.
//
// Rule for tests that use these: every rank makes every collective call unconditionally; outcomes are
// captured (never thrown past the test body) and asserted afterwards with EXPECT_*, so that one
// rank's failure cannot leave the others waiting in a collective.
#pragma once

#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdint>
#include <exception>
#include <string>
#include <vector>

#include "uaa/error.h"

namespace uaa::test {

inline int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

inline int world_size() {
  int n = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

// Every rank's string, ordered by rank.
inline std::vector<std::string> allgather_strings(const std::string& mine) {
  const int P = world_size();
  int len = static_cast<int>(mine.size());
  std::vector<int> lens(P), displs(P, 0);
  MPI_Allgather(&len, 1, MPI_INT, lens.data(), 1, MPI_INT, MPI_COMM_WORLD);
  int total = 0;
  for (int j = 0; j < P; ++j) {
    displs[j] = total;
    total += lens[j];
  }
  std::string all(static_cast<std::size_t>(total), '\0');
  MPI_Allgatherv(mine.data(), len, MPI_CHAR, all.data(), lens.data(), displs.data(), MPI_CHAR,
                 MPI_COMM_WORLD);
  std::vector<std::string> out;
  for (int j = 0; j < P; ++j) out.push_back(all.substr(displs[j], lens[j]));
  return out;
}

inline double allreduce_max(double v) {
  double r = 0;
  MPI_Allreduce(&v, &r, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return r;
}

inline bool allreduce_and(bool v) {
  int in = v ? 1 : 0, out = 0;
  MPI_Allreduce(&in, &out, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  return out != 0;
}

// What a call did: returned, threw uaa::Error, or threw something else.
struct Outcome {
  enum Kind { ok, uaa_error, other_exception } kind = ok;
  ErrorCode code = ErrorCode::internal;
  std::string message;

  std::string str() const {
    if (kind == ok) return "returned normally";
    if (kind == other_exception) return "threw a non-uaa exception: " + message;
    return std::string("threw uaa::Error ") + error_code_name(code) + ": " + message;
  }
};

template <typename F>
Outcome capture(F&& fn) {
  Outcome o;
  try {
    fn();
  } catch (const uaa::Error& e) {
    o.kind = Outcome::uaa_error;
    o.code = e.code();
    o.message = e.what();
  } catch (const std::exception& e) {
    o.kind = Outcome::other_exception;
    o.message = e.what();
  }
  return o;
}

// Collective. Expects that every rank threw uaa::Error `code` with the same message, naming
// "rank <bad_rank>" (skipped when bad_rank < 0) and containing every needle.
inline void expect_same_error_everywhere(const Outcome& o, ErrorCode code, int bad_rank,
                                         const std::vector<std::string>& needles) {
  const std::vector<std::string> all =
      allgather_strings(std::to_string(static_cast<int>(o.kind)) + "|" +
                        std::to_string(static_cast<int>(o.code)) + "|" + o.message);
  const int me = world_rank();
  EXPECT_EQ(o.kind, Outcome::uaa_error) << "rank " << me << " " << o.str();
  EXPECT_EQ(o.code, code) << "rank " << me << " expected " << error_code_name(code) << ", "
                          << o.str();
  if (bad_rank >= 0) {
    const std::string who = "rank " + std::to_string(bad_rank);
    EXPECT_NE(o.message.find(who), std::string::npos)
        << "message does not name " << who << ": " << o.message;
  }
  for (const std::string& n : needles)
    EXPECT_NE(o.message.find(n), std::string::npos)
        << "message does not contain \"" << n << "\": " << o.message;
  if (me == 0) {
    for (std::size_t j = 1; j < all.size(); ++j)
      EXPECT_EQ(all[j], all[0]) << "rank " << j << " failed differently from rank 0";
  }
}

// Collective. Expects that every rank returned normally.
inline void expect_ok_everywhere(const Outcome& o) {
  const bool all_ok = allreduce_and(o.kind == Outcome::ok);
  EXPECT_EQ(o.kind, Outcome::ok) << "rank " << world_rank() << " " << o.str();
  if (world_rank() == 0) {
    EXPECT_TRUE(all_ok) << "some rank failed (see its report)";
  }
}

}  // namespace uaa::test
