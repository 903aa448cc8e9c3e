// Kernel benchmark: the attention kernel, a large OpenBLAS sgemm and an unfused
// GEMM-softmax-GEMM attention on the same BLAS, on the same threads, in one process.
//
// Attention FLOPs = 4·Sq·Skv·D·H (two GEMMs), halved when causal; GFLOP/s use the median time;
// kernel and sgemm reps alternate and ratio_to_sgemm is the median of the per-rep ratios.
// The unfused attention materialises S×S scores per head (fp32 even for --dtype bf16: it measures
// what a plain BLAS implementation achieves, not a bf16 path) and computes the full square for
// causal, as a plain implementation does.
#include "bench_kernel.h"

#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "kernels/kernel.h"
#include "uaa/bf16.h"
#include "uaa/error.h"
#include "uaa/types.h"

namespace {

using uaa::DType;
using Clock = std::chrono::steady_clock;

struct Options {
  std::int64_t seq = 4096, kv_seq = -1, heads = 8, head_dim = 128;
  DType dtype = DType::f32;
  int threads = 1, reps = 5;
  std::int64_t gemm = 2048;
  bool causal = false, json = false, unfused = true;
  std::string kernel;  // empty: the one forward() would use
};

const char* kUsage =
    "usage: bench kernel --seq S [--kv-seq S2] --heads H --head-dim D [--dtype f32|bf16]\n"
    "                    [--threads T] [--causal] [--json] [--reps N] [--gemm N]\n"
    "                    [--kernel NAME] [--no-unfused]\n";

bool parse(int argc, char** argv, Options& o, std::string& err) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](std::int64_t lo) -> std::int64_t {
      if (i + 1 >= argc) throw std::string(a + " needs a value");
      char* end = nullptr;
      const long long v = std::strtoll(argv[++i], &end, 10);
      if (*end || v < lo) throw std::string(a + " " + argv[i] + ": expected an integer >= " + std::to_string(lo));
      return v;
    };
    try {
      if (a == "--seq") o.seq = value(1);
      else if (a == "--kv-seq") o.kv_seq = value(1);
      else if (a == "--heads") o.heads = value(1);
      else if (a == "--head-dim") o.head_dim = value(1);
      else if (a == "--threads") o.threads = static_cast<int>(value(1));
      else if (a == "--reps") o.reps = static_cast<int>(value(1));
      else if (a == "--gemm") o.gemm = value(64);
      else if (a == "--causal") o.causal = true;
      else if (a == "--json") o.json = true;
      else if (a == "--no-unfused") o.unfused = false;
      else if (a == "--kernel" && i + 1 < argc) o.kernel = argv[++i];
      else if (a == "--dtype" && i + 1 < argc) {
        const std::string d = argv[++i];
        if (d == "f32") o.dtype = DType::f32;
        else if (d == "bf16") o.dtype = DType::bf16;
        else throw std::string("--dtype " + d + ": expected f32 or bf16");
      } else {
        throw std::string("unknown option " + a);
      }
    } catch (const std::string& e) {
      err = e;
      return false;
    }
  }
  if (o.kv_seq < 0) o.kv_seq = o.seq;
  return true;
}

const uaa::detail::AttentionKernel* find_kernel(const std::string& name) {
  using namespace uaa::detail;
  if (name.empty()) return &select_kernel();
  if (name == "reference") return &reference_kernel();
  if (name == "tiled") return &tiled_f32_kernel();
  for (const AttentionKernel* k : flash_kernels_supported())
    if (name == k->name()) return k;
  return nullptr;
}

double time_ms(const std::function<void()>& f) {
  const auto t0 = Clock::now();
  f();
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Median wall time (ms) of reps runs after one warm-up.
double median_ms(int reps, const std::function<void()>& f) {
  f();
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) t.push_back(time_ms(f));
  return median(t);
}

float rnd(std::uint64_t& s) {  // xorshift, values in [-1, 1)
  s ^= s << 13;
  s ^= s >> 7;
  s ^= s << 17;
  return static_cast<float>(static_cast<double>(s >> 40) / static_cast<double>(1ull << 23) - 1.0);
}


// Plain attention on BLAS: per head S = scale·Q Kᵀ (sgemm), row softmax, O = P V (sgemm).
void unfused_attention(const Options& o, const float* q, const float* k, const float* v, float* out,
                       float* scores, float scale) {
  const std::int64_t Sq = o.seq, Skv = o.kv_seq, H = o.heads, D = o.head_dim, ld = H * D;
  for (std::int64_t h = 0; h < H; ++h) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Sq, Skv, D, scale, q + h * D, ld, k + h * D,
                ld, 0.0f, scores, Skv);
#pragma omp parallel for num_threads(o.threads) schedule(static)
    for (std::int64_t i = 0; i < Sq; ++i) {
      float* s = scores + i * Skv;
      const std::int64_t n = o.causal ? std::min(Skv, std::max<std::int64_t>(0, i + Skv - Sq + 1)) : Skv;
      float m = -std::numeric_limits<float>::infinity(), l = 0.0f;
      for (std::int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
      for (std::int64_t j = 0; j < n; ++j) l += (s[j] = std::exp(s[j] - m));
      const float inv = n ? 1.0f / l : 0.0f;
      for (std::int64_t j = 0; j < n; ++j) s[j] *= inv;
      for (std::int64_t j = n; j < Skv; ++j) s[j] = 0.0f;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Sq, D, Skv, 1.0f, scores, Skv, v + h * D,
                ld, 0.0f, out + h * D, ld);
  }
}

}  // namespace

int bench_kernel_main(int argc, char** argv) {
  Options o;
  std::string err;
  if (!parse(argc, argv, o, err)) {
    std::fprintf(stderr, "bench kernel: %s\n%s", err.c_str(), kUsage);
    return 2;
  }
  const uaa::detail::AttentionKernel* kernel = find_kernel(o.kernel);
  if (!kernel || !kernel->supports(o.dtype)) {
    std::fprintf(stderr, "bench kernel: kernel '%s' is unknown here or lacks dtype %s\n",
                 o.kernel.c_str(), uaa::dtype_name(o.dtype));
    return 2;
  }
  openblas_set_num_threads(o.threads);

  const std::int64_t Sq = o.seq, Skv = o.kv_seq, H = o.heads, D = o.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::uint64_t seed = 0x9e3779b97f4a7c15ull;
  std::vector<float> q(Sq * H * D), k(Skv * H * D), v(Skv * H * D), out(Sq * H * D);
  for (auto* t : {&q, &k, &v})
    for (float& x : *t) x = rnd(seed);
  std::vector<std::uint16_t> qb, kb, vb, outb;
  if (o.dtype == DType::bf16) {
    for (auto [src, dst] : {std::pair{&q, &qb}, {&k, &kb}, {&v, &vb}}) {
      dst->resize(src->size());
      for (std::size_t i = 0; i < src->size(); ++i) (*dst)[i] = uaa::bf16_from_f32((*src)[i]);
    }
    outb.resize(out.size());
  }
  const bool bf = o.dtype == DType::bf16;
  const uaa::detail::TokenSegment qs{bf ? static_cast<const void*>(qb.data()) : q.data(), Sq, H * D, D};
  const uaa::detail::TokenSegment ks{bf ? static_cast<const void*>(kb.data()) : k.data(), Skv, H * D, D};
  const uaa::detail::TokenSegment vs{bf ? static_cast<const void*>(vb.data()) : v.data(), Skv, H * D, D};
  const uaa::detail::OutSegment os{bf ? static_cast<void*>(outb.data()) : out.data(), H * D, D, nullptr, 0};
  uaa::detail::KernelProblem p;
  p.dtype = o.dtype;
  p.head_dim = D;
  p.q_heads = H;
  p.group = 1;
  p.q = {&qs, 1};
  p.k = {&ks, 1};
  p.v = {&vs, 1};
  p.out = {&os, 1};
  p.q_total = Sq;
  p.kv_total = Skv;
  p.scale = scale;
  p.causal = o.causal;
  p.threads = o.threads;  // the kernel's threads (it does not read uaa::num_threads())
  const std::size_t bytes = (kernel->scratch_bytes(p) + 127) / 64 * 64;
  std::unique_ptr<void, decltype(&std::free)> scratch(std::aligned_alloc(64, bytes), &std::free);
  p.scratch = scratch.get();

  const double flops = 4.0 * Sq * Skv * D * H * (o.causal ? 0.5 : 1.0);
  const std::int64_t G = o.gemm;
  std::vector<float> a(G * G), b(G * G), c(G * G);
  for (float& x : a) x = rnd(seed);
  for (float& x : b) x = rnd(seed);
  auto run_kernel = [&] { kernel->run(p); };
  auto run_gemm = [&] {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, G, G, G, 1.0f, a.data(), G, b.data(), G,
                0.0f, c.data(), G);
  };
  // Kernel and sgemm alternate rep by rep, so a slow stretch of a shared machine hits both sides of
  // the ratio; ratio_to_sgemm is the median of the per-rep ratios.
  const double gemm_flops = 2.0 * G * G * G;
  std::vector<double> kernel_ms, gemm_ms_reps, ratios;
  run_kernel();
  run_gemm();
  for (int r = 0; r < o.reps; ++r) {
    const double tk = time_ms(run_kernel), tg = time_ms(run_gemm);
    kernel_ms.push_back(tk);
    gemm_ms_reps.push_back(tg);
    ratios.push_back((flops / tk) / (gemm_flops / tg));
  }
  const double ms = median(kernel_ms);
  const double gemm_ms = median(gemm_ms_reps);
  const double sgemm_gflops = gemm_flops / gemm_ms * 1e-6;
  const double ratio_to_sgemm = median(ratios);

  double unfused_ms = 0;
  if (o.unfused) {
    std::vector<float> scores(Sq * Skv), out2(Sq * H * D);
    unfused_ms = median_ms(std::max(1, o.reps / 2), [&] {
      unfused_attention(o, q.data(), k.data(), v.data(), out2.data(), scores.data(), scale);
    });
  }
  const double gflops = flops / ms * 1e-6;
  const double unfused_gflops = o.unfused ? flops / unfused_ms * 1e-6 : 0.0;
  if (o.json) {
    std::printf(
        "{\"kernel\": \"%s\", \"dtype\": \"%s\", \"seq\": %lld, \"kv_seq\": %lld, \"heads\": %lld, "
        "\"head_dim\": %lld, \"threads\": %d, \"causal\": %s, \"reps\": %d, \"ms\": %.3f, "
        "\"gflops\": %.2f, \"sgemm_gflops\": %.2f, \"ratio_to_sgemm\": %.3f, \"unfused_ms\": %.3f, "
        "\"unfused_gflops\": %.2f, \"speedup_vs_unfused\": %.3f}\n",
        kernel->name(), uaa::dtype_name(o.dtype), static_cast<long long>(Sq),
        static_cast<long long>(Skv), static_cast<long long>(H), static_cast<long long>(D), o.threads,
        o.causal ? "true" : "false", o.reps, ms, gflops, sgemm_gflops, ratio_to_sgemm,
        unfused_ms, unfused_gflops, o.unfused ? unfused_ms / ms : 0.0);
  } else {
    std::printf("%-18s %-5s Sq %6lld Skv %6lld H %3lld D %4lld T %2d %-6s  %9.3f ms  %7.2f GFLOP/s"
                "  sgemm %7.2f  ratio %.3f  unfused %7.2f GFLOP/s  speedup %.2f\n",
                kernel->name(), uaa::dtype_name(o.dtype), static_cast<long long>(Sq),
                static_cast<long long>(Skv), static_cast<long long>(H), static_cast<long long>(D),
                o.threads, o.causal ? "causal" : "full", ms, gflops, sgemm_gflops,
                ratio_to_sgemm, unfused_gflops, o.unfused ? unfused_ms / ms : 0.0);
  }
  return 0;
}
