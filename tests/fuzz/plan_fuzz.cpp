// libFuzzer target for the planner: arbitrary (ranks, lengths, heads, kv heads, head dim, dtype,
// flags, strategy) given to Plan::from_lengths on every rank of a fake communicator. Invalid input
// must give uaa::Error; valid input plans whose programs pass every check of
// tests/unit/program_checks.h across ranks (symmetry, bounds, overlap, staging, bytes, coverage,
// and the simulated round trip when small enough). Never a crash, overflow (UBSan) or unbounded
// allocation. Seed corpus: corpus/plan.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <vector>

#include "plan/plan_data.h"
#include "uaa/error.h"
#include "uaa/plan.h"
#include "unit/fake_communicator.h"
#include "unit/program_checks.h"

namespace {
struct Reader {
  const std::uint8_t* p;
  std::size_t n;
  template <class T>
  T take() {
    T v{};
    const std::size_t k = n < sizeof v ? n : sizeof v;
    std::memcpy(&v, p, k);
    p += k;
    n -= k;
    return v;
  }
};
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Reader in{data, size};
  const int ranks = 1 + in.take<std::uint8_t>() % 16;
  uaa::AttentionShape s;
  s.q_heads = in.take<std::int16_t>();
  s.kv_heads = in.take<std::int16_t>();
  s.head_dim = in.take<std::int16_t>();
  const std::uint8_t flags = in.take<std::uint8_t>();
  s.dtype = (flags & 1) ? uaa::DType::bf16 : uaa::DType::f32;
  s.causal = flags & 2;
  s.return_lse = flags & 4;
  uaa::PlanOptions options;
  options.strategy = static_cast<uaa::Strategy>((flags >> 5) & 3);
  std::vector<std::int64_t> q(ranks), kv(ranks);
  for (int r = 0; r < ranks; ++r) {
    // Mostly small lengths; sometimes any int64 (negative and huge included: this target once
    // found a signed overflow at 2^47 tokens, now rejected by the planner's size bound).
    const std::int64_t a = in.take<std::int64_t>(), b = in.take<std::int64_t>();
    q[r] = (flags & 8) ? a : a % 4096;
    kv[r] = (flags & 16) ? b : b % 4096;
  }
  std::vector<uaa::Plan> plans;
  try {
    for (int r = 0; r < ranks; ++r) {
      auto comm = std::make_shared<uaa::test::FakeCommunicator>(r, ranks);
      plans.push_back(uaa::Plan::from_lengths(*comm, s, q, kv, options));
    }
  } catch (const uaa::Error&) {
    return 0;
  }
  const uaa::detail::PlanData& d = uaa::detail::plan_data(plans[0]);
  uaa::detail::Geometry g;
  g.q_lens = q;
  g.kv_lens = kv;
  g.q_heads = d.shape.q_heads;
  g.kv_heads = d.shape.kv_heads;
  g.head_dim = d.shape.head_dim;
  g.elem_bytes = static_cast<std::int64_t>(uaa::dtype_size(d.shape.dtype));
  g.causal = d.shape.causal;
  g.with_lse = d.shape.return_lse;
  std::vector<uaa::detail::Program> programs;
  for (const uaa::Plan& p : plans) programs.push_back(uaa::detail::plan_data(p).forward);
  uaa::test::CheckOptions opt;
  opt.max_sim_entries = std::int64_t{1} << 22;
  const uaa::test::CheckResult res =
      uaa::test::check_programs(g, programs, uaa::test::gen_of(options.strategy), opt);
  if (!res.problem.empty()) {
    std::fprintf(stderr, "%s\n", res.problem.c_str());
    __builtin_trap();
  }
  return 0;
}
