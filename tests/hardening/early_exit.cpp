// A rank that really exits early: it finalizes MPI and leaves main() with status 0 before the
// others call forward(). The others must get ErrorCode::timeout within the deadline, naming it.
// (Open MPI's mpirun would kill the job if the process exited non-zero or without MPI_Finalize; a
// crash is the same story seen from the survivors, but mpirun ends the job before they could tell.)
// Exit status 0 iff every surviving rank saw the expected error. Without deadlines: hangs.
#include <mpi.h>

#include <cstdio>
#include <string>

#include "hardening/hardening_util.h"
#include "uaa/error.h"
#include "uaa/mpi.h"

int main(int argc, char** argv) {
  using namespace uaa;
  using namespace uaa::test;
  MPI_Init(&argc, &argv);
  int me = 0, P = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &me);
  MPI_Comm_size(MPI_COMM_WORLD, &P);
  if (P < 2) {
    std::printf("early_exit: needs 2 ranks, skipped\n");
    MPI_Finalize();
    return 0;
  }
  const int leaver = P - 1;
  const double deadline = test_deadline();
  int failures = 0;
  {
    MpiOptions o;
    o.timeout_seconds = deadline;
    auto comm = make_mpi_communicator(MPI_COMM_WORLD, o);
    const Plan plan = Plan::create(*comm, small_shape(), small_lens(P)[me], small_lens(P)[me]);
    RankCall call(plan);
    Workspace ws;
    forward(plan, call.args, ws);  // one call together
    if (me == leaver) {
      std::printf("rank %d: leaving early\n", me);
      std::fflush(stdout);
    } else {
      const auto t0 = SteadyClock::now();
      try {
        forward(plan, call.args, ws);
        std::fprintf(stderr, "rank %d: FAIL: forward succeeded without rank %d\n", me, leaver);
        ++failures;
      } catch (const Error& e) {
        const double s = seconds_since(t0);
        const std::string what = e.what();
        // 0.9: the first rank to time out tells the others (failure notice), maybe just before
        // their own deadline.
        const bool ok = e.code() == ErrorCode::timeout && s >= deadline * 0.9 &&
                        s < deadline + 5.0 &&
                        what.find("no data from rank(s) " + std::to_string(leaver)) !=
                            std::string::npos;
        std::fprintf(ok ? stdout : stderr, "rank %d: %s after %.2f s: %s [%s]\n", me,
                     ok ? "ok" : "FAIL", s, error_code_name(e.code()), e.what());
        failures += ok ? 0 : 1;
      }
    }
  }  // the communicator is destroyed before MPI_Finalize (poisoned ones leave their MPI_Comm)
  MPI_Finalize();
  return failures == 0 ? 0 : 1;
}
