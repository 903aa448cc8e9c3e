// hello_uaa: every rank holds a different number of tokens (no padding anywhere); uaa runs
// sequence-parallel attention over all of them. Run: mpirun -np 3 ./hello_uaa
#include <mpi.h>

#include <cmath>
#include <cstdio>
#include <vector>

#include "uaa/mpi.h"
#include "uaa/uaa.h"

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int status = 0;
  {
    std::shared_ptr<uaa::Communicator> comm = uaa::make_mpi_communicator(MPI_COMM_WORLD);
    const int rank = comm->rank();

    // 30 query heads, GQA with 10 key/value heads, causal; this rank holds 100 + 37 * rank tokens.
    uaa::AttentionShape shape{.q_heads = 30, .kv_heads = 10, .head_dim = 64, .causal = true};
    const std::int64_t tokens = 100 + 37 * rank;

    std::vector<float> q(tokens * 30 * 64), k(tokens * 10 * 64), v(tokens * 10 * 64);
    std::vector<float> out(tokens * 30 * 64);
    for (std::size_t i = 0; i < q.size(); ++i) q[i] = std::sin(0.001f * i + rank);
    for (std::size_t i = 0; i < k.size(); ++i) k[i] = std::cos(0.002f * i + rank);
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = std::sin(0.003f * i - rank);

    try {
      // Once per layout (collective: one small all-gather). Reuse for every layer and step.
      uaa::Plan plan = uaa::Plan::create(*comm, shape, tokens, tokens);
      uaa::Workspace ws;

      uaa::AttentionArgs args;
      args.q = uaa::contiguous(q.data(), tokens, 30, 64);  // [tokens][heads][head_dim]
      args.k = uaa::contiguous(k.data(), tokens, 10, 64);
      args.v = uaa::contiguous(v.data(), tokens, 10, 64);
      args.out = uaa::contiguous(out.data(), tokens, 30, 64);
      uaa::forward(plan, args, ws);  // collective over the plan's communicator

      double sum = 0;
      for (float x : out) sum += x;
      std::printf("rank %d: %lld tokens of %lld, out checksum %.6f (%s)\n", rank,
                  static_cast<long long>(tokens), static_cast<long long>(plan.q_total()), sum,
                  uaa::kernel_name());
    } catch (const uaa::Error& e) {  // raised on every rank alike
      std::fprintf(stderr, "%s\n", e.what());
      status = 1;
    }
  }
  MPI_Finalize();
  return status;
}
