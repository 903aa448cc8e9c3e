// The subcommands of the `uaa` tool. Each one is `int name_main(int argc, char** argv)`, called with
// argv[0] = the subcommand's name and the rest of the command line after it; it owns MPI (init and
// finalize) if it needs it, and returns the process exit status.
#pragma once

namespace uaa::cli {

int run_main(int argc, char** argv);   // uaa run: sequence-parallel attention under mpirun
int plan_main(int argc, char** argv);  // uaa plan: the cost model of the strategies, no MPI

}  // namespace uaa::cli
