// Thread count of the attention kernels (see include/uaa/threads.h for the policy).
#include "uaa/threads.h"

#include <sched.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <thread>

#include "uaa/error.h"

namespace uaa {
namespace {

std::atomic<int> g_threads{0};  // 0: not set by the caller

int env_int(const char* name) {
  const char* s = std::getenv(name);
  if (!s || !*s) return 0;
  char* end = nullptr;
  const long v = std::strtol(s, &end, 10);
  return (*end == '\0' && v > 0 && v < 1 << 16) ? static_cast<int>(v) : 0;
}

// Several ranks per node each starting one thread per core would oversubscribe the node, and an
// oversubscribed rank slows every collective it takes part in; so divide the node among the ranks.
int default_threads() {
  int affinity = 0;
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) affinity = CPU_COUNT(&set);
  const int node = static_cast<int>(std::thread::hardware_concurrency());
  if (affinity <= 0) affinity = node > 0 ? node : 1;
  int local_ranks = env_int("OMPI_COMM_WORLD_LOCAL_SIZE");
  if (!local_ranks) local_ranks = env_int("MPI_LOCALNRANKS");
  if (!local_ranks) local_ranks = env_int("SLURM_NTASKS_PER_NODE");
  int n = affinity;
  if (local_ranks > 0 && node > 0 && node / local_ranks < n) n = node / local_ranks;
  return n < 1 ? 1 : n;
}

int configured_default() {
  static const int n = [] {
    const int env = env_int("UAA_NUM_THREADS");
    if (const char* s = std::getenv("UAA_NUM_THREADS"); s && *s && env == 0)
      throw Error(ErrorCode::invalid_argument,
                  std::string("UAA_NUM_THREADS=") + s + " is not a positive integer");
    return env > 0 ? env : default_threads();
  }();
  return n;
}

}  // namespace

void set_num_threads(int n) {
  if (n < 0)
    throw Error(ErrorCode::invalid_argument,
                "uaa::set_num_threads: n = " + std::to_string(n) + " must be >= 0");
  g_threads.store(n, std::memory_order_relaxed);
}

int num_threads() {
  const int n = g_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : configured_default();
}

}  // namespace uaa
