// uaa_bench_plan: how long one rank takes to build its plan (uaa::Plan::from_lengths) at large rank
// counts, in one process. The communicator is an in-process stand-in of P ranks seen from one rank
// (from_lengths communicates nothing). Times rank 0, the rank in the middle and the last rank, each
// in a fresh child process (Linux; --in-process: all in this one): its first build (cold_ms: fresh
// heap, as a job builds its plan once) and the median (and minimum) of --reps builds after it.
//
//   uaa_bench_plan [--ranks 1024,16384,65536] [--reps 7] [--strategies uaa] [--json] [--in-process]
//
// Workloads: flux (24 heads x 128, fp32) with uneven per-rank lengths (1..255 tokens, mean 128),
// flux's 4096 + 77 tokens split as evenly as possible (most ranks hold none once P > 4173), and
// GQA 32/8 x 128 causal with uneven lengths (64..192 tokens). Goal (issue): <= 100 ms at 65,536.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include <unistd.h>

#include "uaa/communicator.h"
#include "uaa/error.h"
#include "uaa/plan.h"

namespace {

// Rank `rank` of `size` ranks, in one process: enough for Plan::from_lengths, which communicates
// nothing. Anything that would communicate throws.
class LoneRank final : public uaa::Communicator {
 public:
  LoneRank(int rank, int size) : rank_(rank), size_(size) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* transport() const override { return "bench-lone-rank"; }
  void allgather(const void*, std::size_t, void*) override {
    throw std::logic_error("uaa_bench_plan: allgather called");
  }
  void exchange(std::span<const uaa::Message>, std::span<const uaa::Message>) override {
    throw std::logic_error("uaa_bench_plan: exchange called");
  }

 private:
  int rank_, size_;
};

std::uint64_t mix(std::uint64_t x) {  // splitmix64: deterministic "uneven" lengths
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

struct Workload {
  const char* name;
  uaa::AttentionShape shape;
  std::vector<std::int64_t> (*lens)(int ranks);
};

std::vector<std::int64_t> uneven(int P, std::int64_t lo, std::int64_t hi, std::uint64_t seed) {
  std::vector<std::int64_t> v(static_cast<std::size_t>(P));
  for (int r = 0; r < P; ++r)
    v[static_cast<std::size_t>(r)] =
        lo + static_cast<std::int64_t>(mix(seed + static_cast<std::uint64_t>(r)) %
                                       static_cast<std::uint64_t>(hi - lo + 1));
  return v;
}

std::vector<std::int64_t> flux_uneven(int P) { return uneven(P, 1, 255, 1); }
std::vector<std::int64_t> flux_even(int P) {
  const std::int64_t total = 4096 + 77;
  std::vector<std::int64_t> v(static_cast<std::size_t>(P), total / P);
  for (std::int64_t r = 0; r < total % P; ++r) ++v[static_cast<std::size_t>(r)];
  return v;
}
std::vector<std::int64_t> gqa_uneven(int P) { return uneven(P, 64, 192, 2); }

uaa::AttentionShape make_shape(std::int64_t hq, std::int64_t hkv, bool causal) {
  uaa::AttentionShape s;
  s.q_heads = hq;
  s.kv_heads = hkv;
  s.head_dim = 128;
  s.causal = causal;
  return s;
}

std::vector<std::int64_t> int_list(const char* opt, const std::string& text) {
  std::vector<std::int64_t> out;
  std::size_t at = 0;
  while (at <= text.size()) {
    const std::size_t c = std::min(text.find(',', at), text.size());
    const std::string item = text.substr(at, c - at);
    char* end = nullptr;
    const long long x = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end || x < 1 || x > 0x7fffffff)
      throw std::invalid_argument(std::string(opt) + ": '" + item + "' is not a rank count >= 1");
    out.push_back(x);
    at = c + 1;
  }
  return out;
}

struct Result {
  double cold_ms = 0, median_ms = 0, min_ms = 0;
  std::int64_t bytes_sent = 0, bytes_received = 0, staging = 0;
};

const Workload kWorkloads[] = {
    {"flux 24x128 uneven", make_shape(24, 24, false), flux_uneven},
    {"flux 24x128 4173 even", make_shape(24, 24, false), flux_even},
    {"gqa 32/8x128 causal", make_shape(32, 8, true), gqa_uneven},
};
constexpr int kWorkloadCount = static_cast<int>(sizeof kWorkloads / sizeof kWorkloads[0]);

// 1 + reps builds of rank `rank`'s plan in this process: the first one (cold: fresh heap, as when
// a process builds its plan once), then the median and minimum of the rest.
Result measure(const Workload& w, uaa::Strategy st, int P, int rank, int reps) {
  const std::vector<std::int64_t> lens = w.lens(P);
  uaa::PlanOptions opt;
  opt.strategy = st;
  auto comm = std::make_shared<LoneRank>(rank, P);
  std::vector<double> ms;
  Result res;
  for (int rep = 0; rep <= reps; ++rep) {
    std::vector<std::int64_t> q = lens, kv = lens;  // copies outside the timed region
    const auto t0 = std::chrono::steady_clock::now();
    const uaa::Plan plan = uaa::Plan::from_lengths(*comm, w.shape, std::move(q), std::move(kv), opt);
    const auto t1 = std::chrono::steady_clock::now();
    const double t = std::chrono::duration<double, std::milli>(t1 - t0).count();
    if (rep == 0) res.cold_ms = t;
    else ms.push_back(t);
    res.bytes_sent = plan.bytes_sent();
    res.bytes_received = plan.bytes_received();
    res.staging = plan.staging_bytes();
  }
  std::sort(ms.begin(), ms.end());
  const std::size_t n = ms.size();
  res.median_ms = n % 2 ? ms[n / 2] : (ms[n / 2 - 1] + ms[n / 2]) / 2;
  res.min_ms = ms.front();
  return res;
}

// The same in a child process of this program (a fresh heap per measurement), when it can find
// itself; else in this process.
Result measure_apart(int workload, uaa::Strategy st, int P, int rank, int reps) {
  char self[4096];
  const ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
  if (n > 0) {
    self[n] = 0;
    const std::string cmd = std::string("'") + self + "' --child " + std::to_string(workload) + " " +
                            uaa::strategy_name(st) + " " + std::to_string(P) + " " +
                            std::to_string(rank) + " " + std::to_string(reps);
    if (std::FILE* f = popen(cmd.c_str(), "r")) {
      Result r;
      long long sent = 0, received = 0, staging = 0;
      const int got = std::fscanf(f, "%lf %lf %lf %lld %lld %lld", &r.cold_ms, &r.median_ms,
                                  &r.min_ms, &sent, &received, &staging);
      const int status = pclose(f);
      if (got == 6 && status == 0) {
        r.bytes_sent = sent;
        r.bytes_received = received;
        r.staging = staging;
        return r;
      }
      throw std::runtime_error("child measurement failed: " + cmd);
    }
  }
  return measure(kWorkloads[workload], st, P, rank, reps);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::int64_t> ranks = {1024, 16384, 65536};
  std::vector<uaa::Strategy> strategies = {uaa::Strategy::uaa};
  int reps = 7;
  bool json = false, in_process = false;
  try {
    if (argc == 7 && std::strcmp(argv[1], "--child") == 0) {
      uaa::Strategy st;
      const int w = std::atoi(argv[2]);
      if (w < 0 || w >= kWorkloadCount || !uaa::parse_strategy(argv[3], &st))
        throw std::invalid_argument("bad --child arguments");
      const Result r = measure(kWorkloads[w], st, std::atoi(argv[4]), std::atoi(argv[5]),
                               std::max(1, std::atoi(argv[6])));
      std::printf("%.6f %.6f %.6f %lld %lld %lld\n", r.cold_ms, r.median_ms, r.min_ms,
                  static_cast<long long>(r.bytes_sent), static_cast<long long>(r.bytes_received),
                  static_cast<long long>(r.staging));
      return 0;
    }
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      if (a == "--json") {
        json = true;
      } else if (a == "--in-process") {
        in_process = true;
      } else if (a == "--help" || a == "-h") {
        std::printf("usage: uaa_bench_plan [--ranks P[,P...]] [--reps N] [--strategies LIST] [--json]\n"
                    "                      [--in-process]\n"
                    "Times uaa::Plan::from_lengths for ranks 0, P/2 and P-1 of P ranks, in one process\n"
                    "per measurement (--in-process: all in this one): cold_ms is its first build,\n"
                    "median_ms and min_ms are over the N (default 7) builds after it.\n");
        return 0;
      } else if (i + 1 < argc && a == "--ranks") {
        ranks = int_list("--ranks", argv[++i]);
      } else if (i + 1 < argc && a == "--reps") {
        reps = std::max(1, std::atoi(argv[++i]));
      } else if (i + 1 < argc && a == "--strategies") {
        strategies.clear();
        const std::string v = argv[++i];
        std::size_t at = 0;
        while (at <= v.size()) {
          const std::size_t c = std::min(v.find(',', at), v.size());
          uaa::Strategy st;
          if (!uaa::parse_strategy(v.substr(at, c - at), &st))
            throw std::invalid_argument("--strategies: '" + v.substr(at, c - at) + "' is unknown");
          strategies.push_back(st);
          at = c + 1;
        }
      } else {
        throw std::invalid_argument("unknown option '" + a + "' (see --help)");
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "uaa_bench_plan: %s\n", e.what());
    return 2;
  }

  if (!json)
    std::printf("%-22s %-12s %7s %7s %9s %10s %9s %14s %14s\n", "workload", "strategy", "ranks",
                "rank", "cold_ms", "median_ms", "min_ms", "bytes_sent", "bytes_recv");
  double worst_cold = -1, worst_median = -1;
  try {
    for (int wi = 0; wi < kWorkloadCount; ++wi) {
      const Workload& w = kWorkloads[wi];
      for (uaa::Strategy st : strategies) {
        for (std::int64_t P64 : ranks) {
          const int P = static_cast<int>(P64);
          if (st == uaa::Strategy::ulysses) {
            const std::vector<std::int64_t> lens = w.lens(P);
            std::int64_t total = 0;
            for (std::int64_t x : lens) total += x;
            const bool runs =
                total % P == 0 && w.shape.q_heads % P == 0 &&
                std::all_of(lens.begin(), lens.end(), [&](std::int64_t x) { return x == total / P; });
            if (!runs) continue;
          }
          const int probe[] = {0, P / 2, P - 1};
          for (int k = 0; k < 3; ++k) {
            const int r = probe[k];
            if (k > 0 && r == probe[k - 1]) continue;
            const Result res = in_process ? measure(w, st, P, r, reps) : measure_apart(wi, st, P, r, reps);
            if (P == 65536) {
              worst_cold = std::max(worst_cold, res.cold_ms);
              worst_median = std::max(worst_median, res.median_ms);
            }
            if (json)
              std::printf("{\"workload\": \"%s\", \"strategy\": \"%s\", \"ranks\": %d, \"rank\": %d, "
                          "\"reps\": %d, \"cold_ms\": %.6g, \"median_ms\": %.6g, \"min_ms\": %.6g, "
                          "\"bytes_sent\": %lld, \"bytes_received\": %lld, \"staging_bytes\": %lld}\n",
                          w.name, uaa::strategy_name(st), P, r, reps, res.cold_ms, res.median_ms,
                          res.min_ms, static_cast<long long>(res.bytes_sent),
                          static_cast<long long>(res.bytes_received),
                          static_cast<long long>(res.staging));
            else
              std::printf("%-22s %-12s %7d %7d %9.3f %10.3f %9.3f %14lld %14lld\n", w.name,
                          uaa::strategy_name(st), P, r, res.cold_ms, res.median_ms, res.min_ms,
                          static_cast<long long>(res.bytes_sent),
                          static_cast<long long>(res.bytes_received));
            std::fflush(stdout);
          }
        }
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "uaa_bench_plan: %s\n", e.what());
    return 1;
  }
  if (!json && worst_median >= 0)
    std::printf("# slowest at 65536 ranks: cold %.3f ms, median %.3f ms (goal <= 100 ms: %s)\n",
                worst_cold, worst_median, std::max(worst_cold, worst_median) <= 100 ? "met" : "NOT met");
  return 0;
}
