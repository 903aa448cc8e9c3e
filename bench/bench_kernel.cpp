// Kernel benchmark: the attention kernel, a large OpenBLAS sgemm and an unfused
// GEMM-softmax-GEMM attention on the same BLAS, on the same threads, in one process.
//
// Attention FLOPs = 4·Sq·Skv·D·H (two GEMMs), halved when causal; GFLOP/s use the median time;
// kernel and sgemm reps alternate and ratio_to_sgemm is the median of the per-rep ratios.
// The ceiling: the FMA peak of this core measured in the same process (peak.h: an fp32 FMA loop and,
// with AVX512_BF16, a vdpbf16ps loop, on the same thread count); ratio_to_peak = kernel GFLOP/s / the
// peak of the kernel's dtype (bf16: also against the fp32 peak). Which OpenBLAS core ran (and the
// OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE variables, which can pin a slower one) is printed with it.
//
// --backward times the backward kernel paired with the forward one (backward_kernel_for): FLOPs
// = 2.5× the forward's (10·Sq·Skv·D·H, halved when causal: dS, dQ, dK, dV and the recomputed S);
// lse comes from one forward run and delta = rowsum(dO∘O) in fp32, both before the timing.
// --unordered-dq times BackwardProblem::ordered_dq = false; --compare-ordering times both (reps
// alternate) and prints their medians and ratio.
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
#include "peak.h"
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
  bool backward = false, unordered_dq = false, compare_ordering = false;
  std::string kernel;  // empty: the one forward() would use
};

const char* kUsage =
    "usage: bench kernel --seq S [--kv-seq S2] --heads H --head-dim D [--dtype f32|bf16]\n"
    "                    [--threads T] [--causal] [--json] [--reps N] [--gemm N]\n"
    "                    [--kernel NAME] [--no-unfused]\n"
    "                    [--backward [--unordered-dq] [--compare-ordering]]\n"
    "OpenBLAS reads OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (printed with the result); to measure the\n"
    "core it picks itself: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE uaa bench kernel ...\n";

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
      else if (a == "--backward") o.backward = true;
      else if (a == "--unordered-dq") o.unordered_dq = true;
      else if (a == "--compare-ordering") o.compare_ordering = true;
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
  if ((o.unordered_dq || o.compare_ordering) && !o.backward) {
    err = "--unordered-dq and --compare-ordering need --backward";
    return false;
  }
  if (o.backward) o.unfused = false;  // the unfused BLAS attention is a forward reference
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

// A JSON string literal (the OpenBLAS strings are plain ASCII; escape anyway).
std::string json_str(const char* v) {
  if (!v) return "null";
  std::string r = "\"";
  for (const char* c = v; *c; ++c) {
    const unsigned char u = static_cast<unsigned char>(*c);
    if (u == '"' || u == '\\') {
      r += '\\';
      r += *c;
    } else if (u < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", u);
      r += buf;
    } else {
      r += *c;
    }
  }
  return r + "\"";
}

// A JSON number, or null when not available.
std::string json_num(double v, const char* fmt, bool available = true) {
  if (!available || !std::isfinite(v)) return "null";
  char buf[64];
  std::snprintf(buf, sizeof buf, fmt, v);
  return buf;
}

std::string trimmed(const char* s) {
  std::string r = s ? s : "";
  while (!r.empty() && (r.back() == ' ' || r.back() == '\n')) r.pop_back();
  return r;
}

// One tensor: fp32 values, and with --dtype bf16 their bf16 bits (what the kernel reads and writes).
struct Tensor {
  std::vector<float> f;
  std::vector<std::uint16_t> b;
  void fill(std::size_t n, std::uint64_t& seed, bool bf) {
    f.resize(n);
    for (float& x : f) x = rnd(seed);
    if (bf) {
      b.resize(n);
      for (std::size_t i = 0; i < n; ++i) b[i] = uaa::bf16_from_f32(f[i]);
    }
  }
  void zeros(std::size_t n, bool bf) {
    f.assign(n, 0.0f);
    if (bf) b.assign(n, 0);
  }
  const void* data(bool bf) const { return bf ? static_cast<const void*>(b.data()) : f.data(); }
  void* data(bool bf) { return bf ? static_cast<void*>(b.data()) : f.data(); }
  float at(std::size_t i, bool bf) const { return bf ? uaa::f32_from_bf16(b[i]) : f[i]; }
};

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
using Scratch = std::unique_ptr<void, AlignedFree>;
Scratch alloc_scratch(std::size_t bytes) {
  return Scratch(std::aligned_alloc(64, (bytes + 127) / 64 * 64));
}

}  // namespace

int bench_kernel_main(int argc, char** argv) {
  using namespace uaa::detail;
  Options o;
  std::string err;
  if (!parse(argc, argv, o, err)) {
    std::fprintf(stderr, "bench kernel: %s\n%s", err.c_str(), kUsage);
    return 2;
  }
  const AttentionKernel* kernel = find_kernel(o.kernel);
  if (!kernel || !kernel->supports(o.dtype)) {
    std::fprintf(stderr, "bench kernel: kernel '%s' is unknown here or lacks dtype %s\n",
                 o.kernel.c_str(), uaa::dtype_name(o.dtype));
    return 2;
  }
  const BackwardKernel* bkernel = nullptr;
  if (o.backward) {
    bkernel = &backward_kernel_for(*kernel);
    if (!bkernel->supports(o.dtype)) {
      std::fprintf(stderr, "bench kernel: backward kernel '%s' lacks dtype %s\n", bkernel->name(),
                   uaa::dtype_name(o.dtype));
      return 2;
    }
  }
  openblas_set_num_threads(o.threads);
  // The ceiling of this core, on the same thread count, before anything else runs (~0.4 s).
  const uaa::bench::Peak peak = uaa::bench::measure_peak(o.threads);

  const std::int64_t Sq = o.seq, Skv = o.kv_seq, H = o.heads, D = o.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const bool bf = o.dtype == DType::bf16;
  std::uint64_t seed = 0x9e3779b97f4a7c15ull;
  Tensor q, k, v, out;
  q.fill(Sq * H * D, seed, bf);
  k.fill(Skv * H * D, seed, bf);
  v.fill(Skv * H * D, seed, bf);
  out.zeros(Sq * H * D, bf);
  std::vector<float> lse(o.backward ? Sq * H : 0);
  const TokenSegment qs{q.data(bf), Sq, H * D, D};
  const TokenSegment ks{k.data(bf), Skv, H * D, D};
  const TokenSegment vs{v.data(bf), Skv, H * D, D};
  const OutSegment os{out.data(bf), H * D, D, o.backward ? lse.data() : nullptr, H};
  KernelProblem p;
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
  Scratch scratch = alloc_scratch(kernel->scratch_bytes(p));
  p.scratch = scratch.get();

  // Backward: dO random; lse from one forward run, delta = rowsum(dO∘O) in fp32 (as the caller of
  // the backward kernel computes them).
  Tensor dout, dq;
  std::vector<float> delta, dk_partial, dv_partial;
  StatSegment lse_s, delta_s;
  TokenSegment dos;
  OutSegment dqs;
  BackwardProblem bp;
  Scratch bscratch;
  if (o.backward) {
    dout.fill(Sq * H * D, seed, bf);
    dq.zeros(Sq * H * D, bf);
    kernel->run(p);
    delta.assign(Sq * H, 0.0f);
    for (std::int64_t i = 0; i < Sq * H; ++i) {
      float s = 0.0f;
      for (std::int64_t d = 0; d < D; ++d) s += dout.at(i * D + d, bf) * out.at(i * D + d, bf);
      delta[i] = s;
    }
    dk_partial.assign(H * Skv * D, 0.0f);
    dv_partial.assign(H * Skv * D, 0.0f);
    lse_s = {lse.data(), H};
    delta_s = {delta.data(), H};
    dos = {dout.data(bf), Sq, H * D, D};
    dqs = {dq.data(bf), H * D, D, nullptr, 0};
    bp.dtype = o.dtype;
    bp.head_dim = D;
    bp.q_heads = H;
    bp.group = 1;
    bp.q = {&qs, 1};
    bp.dout = {&dos, 1};
    bp.lse = {&lse_s, 1};
    bp.delta = {&delta_s, 1};
    bp.dq = {&dqs, 1};
    bp.k = {&ks, 1};
    bp.v = {&vs, 1};
    bp.q_total = Sq;
    bp.kv_total = Skv;
    bp.scale = scale;
    bp.causal = o.causal;
    bp.threads = o.threads;
    bp.dk_partial = dk_partial.data();
    bp.dv_partial = dv_partial.data();
    bp.ordered_dq = !o.unordered_dq;
    bscratch = alloc_scratch(bkernel->scratch_bytes(bp));
    bp.scratch = bscratch.get();
  }

  const double fwd_flops = 4.0 * Sq * Skv * D * H * (o.causal ? 0.5 : 1.0);
  const double flops = o.backward ? 2.5 * fwd_flops : fwd_flops;
  const std::int64_t G = o.gemm;
  std::vector<float> a(G * G), b(G * G), c(G * G);
  for (float& x : a) x = rnd(seed);
  for (float& x : b) x = rnd(seed);
  auto run_forward = [&] { kernel->run(p); };
  auto run_backward = [&](bool ordered) {
    bp.ordered_dq = ordered;
    bkernel->run(bp);
  };
  const bool main_ordered = !o.unordered_dq;
  auto run_kernel = [&] {
    if (o.backward) run_backward(main_ordered);
    else run_forward();
  };
  auto run_gemm = [&] {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, G, G, G, 1.0f, a.data(), G, b.data(), G,
                0.0f, c.data(), G);
  };
  // Kernel and sgemm alternate rep by rep, so a slow stretch of a shared machine hits both sides of
  // the ratio; ratio_to_sgemm is the median of the per-rep ratios. With --compare-ordering the other
  // dQ ordering runs in the same rep too.
  const double gemm_flops = 2.0 * G * G * G;
  std::vector<double> kernel_ms, other_ms, gemm_ms_reps, ratios;
  run_kernel();
  if (o.compare_ordering) run_backward(!main_ordered);
  run_gemm();
  for (int r = 0; r < o.reps; ++r) {
    // Alternate which ordering goes first, so neither always runs right after the sgemm.
    double tk = 0, to = 0;
    if (o.compare_ordering && r % 2) {
      to = time_ms([&] { run_backward(!main_ordered); });
      tk = time_ms(run_kernel);
    } else {
      tk = time_ms(run_kernel);
      if (o.compare_ordering) to = time_ms([&] { run_backward(!main_ordered); });
    }
    const double tg = time_ms(run_gemm);
    kernel_ms.push_back(tk);
    if (o.compare_ordering) other_ms.push_back(to);
    gemm_ms_reps.push_back(tg);
    ratios.push_back((flops / tk) / (gemm_flops / tg));
  }
  const double ms = median(kernel_ms);
  const double gemm_ms = median(gemm_ms_reps);
  const double sgemm_gflops = gemm_flops / gemm_ms * 1e-6;
  const double ratio_to_sgemm = median(ratios);
  double ordered_ms = 0, unordered_ms = 0;
  if (o.compare_ordering) {
    ordered_ms = main_ordered ? ms : median(other_ms);
    unordered_ms = main_ordered ? median(other_ms) : ms;
  }

  double unfused_ms = 0;
  if (o.unfused) {
    std::vector<float> scores(Sq * Skv), out2(Sq * H * D);
    unfused_ms = median_ms(std::max(1, o.reps / 2), [&] {
      unfused_attention(o, q.f.data(), k.f.data(), v.f.data(), out2.data(), scores.data(), scale);
    });
  }
  const double gflops = flops / ms * 1e-6;
  const double unfused_gflops = o.unfused ? flops / unfused_ms * 1e-6 : 0.0;

  // Against the peak of the kernel's dtype (bf16: vdpbf16ps when the CPU has it), and fp32's.
  const bool have_fp32_peak = peak.fp32_gflops > 0;
  const bool have_dtype_peak = bf ? peak.has_bf16 && peak.bf16_gflops > 0 : have_fp32_peak;
  const double ratio_to_fp32_peak = have_fp32_peak ? gflops / peak.fp32_gflops : 0.0;
  const double ratio_to_peak =
      have_dtype_peak ? gflops / (bf ? peak.bf16_gflops : peak.fp32_gflops) : 0.0;

  const std::string blas_core = trimmed(openblas_get_corename());
  const std::string blas_config = trimmed(openblas_get_config());
  const char* env_coretype = std::getenv("OPENBLAS_CORETYPE");
  const char* env_l2 = std::getenv("OPENBLAS_L2_SIZE");
  const char* name = o.backward ? bkernel->name() : kernel->name();

  if (o.json) {
    std::printf(
        "{\"kernel\": \"%s\", \"pass\": \"%s\", \"dtype\": \"%s\", \"seq\": %lld, \"kv_seq\": %lld, "
        "\"heads\": %lld, \"head_dim\": %lld, \"threads\": %d, \"causal\": %s, \"reps\": %d, "
        "\"ms\": %.3f, \"gflops\": %.2f, \"sgemm_gflops\": %.2f, \"ratio_to_sgemm\": %.3f, "
        "\"unfused_ms\": %.3f, \"unfused_gflops\": %.2f, \"speedup_vs_unfused\": %.3f, "
        "\"peak_fp32_isa\": \"%s\", \"peak_fp32_gflops\": %s, \"peak_bf16_gflops\": %s, "
        "\"ratio_to_peak\": %s, \"ratio_to_fp32_peak\": %s, "
        "\"openblas_core\": %s, \"openblas_config\": %s, \"openblas_coretype_env\": %s, "
        "\"openblas_l2_size_env\": %s",
        name, o.backward ? "backward" : "forward", uaa::dtype_name(o.dtype),
        static_cast<long long>(Sq), static_cast<long long>(Skv), static_cast<long long>(H),
        static_cast<long long>(D), o.threads, o.causal ? "true" : "false", o.reps, ms, gflops,
        sgemm_gflops, ratio_to_sgemm, unfused_ms, unfused_gflops,
        o.unfused ? unfused_ms / ms : 0.0, peak.fp32_isa.c_str(),
        json_num(peak.fp32_gflops, "%.2f", have_fp32_peak).c_str(),
        json_num(peak.bf16_gflops, "%.2f", peak.has_bf16).c_str(),
        json_num(ratio_to_peak, "%.3f", have_dtype_peak).c_str(),
        json_num(ratio_to_fp32_peak, "%.3f", have_fp32_peak).c_str(), json_str(blas_core.c_str()).c_str(),
        json_str(blas_config.c_str()).c_str(), json_str(env_coretype).c_str(),
        json_str(env_l2).c_str());
    if (o.backward) {
      std::printf(", \"forward_kernel\": \"%s\", \"ordered_dq\": %s", kernel->name(),
                  main_ordered ? "true" : "false");
      if (o.compare_ordering)
        std::printf(", \"ordered_ms\": %.3f, \"unordered_ms\": %.3f, \"ordered_over_unordered\": %.3f",
                    ordered_ms, unordered_ms, ordered_ms / unordered_ms);
    }
    std::printf("}\n");
  } else {
    std::printf("%-18s %-5s %s Sq %6lld Skv %6lld H %3lld D %4lld T %2d %-6s  %9.3f ms  %7.2f GFLOP/s"
                "  sgemm %7.2f  ratio %.3f  peak %s",
                name, uaa::dtype_name(o.dtype), o.backward ? "bwd" : "fwd", static_cast<long long>(Sq),
                static_cast<long long>(Skv), static_cast<long long>(H), static_cast<long long>(D),
                o.threads, o.causal ? "causal" : "full", ms, gflops, sgemm_gflops, ratio_to_sgemm,
                have_dtype_peak ? json_num(ratio_to_peak, "%.3f").c_str() : "n/a");
    if (bf) std::printf(" (fp32 peak %s)", json_num(ratio_to_fp32_peak, "%.3f", have_fp32_peak).c_str());
    if (o.unfused)
      std::printf("  unfused %7.2f GFLOP/s  speedup %.2f", unfused_gflops, unfused_ms / ms);
    std::printf("\n");
    if (o.compare_ordering)
      std::printf("  dq ordering: ordered %.3f ms, unordered %.3f ms, ordered/unordered %.3f\n",
                  ordered_ms, unordered_ms, ordered_ms / unordered_ms);
    std::printf("  peak (%d thread%s): fp32 %s %.2f GFLOP/s", peak.threads, peak.threads == 1 ? "" : "s",
                peak.fp32_isa.c_str(), peak.fp32_gflops);
    if (peak.has_bf16) std::printf(", bf16 vdpbf16ps %.2f GFLOP/s", peak.bf16_gflops);
    else std::printf(", bf16 n/a (no AVX512_BF16)");
    std::printf("\n  openblas: core %s (%s), OPENBLAS_CORETYPE=%s OPENBLAS_L2_SIZE=%s\n",
                blas_core.c_str(), blas_config.c_str(), env_coretype ? env_coretype : "(unset)",
                env_l2 ? env_l2 : "(unset)");
  }
  return 0;
}
