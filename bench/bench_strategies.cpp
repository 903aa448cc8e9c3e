// `uaa bench`: every (strategy, sequence) of a sweep on the ranks of MPI_COMM_WORLD, on the same
// deterministic inputs. For each: per-phase medians over the timed calls (max over ranks), the bytes
// each rank sends, a raw MPI_Alltoallv of exactly the same per-peer byte counts timed the same way
// in the same run, the output's largest difference from uaa's, and the cost model's prediction.
//
// Timing honesty: forward() runs with PhaseTimes::sync_exchanges, so each exchange starts after a
// barrier that is timed separately (wait_ms): exchange_ms holds data movement only, not the skew
// of the attention phase before it. total_ms is the whole call, waits included.
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "bench_strategies.h"
#include "plan/cost_model.h"
#include "plan/plan_data.h"
#include "presets.h"
#include "sweep.h"
#include "uaa/bf16.h"
#include "uaa/mpi.h"
#include "uaa/uaa.h"

namespace uaa::bench {
namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// A value in [-1, 1) from the global coordinates: any split sees the same global tensors.
float value_at(int tensor, std::int64_t token, std::int64_t head, std::int64_t dim) {
  std::uint64_t z = (static_cast<std::uint64_t>(tensor) << 60) ^ (static_cast<std::uint64_t>(token) << 24) ^
                    (static_cast<std::uint64_t>(head) << 12) ^ static_cast<std::uint64_t>(dim);
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return static_cast<float>(static_cast<double>(z >> 40) * (1.0 / 8388608.0) - 1.0);
}


struct Shard {
  DType dtype = DType::f32;
  std::int64_t tokens = 0, heads = 0, dim = 0;
  std::vector<std::byte> bytes;
  Shard(DType dt, std::int64_t t, std::int64_t h, std::int64_t d) : dtype(dt), tokens(t), heads(h), dim(d) {
    bytes.resize(static_cast<std::size_t>(t * h * d) * dtype_size(dt) + 64);
  }
  void fill(int tensor, std::int64_t first) {
    std::size_t i = 0;
    for (std::int64_t t = 0; t < tokens; ++t)
      for (std::int64_t h = 0; h < heads; ++h)
        for (std::int64_t d = 0; d < dim; ++d, ++i) {
          const float v = value_at(tensor, first + t, h, d);
          if (dtype == DType::f32) std::memcpy(bytes.data() + 4 * i, &v, 4);
          else { const std::uint16_t b = uaa::bf16_from_f32(v); std::memcpy(bytes.data() + 2 * i, &b, 2); }
        }
  }
  float at(std::size_t i) const {
    if (dtype == DType::f32) { float v; std::memcpy(&v, bytes.data() + 4 * i, 4); return v; }
    std::uint16_t b; std::memcpy(&b, bytes.data() + 2 * i, 2); return uaa::f32_from_bf16(b);
  }
  std::size_t elements() const { return static_cast<std::size_t>(tokens * heads * dim); }
  ConstTensor cview() const { return contiguous(bytes.data(), tokens, heads, dim, dtype); }
  Tensor view() { return contiguous(bytes.data(), tokens, heads, dim, dtype); }
};

// One exchange's per-peer byte counts as the plan gives them.
struct Side {
  const std::vector<std::int64_t> *sc, *sd, *rc, *rd;
  std::int64_t send_total, recv_total;
};

std::vector<Side> exchanges_of(const detail::PlanData& d) {
  switch (d.shape.strategy) {
    case Strategy::ulysses:
    case Strategy::ulysses_pad: {
      const auto& L = d.padded;
      return {{&L.qkv_send.counts, &L.qkv_send.displs, &L.qkv_recv.counts, &L.qkv_recv.displs,
               L.qkv_send.total, L.qkv_recv.total},
              {&L.out_send.counts, &L.out_send.displs, &L.out_recv.counts, &L.out_recv.displs,
               L.out_send.total, L.out_recv.total}};
    }
    case Strategy::allgather_kv: {
      const auto& L = d.gather;
      return {{&L.send.counts, &L.send.displs, &L.recv.counts, &L.recv.displs, L.send.total,
               L.recv.total}};
    }
    case Strategy::uaa:
      break;
  }
  const auto& L = d.layout;
  return {{&L.qkv_send.counts, &L.qkv_send.displs, &L.qkv_recv.counts, &L.qkv_recv.displs,
           L.qkv_send.total, L.qkv_recv.total},
          {&L.out_send.counts, &L.out_send.displs, &L.out_recv.counts, &L.out_recv.displs,
           L.out_send.total, L.out_recv.total}};
}

// Median over `iters` (after one warm-up) of a plain MPI_Alltoallv of MPI_BYTE per exchange, summed
// over the exchanges; each preceded by a barrier, as forward() does under sync_exchanges. -1 when a
// count does not fit an int.
double raw_alltoallv_ms(const std::vector<Side>& sides, std::int64_t iters, MPI_Comm comm) {
  double sum = 0;
  for (const Side& s : sides) {
    const std::size_t P = s.sc->size();
    std::vector<int> sc(P), sd(P), rc(P), rd(P);
    bool fits = s.send_total < INT_MAX && s.recv_total < INT_MAX;
    for (std::size_t j = 0; j < P && fits; ++j) {
      sc[j] = static_cast<int>((*s.sc)[j]);
      sd[j] = static_cast<int>((*s.sd)[j]);
      rc[j] = static_cast<int>((*s.rc)[j]);
      rd[j] = static_cast<int>((*s.rd)[j]);
    }
    int all_fit = fits ? 1 : 0, ok = 0;
    MPI_Allreduce(&all_fit, &ok, 1, MPI_INT, MPI_MIN, comm);
    if (!ok) return -1;
    std::vector<std::byte> send(static_cast<std::size_t>(s.send_total) + 64),
        recv(static_cast<std::size_t>(s.recv_total) + 64);
    std::vector<double> t;
    for (std::int64_t i = 0; i <= iters; ++i) {
      MPI_Barrier(comm);
      const auto t0 = Clock::now();
      MPI_Alltoallv(send.data(), sc.data(), sd.data(), MPI_BYTE, recv.data(), rc.data(), rd.data(),
                    MPI_BYTE, comm);
      const double ms = ms_since(t0);
      if (i > 0) t.push_back(ms);
    }
    double local = median(t), worst = 0;
    MPI_Allreduce(&local, &worst, 1, MPI_DOUBLE, MPI_MAX, comm);
    sum += worst;
  }
  return sum;
}

struct Row {
  std::string strategy, error;
  std::vector<std::int64_t> lens;
  std::int64_t seq = 0, bytes_sent = 0;
  double total = 0, exchange = 0, attention = 0, wait = 0, pack = 0, x1 = 0, x2 = 0, unpack = 0;
  double raw = 0, max_abs_err = 0;
  bool bitwise = false;
  detail::CostEstimate cost;
  double model_ms = 0;
};

std::string json_list(const std::vector<std::int64_t>& v) {
  std::string s = "[";
  for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

std::string num(double v) {
  if (!std::isfinite(v)) return "null";
  char b[32];
  std::snprintf(b, sizeof b, "%.6g", v);
  return b;
}

void print_row(const Row& r, const SweepOptions& o, int P, const detail::CostRates& rates) {
  if (o.json) {
    std::printf("{\"strategy\": \"%s\", \"ranks\": %d, \"threads\": %d, \"seq\": %lld, \"lens\": %s, "
                "\"heads\": %lld, \"kv_heads\": %lld, \"head_dim\": %lld, \"dtype\": \"%s\", \"causal\": %s",
                r.strategy.c_str(), P, num_threads(), static_cast<long long>(r.seq),
                json_list(r.lens).c_str(), static_cast<long long>(o.heads),
                static_cast<long long>(o.kv_heads), static_cast<long long>(o.head_dim),
                dtype_name(o.dtype), o.causal ? "true" : "false");
    if (!r.error.empty()) {
      std::string e;
      for (char c : r.error) e += (c == '"' || c == '\\') ? std::string("\\") + c : std::string(1, c);
      std::printf(", \"error\": \"%s\"}\n", e.c_str());
      return;
    }
    std::printf(", \"total_ms\": %s, \"exchange_ms\": %s, \"attention_ms\": %s, \"wait_ms\": %s, "
                "\"pack_ms\": %s, \"exchange_qkv_ms\": %s, \"exchange_out_ms\": %s, \"unpack_ms\": %s, "
                "\"bytes_sent\": %lld, \"raw_alltoallv_ms\": %s, \"exchange_over_raw\": %s, "
                "\"max_abs_err_vs_uaa\": %s, \"bitwise_equal_uaa\": %s, \"model_ms\": %s, "
                "\"model_err\": %s, \"imbalance\": %s, \"pad_fraction\": %s, "
                "\"model_gflops\": %s, \"model_gbps\": %s}\n",
                num(r.total).c_str(), num(r.exchange).c_str(), num(r.attention).c_str(),
                num(r.wait).c_str(), num(r.pack).c_str(), num(r.x1).c_str(), num(r.x2).c_str(),
                num(r.unpack).c_str(), static_cast<long long>(r.bytes_sent),
                r.raw < 0 ? "null" : num(r.raw).c_str(),
                r.raw > 0 ? num(r.exchange / r.raw).c_str() : "null", num(r.max_abs_err).c_str(),
                r.bitwise ? "true" : "false", num(r.model_ms).c_str(),
                num(r.model_ms / r.total - 1).c_str(), num(r.cost.imbalance).c_str(),
                num(r.cost.pad_fraction).c_str(), num(rates.flops_per_s / 1e9).c_str(),
                num(rates.bytes_per_s / 1e9).c_str());
  } else {
    if (!r.error.empty()) {
      std::printf("%-13s %7lld  skipped: %s\n", r.strategy.c_str(), static_cast<long long>(r.seq),
                  r.error.c_str());
      return;
    }
    std::printf("%-13s %7lld %9.2f %9.2f %9.2f %8.2f %9.2f %12lld %9.2f %6s %9.2e\n", r.strategy.c_str(),
                static_cast<long long>(r.seq), r.total, r.attention, r.exchange, r.wait, r.raw,
                static_cast<long long>(r.bytes_sent), r.model_ms, r.bitwise ? "yes" : "no",
                r.max_abs_err);
  }
  std::fflush(stdout);
}

void write_csv(const std::string& path, const std::vector<Row>& rows) {
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (!f) throw SweepError("--csv: cannot write " + path);
  std::fprintf(f, "strategy,seq,total_ms,exchange_ms,attention_ms,wait_ms,raw_alltoallv_ms,bytes_sent,"
                  "max_abs_err_vs_uaa,model_ms\n");
  for (const Row& r : rows)
    if (r.error.empty())
      std::fprintf(f, "%s,%lld,%.4f,%.4f,%.4f,%.4f,%.4f,%lld,%.3g,%.4f\n", r.strategy.c_str(),
                   static_cast<long long>(r.seq), r.total, r.exchange, r.attention, r.wait, r.raw,
                   static_cast<long long>(r.bytes_sent), r.max_abs_err, r.model_ms);
  std::fclose(f);
}

// gnuplot needs one block per line to draw: FILE.dat holds the rows grouped by strategy (blocks
// separated by two blank lines, selected with `index`).
void plot(const std::string& png, const std::vector<Row>& rows, const SweepOptions& o, int P) {
  const std::string dat = png + ".dat";
  std::FILE* f = std::fopen(dat.c_str(), "w");
  if (!f) throw SweepError("--plot: cannot write " + dat);
  std::string titles;
  int blocks = 0;
  for (Strategy s : o.strategies) {
    bool any = false;
    for (const Row& r : rows)
      if (r.error.empty() && r.strategy == strategy_name(s)) {
        std::fprintf(f, "%lld %.4f %.4f %.4f\n", static_cast<long long>(r.seq), r.total, r.exchange, r.raw);
        any = true;
      }
    if (!any) continue;
    std::fprintf(f, "\n\n");
    titles += std::string(titles.empty() ? "" : " ") + strategy_name(s);
    ++blocks;
  }
  std::fclose(f);
  const std::string title = (o.preset.empty() ? std::string("heads ") + std::to_string(o.heads) : o.preset) +
                            ", " + std::to_string(P) + " ranks x " + std::to_string(num_threads()) +
                            " thread(s), " + dtype_name(o.dtype);
  const std::string n = std::to_string(blocks - 1);
  const std::string script =
      "set terminal pngcairo size 1000,420 font ',9' noenhanced\n"
      "set output '" + png + "'\n"
      "set key top left\nset grid\nnames = '" + titles + "'\n"
      "set multiplot layout 1,2 title '" + title + "'\n"
      "set xlabel 'total sequence length (tokens)'\nset ylabel 'ms per call (median)'\n"
      "set title 'forward() time'\n"
      "plot for [i=0:" + n + "] '" + dat + "' index i using 1:2 with linespoints title word(names, i+1)\n"
      "set title 'data movement (solid) vs raw MPI_Alltoallv (dashed)'\n"
      "plot for [i=0:" + n + "] '" + dat + "' index i using 1:3 with linespoints linecolor i+1 title word(names, i+1), \\\n"
      "     for [i=0:" + n + "] '" + dat + "' index i using 1:4 with lines dashtype 2 linecolor i+1 notitle\n"
      "unset multiplot\n";
  std::FILE* g = popen("gnuplot", "w");
  if (!g) throw SweepError("--plot: cannot run gnuplot");
  std::fputs(script.c_str(), g);
  if (pclose(g) != 0) throw SweepError("--plot: gnuplot failed (is gnuplot with pngcairo installed?)");
}

int run(const SweepOptions& o, int me, int P) {
  MPI_Comm world = MPI_COMM_WORLD;
  const auto sweep = sweep_lengths(o, P);
  std::shared_ptr<Communicator> comm = make_mpi_communicator(world);
  std::vector<Row> rows;
  detail::CostRates rates{o.compute_gflops * 1e9, o.exchange_gbps * 1e9};
  const bool calibrate = !(rates.flops_per_s > 0 && rates.bytes_per_s > 0);
  if (me == 0 && !o.json)
    std::printf("%-13s %7s %9s %9s %9s %8s %9s %12s %9s %6s %9s\n", "strategy", "seq", "total_ms",
                "attn_ms", "xchg_ms", "wait_ms", "raw_ms", "bytes_sent", "model_ms", "=uaa", "max_err");
  const auto t_start = Clock::now();
  const std::size_t jobs = sweep.size() * o.strategies.size();
  std::size_t done = 0;
  for (const auto& lens : sweep) {
    std::int64_t total = 0, first = 0;
    for (int r = 0; r < P; ++r) {
      total += lens[r];
      if (r < me) first += lens[r];
    }
    const std::int64_t n = lens[me];
    Shard q(o.dtype, n, o.heads, o.head_dim), k(o.dtype, n, o.kv_heads, o.head_dim),
        v(o.dtype, n, o.kv_heads, o.head_dim);
    q.fill(0, first);
    k.fill(1, first);
    v.fill(2, first);
    std::vector<float> uaa_out;
    bool have_uaa = false;
    // uaa first: the reference of the error column.
    std::vector<Strategy> order = o.strategies;
    std::stable_partition(order.begin(), order.end(), [](Strategy s) { return s == Strategy::uaa; });
    for (Strategy st : order) {
      Row row;
      row.strategy = strategy_name(st);
      row.lens = lens;
      row.seq = total;
      AttentionShape shape;
      shape.q_heads = o.heads;
      shape.kv_heads = o.kv_heads;
      shape.head_dim = o.head_dim;
      shape.dtype = o.dtype;
      shape.causal = o.causal;
      shape.strategy = st;
      std::unique_ptr<Plan> plan;
      try {
        plan = std::make_unique<Plan>(Plan::create(*comm, shape, n, n));
      } catch (const Error& e) {  // the same on every rank
        row.error = e.what();
      }
      if (plan) {
        Shard out(o.dtype, n, o.heads, o.head_dim);
        AttentionArgs args;
        args.q = q.cview();
        args.k = k.cview();
        args.v = v.cview();
        args.out = out.view();
        Workspace ws;
        std::vector<std::vector<double>> ph(8);
        for (std::int64_t i = 0; i < o.warmup + o.iters; ++i) {
          PhaseTimes t;
          t.sync_exchanges = true;
          MPI_Barrier(world);
          forward(*comm, *plan, args, ws, &t);
          if (i < o.warmup) continue;
          const double vals[8] = {t.total, t.pack + t.exchange_qkv + t.exchange_out + t.unpack,
                                  t.attention, t.wait, t.pack, t.exchange_qkv, t.exchange_out, t.unpack};
          for (int p = 0; p < 8; ++p) ph[p].push_back(vals[p]);
        }
        double local[8], worst[8];
        for (int p = 0; p < 8; ++p) local[p] = median(ph[p]);
        MPI_Allreduce(local, worst, 8, MPI_DOUBLE, MPI_MAX, world);
        row.total = worst[0];
        row.exchange = worst[1];
        row.attention = worst[2];
        row.wait = worst[3];
        row.pack = worst[4];
        row.x1 = worst[5];
        row.x2 = worst[6];
        row.unpack = worst[7];
        const std::int64_t sent = plan->bytes_sent();
        MPI_Allreduce(&sent, &row.bytes_sent, 1, MPI_INT64_T, MPI_MAX, world);
        row.raw = raw_alltoallv_ms(exchanges_of(plan->data()), o.iters, world);
        // Error against uaa on this rank's rows, then the maximum over ranks.
        std::vector<float> mine(out.elements());
        for (std::size_t i = 0; i < mine.size(); ++i) mine[i] = out.at(i);
        double err = 0;
        int same = 1;
        if (st == Strategy::uaa) {
          uaa_out = mine;
          have_uaa = true;
        } else if (have_uaa) {
          for (std::size_t i = 0; i < mine.size(); ++i) {
            const double d = std::fabs(static_cast<double>(mine[i]) - uaa_out[i]);
            if (!(d <= err)) err = d;
          }
          same = std::memcmp(mine.data(), uaa_out.data(), mine.size() * sizeof(float)) == 0;
        }
        MPI_Allreduce(&err, &row.max_abs_err, 1, MPI_DOUBLE, MPI_MAX, world);
        int all_same = 0;
        MPI_Allreduce(&same, &all_same, 1, MPI_INT, MPI_MIN, world);
        row.bitwise = all_same != 0 && (have_uaa || st == Strategy::uaa);
        if (!have_uaa) row.max_abs_err = NAN;
        detail::LayoutInput in;
        in.q_lens = lens;
        in.kv_lens = lens;
        in.q_heads = o.heads;
        in.kv_heads = o.kv_heads;
        in.head_dim = o.head_dim;
        in.elem_bytes = static_cast<std::int64_t>(dtype_size(o.dtype));
        row.cost = detail::estimate_cost(in, st, o.causal);
        if (calibrate && rates.flops_per_s == 0 && st == Strategy::uaa && row.attention > 0 &&
            row.exchange > 0) {
          rates.flops_per_s = row.cost.max_flops / (row.attention * 1e-3);
          rates.bytes_per_s = static_cast<double>(row.cost.max_moved) / (row.exchange * 1e-3);
        }
        row.model_ms = detail::modelled_ms(row.cost, rates);
      }
      ++done;
      if (me == 0) {
        print_row(row, o, P, rates);
        const double elapsed = ms_since(t_start) / 1e3;
        if (elapsed > 3)
          std::fprintf(stderr, "uaa bench: %zu/%zu done (%s, seq %lld), %.0f s\n", done, jobs,
                       row.strategy.c_str(), static_cast<long long>(row.seq), elapsed);
      }
      rows.push_back(std::move(row));
    }
  }
  if (me == 0) {
    if (!o.csv.empty()) write_csv(o.csv, rows);
    if (!o.plot.empty()) plot(o.plot, rows, o, P);
  }
  return 0;
}

}  // namespace
}  // namespace uaa::bench

int bench_strategies_main(int argc, char** argv) {
  using namespace uaa::bench;
  MPI_Init(&argc, &argv);
  int me = 0, P = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &me);
  MPI_Comm_size(MPI_COMM_WORLD, &P);
  int status = 0;
  try {
    const SweepOptions o = parse_sweep(argc, argv, false);
    if (o.help) {
      if (me == 0) std::fputs(kBenchUsage, stdout);
    } else {
      status = run(o, me, P);
    }
  } catch (const std::exception& e) {
    // Option errors are the same on every rank; a rank-0-only failure (csv, plot) is reported there.
    if (me == 0) std::fprintf(stderr, "uaa bench: %s\n", e.what());
    status = 2;
  }
  MPI_Finalize();
  return status;
}
