// `uaa bench`: every (strategy, sequence) of a sweep on the ranks of MPI_COMM_WORLD, on the same
// deterministic inputs. For each: per-phase medians over the timed calls (max over ranks), the bytes
// each rank sends, a raw MPI_Alltoallv of exactly the same per-peer byte counts timed the same way
// in the same run, the output's largest difference from uaa's, and the cost model's prediction.
//
// Drift: this kind of VM changes speed by 10-15% over minutes, so the strategies of a sequence are
// interleaved call by call. All their plans, workspaces and outputs stay alive (inputs are shared);
// each round makes one forward() call per strategy, each followed by that strategy's raw
// MPI_Alltoallv(s), and the first strategy rotates from round to round. ratio_to_uaa and
// exchange_ratio_to_raw are medians of per-round ratios (each call's time the maximum over ranks),
// so a slow stretch of the machine hits both sides of a ratio.
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
#include "bench_util.h"
#include "plan/cost_model.h"
#include "plan/plan_data.h"
#include "program/program.h"
#include "presets.h"
#include "sweep.h"
#include "uaa/bf16.h"
#include "uaa/mpi.h"
#include "uaa/uaa.h"

namespace uaa::bench {
namespace {

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

// One exchange of a plan's program as per-peer byte counts, packed in peer order. The parts a
// rank exchanges with itself count too (ulysses and ulysses_pad route the rank's own block through
// the exchange; MPI_Alltoallv copies it locally as well).
struct Side {
  std::vector<std::int64_t> sc, sd, rc, rd;
  std::int64_t send_total = 0, recv_total = 0;
};

void per_peer(const std::vector<detail::Part>& parts, const std::vector<detail::PeerParts>& peers,
              std::vector<std::int64_t>& counts, std::vector<std::int64_t>& displs, std::int64_t& total) {
  for (const detail::PeerParts& pp : peers)
    for (std::uint32_t i = pp.begin; i < pp.end; ++i)
      counts[static_cast<std::size_t>(pp.peer)] += parts[i].bytes();
  total = 0;
  for (std::size_t j = 0; j < counts.size(); ++j) {
    displs[j] = total;
    total += counts[j];
  }
}

Side side_of(const detail::ExchangeStep& x, int P) {
  const std::size_t n = static_cast<std::size_t>(P);
  Side s;
  s.sc.assign(n, 0);
  s.sd.assign(n, 0);
  s.rc.assign(n, 0);
  s.rd.assign(n, 0);
  per_peer(x.send_parts, x.send, s.sc, s.sd, s.send_total);
  per_peer(x.recv_parts, x.recv, s.rc, s.rd, s.recv_total);
  return s;
}

// The exchanges of the plan's program: q/k/v in and output back (allgather_kv: K/V in only).
std::vector<Side> exchanges_of(const Plan& plan) {
  const detail::Program& prog = detail::plan_data(plan).forward;
  if (plan.options().strategy == Strategy::allgather_kv) return {side_of(prog.in, plan.ranks())};
  return {side_of(prog.in, plan.ranks()), side_of(prog.out, plan.ranks())};
}

// One exchange of a strategy as a plain MPI_Alltoallv of MPI_BYTE: the plan's per-peer byte counts.
struct RawSide {
  std::vector<int> sc, sd, rc, rd;
  std::int64_t send_total = 0, recv_total = 0;
};

// The strategy's exchanges as int counts; false (on every rank) when a count does not fit an int.
bool raw_sides(const std::vector<Side>& sides, MPI_Comm comm, std::vector<RawSide>* out) {
  out->clear();
  bool fits = true;
  for (const Side& s : sides) {
    const std::size_t P = s.sc.size();
    RawSide r;
    r.sc.resize(P);
    r.sd.resize(P);
    r.rc.resize(P);
    r.rd.resize(P);
    r.send_total = s.send_total;
    r.recv_total = s.recv_total;
    fits = fits && s.send_total < INT_MAX && s.recv_total < INT_MAX;
    for (std::size_t j = 0; j < P && fits; ++j) {
      r.sc[j] = static_cast<int>(s.sc[j]);
      r.sd[j] = static_cast<int>(s.sd[j]);
      r.rc[j] = static_cast<int>(s.rc[j]);
      r.rd[j] = static_cast<int>(s.rd[j]);
    }
    out->push_back(std::move(r));
  }
  int all_fit = fits ? 1 : 0, ok = 0;
  MPI_Allreduce(&all_fit, &ok, 1, MPI_INT, MPI_MIN, comm);
  if (!ok) out->clear();
  return ok != 0;
}

struct Row {
  std::string strategy, error;
  std::vector<std::int64_t> lens;
  std::int64_t seq = 0, bytes_sent = 0;
  double total = 0, exchange = 0, attention = 0, wait = 0, pack = 0, x1 = 0, x2 = 0, unpack = 0;
  double raw = 0, max_abs_err = 0;
  // Medians over rounds of per-round ratios (each side the maximum over ranks of that call); NaN
  // when not available (no uaa row; raw exchange not run).
  double ratio_to_uaa = NAN, exchange_ratio_to_raw = NAN;
  bool bitwise = false;
  detail::CostEstimate cost;
  double model_ms = 0;
};

std::string json_list(const std::vector<std::int64_t>& v) {
  std::string s = "[";
  for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

// "%.<digits>f", or "-" when not available.
std::string fixed(double v, int digits) {
  if (!std::isfinite(v)) return "-";
  char b[32];
  std::snprintf(b, sizeof b, "%.*f", digits, v);
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
                "\"ratio_to_uaa\": %s, \"exchange_ratio_to_raw\": %s, \"max_abs_err_vs_uaa\": %s, \"bitwise_equal_uaa\": %s, \"model_ms\": %s, "
                "\"model_err\": %s, \"imbalance\": %s, \"pad_fraction\": %s, "
                "\"model_gflops\": %s, \"model_gbps\": %s}\n",
                num(r.total).c_str(), num(r.exchange).c_str(), num(r.attention).c_str(),
                num(r.wait).c_str(), num(r.pack).c_str(), num(r.x1).c_str(), num(r.x2).c_str(),
                num(r.unpack).c_str(), static_cast<long long>(r.bytes_sent),
                r.raw < 0 ? "null" : num(r.raw).c_str(),
                r.raw > 0 ? num(r.exchange / r.raw).c_str() : "null", num(r.ratio_to_uaa).c_str(),
                num(r.exchange_ratio_to_raw).c_str(), num(r.max_abs_err).c_str(),
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
    std::printf("%-13s %7lld %9.2f %9.2f %9.2f %8.2f %9.2f %12lld %9.2f %6s %9.2e %7s %8s\n",
                r.strategy.c_str(), static_cast<long long>(r.seq), r.total, r.attention, r.exchange, r.wait,
                r.raw, static_cast<long long>(r.bytes_sent), r.model_ms, r.bitwise ? "yes" : "no",
                r.max_abs_err, fixed(r.ratio_to_uaa, 3).c_str(), fixed(r.exchange_ratio_to_raw, 2).c_str());
  }
  std::fflush(stdout);
}

void write_csv(const std::string& path, const std::vector<Row>& rows) {
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (!f) throw SweepError("--csv: cannot write " + path);
  std::fprintf(f, "strategy,seq,total_ms,exchange_ms,attention_ms,wait_ms,raw_alltoallv_ms,bytes_sent,"
                  "max_abs_err_vs_uaa,model_ms,ratio_to_uaa,exchange_ratio_to_raw\n");
  // An empty field: not available (no uaa in the run; raw exchange not run).
  const auto opt = [](double v) { return std::isfinite(v) ? fixed(v, 4) : std::string(); };
  for (const Row& r : rows)
    if (r.error.empty())
      std::fprintf(f, "%s,%lld,%.4f,%.4f,%.4f,%.4f,%.4f,%lld,%.3g,%.4f,%s,%s\n", r.strategy.c_str(),
                   static_cast<long long>(r.seq), r.total, r.exchange, r.attention, r.wait, r.raw,
                   static_cast<long long>(r.bytes_sent), r.max_abs_err, r.model_ms,
                   opt(r.ratio_to_uaa).c_str(), opt(r.exchange_ratio_to_raw).c_str());
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
        std::fprintf(f, "%lld %.4f %.4f %.4f %s\n", static_cast<long long>(r.seq), r.total, r.exchange,
                     r.raw, std::isfinite(r.ratio_to_uaa) ? fixed(r.ratio_to_uaa, 4).c_str() : "NaN");
        any = true;
      }
    if (!any) continue;
    std::fprintf(f, "\n\n");
    titles += std::string(titles.empty() ? "" : " ") + strategy_name(s);
    ++blocks;
  }
  std::fclose(f);
  // A third panel, the drift-free comparison, when uaa ran.
  bool ratios = false;
  for (const Row& r : rows) ratios = ratios || (r.error.empty() && std::isfinite(r.ratio_to_uaa));
  const std::string title = (o.preset.empty() ? std::string("heads ") + std::to_string(o.heads) : o.preset) +
                            ", " + std::to_string(P) + " ranks x " + std::to_string(num_threads()) +
                            " thread(s), " + dtype_name(o.dtype);
  const std::string n = std::to_string(blocks - 1);
  const std::string script =
      std::string("set terminal pngcairo size ") + (ratios ? "1500" : "1000") + ",420 font ',9' noenhanced\n"
      "set output '" + png + "'\n"
      "set key top left\nset grid\nnames = '" + titles + "'\n"
      "set multiplot layout 1," + (ratios ? "3" : "2") + " title '" + title + "'\n"
      "set xlabel 'total sequence length (tokens)'\nset ylabel 'ms per call (median)'\n"
      "set title 'forward() time'\n"
      "plot for [i=0:" + n + "] '" + dat + "' index i using 1:2 with linespoints title word(names, i+1)\n"
      "set title 'data movement (solid) vs raw MPI_Alltoallv (dashed)'\n"
      "plot for [i=0:" + n + "] '" + dat + "' index i using 1:3 with linespoints linecolor i+1 title word(names, i+1), \\\n"
      "     for [i=0:" + n + "] '" + dat + "' index i using 1:4 with lines dashtype 2 linecolor i+1 notitle\n" +
      (ratios ? "set title 'forward() time / uaa time (median of per-round ratios)'\n"
                "set ylabel 'ratio to uaa'\n"
                "plot for [i=0:" + n + "] '" + dat + "' index i using 1:5 with linespoints linecolor i+1 title word(names, i+1)\n"
              : std::string()) +
      "unset multiplot\n";
  std::FILE* g = popen("gnuplot", "w");
  if (!g) throw SweepError("--plot: cannot run gnuplot");
  std::fputs(script.c_str(), g);
  if (pclose(g) != 0) throw SweepError("--plot: gnuplot failed (is gnuplot with pngcairo installed?)");
}

// One strategy of one sequence: everything its calls need stays alive over the interleaved rounds.
struct Contender {
  Strategy st = Strategy::uaa;
  Row row;
  std::unique_ptr<Plan> plan;  // null: cannot run (row.error says why)
  std::unique_ptr<Shard> out;
  Workspace ws;
  AttentionArgs args;
  std::vector<RawSide> raw;  // empty: the raw exchange does not fit int counts (raw_alltoallv_ms null)
  bool raw_ok = false;
  std::vector<double> phases;  // this rank's [round][8 phases], timed rounds only
  std::vector<double> raw_ms;  // this rank's [round][exchange]
};

constexpr int kPhases = 8;

// Element-wise maximum over ranks (collective).
std::vector<double> max_over_ranks(const std::vector<double>& local, MPI_Comm comm) {
  std::vector<double> worst(local.size());
  if (!local.empty())
    MPI_Allreduce(local.data(), worst.data(), static_cast<int>(local.size()), MPI_DOUBLE, MPI_MAX, comm);
  return worst;
}

// Median of num[i] / den[i] over the i where both are finite and den[i] > 0; NaN if none.
double median_ratio(const std::vector<double>& num, const std::vector<double>& den) {
  std::vector<double> r;
  for (std::size_t i = 0; i < num.size() && i < den.size(); ++i)
    if (std::isfinite(num[i]) && std::isfinite(den[i]) && den[i] > 0) r.push_back(num[i] / den[i]);
  return r.empty() ? NAN : median(r);
}

int run(const SweepOptions& o, int me, int P) {
  MPI_Comm world = MPI_COMM_WORLD;
  const auto sweep = sweep_lengths(o, P);
  std::shared_ptr<Communicator> comm = make_mpi_communicator(world);
  std::vector<Row> rows;
  detail::CostRates rates{o.compute_gflops * 1e9, o.exchange_gbps * 1e9};
  const bool calibrate = !(rates.flops_per_s > 0 && rates.bytes_per_s > 0);
  if (me == 0 && !o.json)
    std::printf("%-13s %7s %9s %9s %9s %8s %9s %12s %9s %6s %9s %7s %8s\n", "strategy", "seq", "total_ms",
                "attn_ms", "xchg_ms", "wait_ms", "raw_ms", "bytes_sent", "model_ms", "=uaa", "max_err",
                "/uaa", "xchg/raw");
  const auto t_start = Clock::now();
  const std::size_t jobs = sweep.size() * o.strategies.size();
  std::size_t done = 0;
  // uaa first: the reference of the error column and of ratio_to_uaa.
  std::vector<Strategy> order = o.strategies;
  std::stable_partition(order.begin(), order.end(), [](Strategy s) { return s == Strategy::uaa; });
  for (const auto& lens : sweep) {
    std::int64_t total = 0, first = 0;
    for (int r = 0; r < P; ++r) {
      total += lens[r];
      if (r < me) first += lens[r];
    }
    const std::int64_t n = lens[me];
    // One set of inputs, shared by every strategy (they all read the same global tensors).
    Shard q(o.dtype, n, o.heads, o.head_dim), k(o.dtype, n, o.kv_heads, o.head_dim),
        v(o.dtype, n, o.kv_heads, o.head_dim);
    q.fill(0, first);
    k.fill(1, first);
    v.fill(2, first);

    // Plans, workspaces and outputs of every strategy, alive together. Plan::create is collective
    // and fails alike on every rank, so every rank has the same list of runnable strategies.
    std::vector<Contender> cs(order.size());
    std::vector<Contender*> active;
    std::int64_t raw_send_max = 0, raw_recv_max = 0;
    for (std::size_t j = 0; j < order.size(); ++j) {
      Contender& c = cs[j];
      c.st = order[j];
      c.row.strategy = strategy_name(c.st);
      c.row.lens = lens;
      c.row.seq = total;
      AttentionShape shape;
      shape.q_heads = o.heads;
      shape.kv_heads = o.kv_heads;
      shape.head_dim = o.head_dim;
      shape.dtype = o.dtype;
      shape.causal = o.causal;
      PlanOptions options;
      options.strategy = c.st;
      try {
        c.plan = std::make_unique<Plan>(Plan::create(*comm, shape, n, n, options));
      } catch (const Error& e) {  // the same on every rank
        c.row.error = e.what();
        continue;
      }
      c.out = std::make_unique<Shard>(o.dtype, n, o.heads, o.head_dim);
      c.args.q = q.cview();
      c.args.k = k.cview();
      c.args.v = v.cview();
      c.args.out = c.out->view();
      c.raw_ok = raw_sides(exchanges_of(*c.plan), world, &c.raw);
      for (const RawSide& r : c.raw) {
        raw_send_max = std::max(raw_send_max, r.send_total);
        raw_recv_max = std::max(raw_recv_max, r.recv_total);
      }
      c.phases.assign(static_cast<std::size_t>(o.iters) * kPhases, 0.0);
      c.raw_ms.assign(static_cast<std::size_t>(o.iters) * c.raw.size(), 0.0);
      active.push_back(&c);
    }
    // The raw exchanges only move bytes: one pair of buffers serves every strategy.
    std::vector<std::byte> raw_send(static_cast<std::size_t>(raw_send_max) + 64),
        raw_recv(static_cast<std::size_t>(raw_recv_max) + 64);

    // Rounds: --warmup untimed, then --iters timed. In each, every runnable strategy makes one
    // forward() call followed by its raw MPI_Alltoallv(s); the first strategy rotates per round.
    // The order is the same on every rank.
    const std::int64_t S = static_cast<std::int64_t>(active.size());
    for (std::int64_t i = -o.warmup; i < o.iters && S > 0; ++i) {
      const std::int64_t start = ((i % S) + S) % S;
      for (std::int64_t j = 0; j < S; ++j) {
        Contender& c = *active[static_cast<std::size_t>((start + j) % S)];
        PhaseTimes t;
        t.sync_exchanges = true;
        MPI_Barrier(world);
        forward(*c.plan, c.args, c.ws, &t);
        if (i >= 0) {
          const double vals[kPhases] = {t.total, t.pack + t.exchange_qkv + t.exchange_out + t.unpack,
                                        t.attention, t.wait, t.pack, t.exchange_qkv, t.exchange_out,
                                        t.unpack};
          std::copy(vals, vals + kPhases, c.phases.begin() + i * kPhases);
        }
        // Each exchange preceded by a barrier, as forward() does under sync_exchanges.
        for (std::size_t x = 0; x < c.raw.size(); ++x) {
          const RawSide& r = c.raw[x];
          MPI_Barrier(world);
          const auto t0 = Clock::now();
          MPI_Alltoallv(raw_send.data(), r.sc.data(), r.sd.data(), MPI_BYTE, raw_recv.data(), r.rc.data(),
                        r.rd.data(), MPI_BYTE, world);
          const double ms = ms_since(t0);
          if (i >= 0) c.raw_ms[static_cast<std::size_t>(i) * c.raw.size() + x] = ms;
        }
      }
      if (me == 0 && i >= 0) {
        const double elapsed = ms_since(t_start) / 1e3;
        if (elapsed > 3)
          std::fprintf(stderr, "uaa bench: seq %lld, round %lld/%lld of %lld strateg%s, %.0f s\n",
                       static_cast<long long>(total), static_cast<long long>(i + 1),
                       static_cast<long long>(o.iters), static_cast<long long>(S), S == 1 ? "y" : "ies",
                       elapsed);
      }
    }

    // Per-round totals of uaa (max over ranks): the denominators of ratio_to_uaa.
    std::vector<double> uaa_round_total;
    const Contender* uaa_c = nullptr;
    for (const Contender* c : active)
      if (c->st == Strategy::uaa && !uaa_c) uaa_c = c;
    for (Contender& c : cs) {
      Row& row = c.row;
      if (c.plan) {
        const std::size_t iters = static_cast<std::size_t>(o.iters);
        // Per phase: median over rounds on this rank, then the maximum over ranks.
        double local[kPhases], worst[kPhases];
        for (int p = 0; p < kPhases; ++p) {
          std::vector<double> xs(iters);
          for (std::size_t i = 0; i < iters; ++i) xs[i] = c.phases[i * kPhases + p];
          local[p] = median(xs);
        }
        MPI_Allreduce(local, worst, kPhases, MPI_DOUBLE, MPI_MAX, world);
        row.total = worst[0];
        row.exchange = worst[1];
        row.attention = worst[2];
        row.wait = worst[3];
        row.pack = worst[4];
        row.x1 = worst[5];
        row.x2 = worst[6];
        row.unpack = worst[7];
        // Per call: the maximum over ranks, for the per-round ratios.
        const std::vector<double> call_max = max_over_ranks(c.phases, world);
        std::vector<double> round_total(iters), round_exchange(iters);
        for (std::size_t i = 0; i < iters; ++i) {
          round_total[i] = call_max[i * kPhases + 0];
          round_exchange[i] = call_max[i * kPhases + 1];
        }
        if (&c == uaa_c) uaa_round_total = round_total;
        if (uaa_c) row.ratio_to_uaa = median_ratio(round_total, uaa_round_total);
        // Raw exchange: per exchange the median over rounds, max over ranks, summed over exchanges
        // (as raw_alltoallv_ms always was); per round the sum over exchanges of the per-call maxima.
        if (!c.raw_ok) {
          row.raw = -1;
        } else {
          const std::size_t X = c.raw.size();
          std::vector<double> side_local(X), side_worst(X);
          for (std::size_t x = 0; x < X; ++x) {
            std::vector<double> xs(iters);
            for (std::size_t i = 0; i < iters; ++i) xs[i] = c.raw_ms[i * X + x];
            side_local[x] = median(xs);
          }
          side_worst = max_over_ranks(side_local, world);
          row.raw = 0;
          for (double w : side_worst) row.raw += w;
          const std::vector<double> raw_max = max_over_ranks(c.raw_ms, world);
          std::vector<double> round_raw(iters, 0.0);
          for (std::size_t i = 0; i < iters; ++i)
            for (std::size_t x = 0; x < X; ++x) round_raw[i] += raw_max[i * X + x];
          if (X > 0) row.exchange_ratio_to_raw = median_ratio(round_exchange, round_raw);
        }
        const std::int64_t sent = c.plan->bytes_sent();
        MPI_Allreduce(&sent, &row.bytes_sent, 1, MPI_INT64_T, MPI_MAX, world);
        // Error against uaa on this rank's rows (the last call's output; every call computes the
        // same), then the maximum over ranks.
        double err = 0;
        int same = 1;
        if (uaa_c && &c != uaa_c) {
          const Shard& mine = *c.out;
          const Shard& ref = *uaa_c->out;
          for (std::size_t e = 0; e < mine.elements(); ++e) {
            const double d = std::fabs(static_cast<double>(mine.at(e)) - ref.at(e));
            if (!(d <= err)) err = d;
          }
          same = std::memcmp(mine.bytes.data(), ref.bytes.data(), mine.elements() * dtype_size(o.dtype)) == 0;
        }
        MPI_Allreduce(&err, &row.max_abs_err, 1, MPI_DOUBLE, MPI_MAX, world);
        int all_same = 0;
        MPI_Allreduce(&same, &all_same, 1, MPI_INT, MPI_MIN, world);
        row.bitwise = all_same != 0 && uaa_c != nullptr;
        if (!uaa_c) row.max_abs_err = NAN;
        detail::Geometry g;
        g.q_lens = lens;
        g.kv_lens = lens;
        g.q_heads = o.heads;
        g.kv_heads = o.kv_heads;
        g.head_dim = o.head_dim;
        g.elem_bytes = static_cast<std::int64_t>(dtype_size(o.dtype));
        g.causal = o.causal;
        row.cost = detail::estimate_cost(g, c.st);
        if (calibrate && rates.flops_per_s == 0 && c.st == Strategy::uaa && row.attention > 0 &&
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
  return mpi_benchmark_main(argc, argv, SweepFor::bench, "uaa bench", kBenchUsage, run);
}
