// The `uaa` command: a table of subcommands. Add one by writing `int name_main(int, char**)` and a
// row in kCommands; it receives argv[0] = its name and the arguments after it.
#include <cstdio>
#include <cstring>

#include "bench_docs.h"
#include "bench_strategies.h"
#include "commands.h"
#ifdef UAA_HAVE_BENCH
#include "bench_kernel.h"
#endif

#ifndef UAA_VERSION
#define UAA_VERSION "unknown"
#endif

namespace {

// uaa bench kernel ...: the kernel benchmark (bench/, built when OpenBLAS is available);
// uaa bench docs ...: packed documents against one call per document, under mpirun
// (bench/bench_docs.cpp);
// uaa bench [--strategies ...]: the strategy benchmark under mpirun (bench/bench_strategies.cpp).
int bench_main(int argc, char** argv) {
  if (argc >= 2 && std::strcmp(argv[1], "docs") == 0) return bench_docs_main(argc - 1, argv + 1);
  if (argc >= 2 && std::strcmp(argv[1], "kernel") == 0) {
#ifdef UAA_HAVE_BENCH
    return bench_kernel_main(argc - 1, argv + 1);
#else
    std::fprintf(stderr, "uaa bench kernel: not built (OpenBLAS was not found)\n");
    return 2;
#endif
  }
  return bench_strategies_main(argc, argv);
}

struct Command {
  const char* name;
  int (*main)(int argc, char** argv);
  const char* summary;
};

constexpr Command kCommands[] = {
    {"run", uaa::cli::run_main, "sequence-parallel attention over MPI ranks (under mpirun)"},
    {"bench", bench_main,
     "compare the strategies under mpirun (`uaa bench --preset flux`); `uaa bench docs`: packed\n"
     "           documents vs one call each; `uaa bench kernel`: the kernel"},
    {"plan", uaa::cli::plan_main, "cost model of the strategies at any rank count (no MPI)"},
};

void usage(std::FILE* to) {
  std::fprintf(to,
               "usage: uaa <command> [options]\n"
               "       uaa --help | --version\n\n"
               "Ulysses Anything Attention: sequence-parallel attention for any sequence length and\n"
               "any head count, with no padding.\n\ncommands:\n");
  for (const Command& c : kCommands) std::fprintf(to, "  %-8s %s\n", c.name, c.summary);
  std::fprintf(to, "\n'uaa <command> --help' describes a command.\n");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    usage(stderr);
    return 2;
  }
  const char* name = argv[1];
  if (std::strcmp(name, "--help") == 0 || std::strcmp(name, "-h") == 0 ||
      std::strcmp(name, "help") == 0) {
    usage(stdout);
    return 0;
  }
  if (std::strcmp(name, "--version") == 0) {
    std::printf("uaa %s\n", UAA_VERSION);
    return 0;
  }
  for (const Command& c : kCommands)
    if (std::strcmp(name, c.name) == 0) return c.main(argc - 1, argv + 1);
  std::fprintf(stderr, "uaa: unknown command '%s'; commands:", name);
  for (const Command& c : kCommands) std::fprintf(stderr, " %s", c.name);
  std::fprintf(stderr, " (see uaa --help)\n");
  return 2;
}
