// libFuzzer target for the planner: arbitrary (ranks, lengths, heads, kv heads, head dim, dtype,
// flags) given to Plan::from_lengths on every rank of a fake communicator. Invalid input must give
// uaa::Error; valid input a layout whose pairwise counts agree. Never a crash, overflow (UBSan) or
// unbounded allocation. Seed corpus: corpus/plan.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "plan/plan_data.h"
#include "uaa/error.h"
#include "uaa/plan.h"
#include "unit/fake_communicator.h"

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
  std::vector<std::int64_t> q(ranks), kv(ranks);
  for (int r = 0; r < ranks; ++r) {
    // Mostly small lengths; sometimes any int64 (negative and huge included: this target once
    // found a signed overflow at 2^47 tokens, now rejected by the planner's size bound).
    const std::int64_t a = in.take<std::int64_t>(), b = in.take<std::int64_t>();
    q[r] = (flags & 8) ? a : a % 4096;
    kv[r] = (flags & 16) ? b : b % 4096;
  }
  std::vector<std::unique_ptr<uaa::test::FakeCommunicator>> comms;
  std::vector<uaa::Plan> plans;
  try {
    for (int r = 0; r < ranks; ++r) {
      comms.push_back(std::make_unique<uaa::test::FakeCommunicator>(r, ranks));
      plans.push_back(uaa::Plan::from_lengths(*comms.back(), s, q, kv));
    }
  } catch (const uaa::Error&) {
    return 0;
  }
  for (int i = 0; i < ranks; ++i)
    for (int j = 0; j < ranks; ++j) {
      const auto& Li = plans[i].data().layout;
      const auto& Lj = plans[j].data().layout;
      if (Li.qkv_send.counts[j] != Lj.qkv_recv.counts[i]) __builtin_trap();
      if (Li.out_send.counts[j] != Lj.out_recv.counts[i]) __builtin_trap();
    }
  return 0;
}
