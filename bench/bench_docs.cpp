// `uaa bench docs`: packed documents on the ranks of MPI_COMM_WORLD. In one run, on the same inputs:
//   packed       one forward() (and backward()) over all documents: one plan with uaa::Documents
//   one_by_one   every document as its own plan and call, back to back; each rank holds the tokens
//                of the document that the packed layout gives it (the same input rows, read in
//                place through views into the packed tensors), so the two differ only in how the
//                work is cut and called
//   calibration  one sequence of --calib-seq tokens with no documents, split evenly: its measured
//                attention FLOP/s and data-movement bytes/s are the cost model's rates
//                (src/plan/cost_model.h), as `uaa bench` calibrates on its first uaa row
// Rounds interleave the three (the first rotates per round) so the VM's drift hits all of them.
// A round times each mode's forward calls (and then its backward calls) between a barrier and the
// last call's return on each rank; per round the maximum over ranks is taken, then the median over
// rounds. Phases: per rank the sum over the mode's calls, median over rounds, then the maximum over
// ranks (rank_* lists give every rank's median, so the imbalance in practice is visible). Forward
// calls run with PhaseTimes::sync_exchanges, as in `uaa bench`.
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "bench_docs.h"
#include "bench_util.h"
#include "plan/cost_model.h"
#include "plan/layout.h"
#include "presets.h"
#include "sweep.h"
#include "uaa/backward.h"
#include "uaa/bf16.h"
#include "uaa/mpi.h"
#include "uaa/uaa.h"

namespace uaa::bench {
namespace {

// One rank's [B][tokens][heads][D] tensor.
struct Buf {
  DType dtype = DType::f32;
  std::int64_t batch = 1, tokens = 0, heads = 0, dim = 0;
  std::vector<std::byte> bytes;
  Buf(DType dt, std::int64_t b, std::int64_t t, std::int64_t h, std::int64_t d)
      : dtype(dt), batch(b), tokens(t), heads(h), dim(d) {
    bytes.resize(elements() * dtype_size(dt) + 64);
  }
  std::size_t elements() const { return static_cast<std::size_t>(batch * tokens * heads * dim); }
  // Global token `first + t` of sequence b, head h: value_at over the batch's heads.
  void fill(int tensor, std::int64_t first) {
    std::size_t i = 0;
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t t = 0; t < tokens; ++t)
        for (std::int64_t h = 0; h < heads; ++h)
          for (std::int64_t d = 0; d < dim; ++d, ++i) {
            const float v = value_at(tensor, first + t, b * heads + h, d);
            if (dtype == DType::f32) {
              std::memcpy(bytes.data() + 4 * i, &v, 4);
            } else {
              const std::uint16_t x = uaa::bf16_from_f32(v);
              std::memcpy(bytes.data() + 2 * i, &x, 2);
            }
          }
  }
  float at(std::size_t i) const {
    if (dtype == DType::f32) {
      float v;
      std::memcpy(&v, bytes.data() + 4 * i, 4);
      return v;
    }
    std::uint16_t x;
    std::memcpy(&x, bytes.data() + 2 * i, 2);
    return uaa::f32_from_bf16(x);
  }
  // Tokens [off, off + n) of every sequence of the batch.
  Tensor view(std::int64_t off, std::int64_t n) {
    Tensor t = contiguous(bytes.data() + static_cast<std::size_t>(off * heads * dim) * dtype_size(dtype),
                          n, heads, dim, dtype);
    if (batch > 1) t.batch_stride = tokens * heads * dim;
    return t;
  }
  Tensor view() { return view(0, tokens); }
};

// The phases one mode records per round on this rank (sums over its calls).
enum Field {
  kFwdWall, kFwdAttention, kFwdExchange, kFwdWait, kFwdHandshake,
  kBwdWall, kBwdKernel, kBwdExchange, kBwdReduce, kBwdHandshake, kFields
};
const char* const kFieldNames[kFields] = {"fwd_ms", "fwd_attention_ms", "fwd_exchange_ms",
                                          "fwd_wait_ms", "fwd_handshake_ms", "bwd_ms",
                                          "bwd_kernel_ms", "bwd_exchange_ms", "bwd_reduce_ms",
                                          "bwd_handshake_ms"};

// One call of a mode: a plan and its views into the mode's buffers.
struct Call {
  std::unique_ptr<Plan> plan;
  AttentionArgs args;
  BackwardArgs bargs;
  SavedForward saved;
  detail::CostEstimate cost;
  std::int64_t bwd_bytes = 0;  // this rank's backward bytes sent + received (saved mode)
};

struct Mode {
  std::string name;
  std::vector<Call> calls;
  Workspace ws;  // one for all the mode's calls, as a caller running them one by one would
  std::unique_ptr<Buf> out, dq, dk, dv;
  std::vector<float> lse;
  std::vector<double> rounds;  // [round][field], this rank
  // Results.
  double med[kFields] = {};         // call times: median over rounds of the max over ranks
  double phase[kFields] = {};       // phases: max over ranks of the per-rank median
  std::vector<double> rank_fwd_attention, rank_bwd_kernel;  // per-rank medians (rank 0 only)
  std::vector<double> rank_flops;   // modelled, summed over calls, per rank
  double model_ms = 0, bwd_model_ms = 0;
  // Modelled work summed over the calls: forward FLOPs, forward bytes moved, backward FLOPs,
  // backward bytes (each call's maximum over ranks).
  double work[4] = {};
  double model_err_paired = NAN, bwd_model_err_paired = NAN;
  std::vector<double> round_max;    // [round][field] maximum over ranks
};

std::int64_t overlap(std::int64_t a0, std::int64_t a1, std::int64_t b0, std::int64_t b1) {
  return std::max<std::int64_t>(0, std::min(a1, b1) - std::max(a0, b0));
}

std::string json_doubles(const std::vector<double>& v) {
  std::string s = "[";
  for (std::size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += num(v[i]);
  }
  return s + "]";
}

std::string json_ints(const std::vector<std::int64_t>& v) {
  std::string s = "[";
  for (std::size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  return s + "]";
}

// max / mean of a list (1 when the mean is 0).
double imbalance(const std::vector<double>& v) {
  double mx = 0, mean = 0;
  for (double x : v) {
    mx = std::max(mx, x);
    mean += x / static_cast<double>(v.size());
  }
  return mean > 0 ? mx / mean : 1.0;
}

// The views of tokens [q_off, +nq) and [kv_off, +nkv) of the mode's buffers for one call.
void bind(Call& c, Mode& m, Buf& q, Buf& k, Buf& v, Buf& dout, std::int64_t q_off, std::int64_t nq,
          std::int64_t kv_off, std::int64_t nkv, bool backward, std::int64_t heads) {
  c.args.q = q.view(q_off, nq);
  c.args.k = k.view(kv_off, nkv);
  c.args.v = v.view(kv_off, nkv);
  c.args.out = m.out->view(q_off, nq);
  if (!backward) return;
  const std::int64_t B = q.batch;
  c.args.lse = m.lse.data() + q_off * heads;
  c.args.lse_token_stride = heads;
  c.args.lse_batch_stride = B > 1 ? q.tokens * heads : 0;
  c.bargs.q = c.args.q;
  c.bargs.k = c.args.k;
  c.bargs.v = c.args.v;
  c.bargs.out = c.args.out;
  c.bargs.lse = c.args.lse;
  c.bargs.lse_token_stride = c.args.lse_token_stride;
  c.bargs.lse_batch_stride = c.args.lse_batch_stride;
  c.bargs.dout = dout.view(q_off, nq);
  c.bargs.dq = m.dq->view(q_off, nq);
  c.bargs.dk = m.dk->view(kv_off, nkv);
  c.bargs.dv = m.dv->view(kv_off, nkv);
}

void alloc_outputs(Mode& m, const SweepOptions& o, std::int64_t nq, std::int64_t nkv) {
  m.out = std::make_unique<Buf>(o.dtype, o.batch, nq, o.heads, o.head_dim);
  if (!o.backward) return;
  m.lse.assign(static_cast<std::size_t>(o.batch * nq * o.heads) + 1, 0.0f);
  m.dq = std::make_unique<Buf>(o.dtype, o.batch, nq, o.heads, o.head_dim);
  m.dk = std::make_unique<Buf>(o.dtype, o.batch, nkv, o.kv_heads, o.head_dim);
  m.dv = std::make_unique<Buf>(o.dtype, o.batch, nkv, o.kv_heads, o.head_dim);
}

// One round of a mode on this rank: its forward calls, then (with --backward) its backward calls.
void run_round(Mode& m, bool backward, double* f) {
  std::fill(f, f + kFields, 0.0);
  MPI_Barrier(MPI_COMM_WORLD);
  auto t0 = Clock::now();
  for (Call& c : m.calls) {
    PhaseTimes t;
    t.sync_exchanges = true;
    if (backward) forward(*c.plan, c.args, m.ws, c.saved, &t);
    else forward(*c.plan, c.args, m.ws, &t);
    f[kFwdAttention] += t.attention;
    f[kFwdExchange] += t.pack + t.exchange_qkv + t.exchange_out + t.unpack;
    f[kFwdWait] += t.wait;
    f[kFwdHandshake] += t.handshake;
  }
  f[kFwdWall] = ms_since(t0);
  if (!backward) return;
  MPI_Barrier(MPI_COMM_WORLD);
  t0 = Clock::now();
  for (Call& c : m.calls) {
    BackwardTimes t;
    uaa::backward(*c.plan, c.bargs, m.ws, c.saved, &t);
    f[kBwdKernel] += t.kernel;
    f[kBwdExchange] += t.exchange_in + t.carry + t.exchange_out;
    f[kBwdReduce] += t.reduce + t.prepare;
    f[kBwdHandshake] += t.handshake;
  }
  f[kBwdWall] = ms_since(t0);
}

// Largest |a - b| over the elements, and whether the bytes are equal.
void compare(const Buf& a, const Buf& b, double* err, int* same) {
  for (std::size_t e = 0; e < a.elements(); ++e) {
    const double d = std::fabs(static_cast<double>(a.at(e)) - b.at(e));
    if (!(d <= *err)) *err = d;
  }
  if (std::memcmp(a.bytes.data(), b.bytes.data(), a.elements() * dtype_size(a.dtype)) != 0) *same = 0;
}

int run(const SweepOptions& o, int me, int P) {
  MPI_Comm world = MPI_COMM_WORLD;
  std::shared_ptr<Communicator> comm = make_mpi_communicator(world);
  const std::vector<std::int64_t> q_lens = sweep_lengths(o, P).at(0);
  const std::vector<std::int64_t> kv_lens = kv_lengths(o, q_lens);
  const std::vector<std::int64_t>& docs = o.docs;
  const std::vector<std::int64_t>& kv_docs = o.kv_docs.empty() ? o.docs : o.kv_docs;
  using detail::prefix_sums;
  const std::vector<std::int64_t> Q = prefix_sums(q_lens), KV = prefix_sums(kv_lens);
  const std::vector<std::int64_t> DQ = prefix_sums(docs), DKV = prefix_sums(kv_docs);
  const std::int64_t nq = q_lens[me], nkv = kv_lens[me];
  const std::size_t R = static_cast<std::size_t>(o.iters);

  AttentionShape shape;
  shape.q_heads = o.heads;
  shape.kv_heads = o.kv_heads;
  shape.head_dim = o.head_dim;
  shape.dtype = o.dtype;
  shape.causal = o.causal;
  shape.return_lse = o.backward;
  shape.batch = o.batch;
  shape.window_left = o.window_left;
  shape.window_right = o.window_right;

  // The packed inputs (and dO), read by packed and one_by_one alike.
  Buf q(o.dtype, o.batch, nq, o.heads, o.head_dim), k(o.dtype, o.batch, nkv, o.kv_heads, o.head_dim),
      v(o.dtype, o.batch, nkv, o.kv_heads, o.head_dim), dout(o.dtype, o.batch, o.backward ? nq : 0, o.heads, o.head_dim);
  q.fill(0, Q[me]);
  k.fill(1, KV[me]);
  v.fill(2, KV[me]);
  if (o.backward) dout.fill(3, Q[me]);

  std::vector<std::unique_ptr<Mode>> modes;
  // packed
  {
    auto m = std::make_unique<Mode>();
    m->name = "packed";
    alloc_outputs(*m, o, nq, nkv);
    Call& c = m->calls.emplace_back();
    c.plan = std::make_unique<Plan>(Plan::create(*comm, shape, nq, nkv, Documents{docs, o.kv_docs}));
    bind(c, *m, q, k, v, dout, 0, nq, 0, nkv, o.backward, o.heads);
    c.cost = detail::estimate_cost(geometry_for(o, q_lens, kv_lens, o.backward), Strategy::uaa);
    c.bwd_bytes = o.backward ? c.plan->backward_bytes_sent(true) + c.plan->backward_bytes_received(true) : 0;
    modes.push_back(std::move(m));
  }
  // one_by_one: document d's tokens on each rank are those the packed cut gives that rank.
  std::int64_t straddling = 0;
  {
    auto m = std::make_unique<Mode>();
    m->name = "one_by_one";
    alloc_outputs(*m, o, nq, nkv);
    SweepOptions one = o;
    one.docs.clear();
    one.kv_docs.clear();
    for (std::size_t d = 0; d < docs.size(); ++d) {
      if (docs[d] == 0) continue;  // nothing to compute
      std::vector<std::int64_t> ql(static_cast<std::size_t>(P)), kl(static_cast<std::size_t>(P));
      int holders = 0;
      for (int r = 0; r < P; ++r) {
        ql[r] = overlap(DQ[d], DQ[d + 1], Q[r], Q[r + 1]);
        kl[r] = overlap(DKV[d], DKV[d + 1], KV[r], KV[r + 1]);
        holders += ql[r] > 0;
      }
      straddling += holders > 1;
      Call& c = m->calls.emplace_back();
      c.plan = std::make_unique<Plan>(Plan::from_lengths(*comm, shape, ql, kl));
      const std::int64_t q_off = std::clamp(DQ[d] - Q[me], std::int64_t{0}, nq);
      const std::int64_t kv_off = std::clamp(DKV[d] - KV[me], std::int64_t{0}, nkv);
      bind(c, *m, q, k, v, dout, q_off, ql[me], kv_off, kl[me], o.backward, o.heads);
      c.cost = detail::estimate_cost(geometry_for(one, ql, kl, o.backward), Strategy::uaa);
      c.bwd_bytes = o.backward ? c.plan->backward_bytes_sent(true) + c.plan->backward_bytes_received(true) : 0;
    }
    modes.push_back(std::move(m));
  }
  // calibration: one sequence, no documents, its own inputs.
  std::unique_ptr<Buf> cq, ck, cv, cdout;
  if (o.calib_seq > 0) {
    auto m = std::make_unique<Mode>();
    m->name = "calibration";
    SweepOptions one = o;
    one.docs.clear();
    one.kv_docs.clear();
    const std::vector<std::int64_t> cl = even_split(o.calib_seq, P);
    const std::vector<std::int64_t> C = detail::prefix_sums(cl);
    const std::int64_t n = cl[me];
    cq = std::make_unique<Buf>(o.dtype, o.batch, n, o.heads, o.head_dim);
    ck = std::make_unique<Buf>(o.dtype, o.batch, n, o.kv_heads, o.head_dim);
    cv = std::make_unique<Buf>(o.dtype, o.batch, n, o.kv_heads, o.head_dim);
    cdout = std::make_unique<Buf>(o.dtype, o.batch, o.backward ? n : 0, o.heads, o.head_dim);
    cq->fill(0, C[me]);
    ck->fill(1, C[me]);
    cv->fill(2, C[me]);
    if (o.backward) cdout->fill(3, C[me]);
    alloc_outputs(*m, o, n, n);
    Call& c = m->calls.emplace_back();
    c.plan = std::make_unique<Plan>(Plan::create(*comm, shape, n, n));
    bind(c, *m, *cq, *ck, *cv, *cdout, 0, n, 0, n, o.backward, o.heads);
    c.cost = detail::estimate_cost(geometry_for(one, cl, cl, o.backward), Strategy::uaa);
    c.bwd_bytes = o.backward ? c.plan->backward_bytes_sent(true) + c.plan->backward_bytes_received(true) : 0;
    modes.push_back(std::move(m));
  }

  // Rounds.
  const auto t_start = Clock::now();
  const std::int64_t M = static_cast<std::int64_t>(modes.size());
  for (auto& m : modes) m->rounds.assign(R * kFields, 0.0);
  double scratch[kFields];
  for (std::int64_t i = -o.warmup; i < o.iters; ++i) {
    const std::int64_t start = ((i % M) + M) % M;
    for (std::int64_t j = 0; j < M; ++j) {
      Mode& m = *modes[static_cast<std::size_t>((start + j) % M)];
      run_round(m, o.backward, i >= 0 ? m.rounds.data() + i * kFields : scratch);
    }
    if (me == 0 && ms_since(t_start) > 3e3) {
      if (i < 0)
        std::fprintf(stderr, "uaa bench docs: warm-up round %lld/%lld done, %.0f s\n",
                     static_cast<long long>(i + o.warmup + 1), static_cast<long long>(o.warmup),
                     ms_since(t_start) / 1e3);
      else
        std::fprintf(stderr, "uaa bench docs: round %lld/%lld done, %.0f s\n",
                     static_cast<long long>(i + 1), static_cast<long long>(o.iters),
                     ms_since(t_start) / 1e3);
    }
  }

  // Per mode: call times, phases, per-rank lists, modelled work.
  for (auto& mp : modes) {
    Mode& m = *mp;
    m.round_max.assign(R * kFields, 0.0);
    MPI_Allreduce(m.rounds.data(), m.round_max.data(), static_cast<int>(R * kFields), MPI_DOUBLE,
                  MPI_MAX, world);
    double local[kFields], worst[kFields];
    for (int f = 0; f < kFields; ++f) {
      std::vector<double> xs(R), ms(R);
      for (std::size_t i = 0; i < R; ++i) {
        xs[i] = m.rounds[i * kFields + f];
        ms[i] = m.round_max[i * kFields + f];
      }
      local[f] = median(xs);
      m.med[f] = median(ms);
    }
    MPI_Allreduce(local, worst, kFields, MPI_DOUBLE, MPI_MAX, world);
    std::copy(worst, worst + kFields, m.phase);
    m.rank_fwd_attention.assign(static_cast<std::size_t>(P), 0.0);
    m.rank_bwd_kernel.assign(static_cast<std::size_t>(P), 0.0);
    MPI_Gather(&local[kFwdAttention], 1, MPI_DOUBLE, m.rank_fwd_attention.data(), 1, MPI_DOUBLE, 0, world);
    MPI_Gather(&local[kBwdKernel], 1, MPI_DOUBLE, m.rank_bwd_kernel.data(), 1, MPI_DOUBLE, 0, world);
    m.rank_flops.assign(static_cast<std::size_t>(P), 0.0);
    for (const Call& c : m.calls)
      for (int r = 0; r < P; ++r) m.rank_flops[r] += c.cost.ranks[r].flops;
  }

  // Rates: from the calibration's attention and exchange phases (or given).
  detail::CostRates rates{o.compute_gflops * 1e9, o.exchange_gbps * 1e9};
  detail::CostRates bwd_rates = rates;  // backward: 2.5x the forward FLOPs, backward bytes
  constexpr double kBwdFlops = 2.5;
  std::vector<std::int64_t> bwd_bytes_max;  // per call of every mode, max over ranks
  for (auto& mp : modes)
    for (const Call& c : mp->calls) bwd_bytes_max.push_back(c.bwd_bytes);
  MPI_Allreduce(MPI_IN_PLACE, bwd_bytes_max.data(), static_cast<int>(bwd_bytes_max.size()),
                MPI_INT64_T, MPI_MAX, world);
  const Mode* calib = o.calib_seq > 0 ? modes.back().get() : nullptr;
  if (calib && !(rates.flops_per_s > 0 && rates.bytes_per_s > 0)) {
    const detail::CostEstimate& cc = calib->calls[0].cost;
    rates.flops_per_s = cc.max_flops / (calib->phase[kFwdAttention] * 1e-3);
    rates.bytes_per_s = static_cast<double>(cc.max_moved) / (calib->phase[kFwdExchange] * 1e-3);
    if (o.backward) {
      bwd_rates.flops_per_s = kBwdFlops * cc.max_flops / (calib->phase[kBwdKernel] * 1e-3);
      bwd_rates.bytes_per_s = static_cast<double>(bwd_bytes_max.back()) / (calib->phase[kBwdExchange] * 1e-3);
    }
  }
  // Each mode's modelled work: the model is linear in it (time = FLOPs / rate + bytes / rate, each
  // the maximum over ranks, summed over the mode's calls).
  {
    std::size_t at = 0;
    for (auto& mp : modes) {
      Mode& m = *mp;
      for (const Call& c : m.calls) {
        m.work[0] += c.cost.max_flops;
        m.work[1] += static_cast<double>(c.cost.max_moved);
        m.work[2] += kBwdFlops * c.cost.max_flops;
        m.work[3] += static_cast<double>(bwd_bytes_max[at++]);
      }
    }
  }
  auto model = [](const double* work, const detail::CostRates& r) {
    return (r.flops_per_s > 0 ? 1e3 * work[0] / r.flops_per_s : 0) +
           (r.bytes_per_s > 0 ? 1e3 * work[1] / r.bytes_per_s : 0);
  };
  for (auto& mp : modes) {
    Mode& m = *mp;
    m.model_ms = model(m.work, rates);
    if (o.backward) m.bwd_model_ms = model(m.work + 2, bwd_rates);
  }
  // Paired per round: each round's calibration rates against the same round's times (the median
  // over rounds of model / measured), so a slow stretch of the machine hits both sides.
  if (calib && !(o.compute_gflops > 0 && o.exchange_gbps > 0)) {
    for (auto& mp : modes) {
      Mode& m = *mp;
      std::vector<double> fwd, bwd;
      for (std::size_t i = 0; i < R; ++i) {
        const double* c = calib->round_max.data() + i * kFields;
        const double* t = m.round_max.data() + i * kFields;
        const detail::CostRates rf{calib->work[0] / (c[kFwdAttention] * 1e-3),
                                   calib->work[1] / (c[kFwdExchange] * 1e-3)};
        fwd.push_back(model(m.work, rf) / t[kFwdWall]);
        if (o.backward) {
          const detail::CostRates rb{calib->work[2] / (c[kBwdKernel] * 1e-3),
                                     calib->work[3] / (c[kBwdExchange] * 1e-3)};
          bwd.push_back(model(m.work + 2, rb) / t[kBwdWall]);
        }
      }
      m.model_err_paired = median(fwd) - 1;
      if (o.backward) m.bwd_model_err_paired = median(bwd) - 1;
    }
  }

  // Packed against one by one, paired per round (each side the maximum over ranks).
  const Mode& packed = *modes[0];
  const Mode& obo = *modes[1];
  // Median over rounds of packed / one_by_one of the sum of the given fields.
  auto ratio = [&](std::initializer_list<int> fields) {
    std::vector<double> r;
    for (std::size_t i = 0; i < R; ++i) {
      double a = 0, b = 0;
      for (int f : fields) {
        a += packed.round_max[i * kFields + f];
        b += obo.round_max[i * kFields + f];
      }
      if (b > 0) r.push_back(a / b);
    }
    return r.empty() ? NAN : median(r);
  };
  const double ratio_fwd = ratio({kFwdWall});
  const double ratio_bwd = o.backward ? ratio({kBwdWall}) : NAN;
  const double ratio_step = o.backward ? ratio({kFwdWall, kBwdWall}) : NAN;

  // Outputs (and gradients) of packed against one by one.
  double err = 0;
  int same = 1;
  compare(*packed.out, *obo.out, &err, &same);
  if (o.backward) {
    compare(*packed.dq, *obo.dq, &err, &same);
    compare(*packed.dk, *obo.dk, &err, &same);
    compare(*packed.dv, *obo.dv, &err, &same);
  }
  double err_all = 0;
  int same_all = 0;
  MPI_Allreduce(&err, &err_all, 1, MPI_DOUBLE, MPI_MAX, world);
  MPI_Allreduce(&same, &same_all, 1, MPI_INT, MPI_MIN, world);

  if (me != 0) return 0;
  const std::int64_t q_total = sum(q_lens), kv_total = sum(kv_lens);
  if (o.json) {
    for (const auto& mp : modes) {
      const Mode& m = *mp;
      std::printf("{\"bench\": \"docs\", \"mode\": \"%s\", \"ranks\": %d, \"threads\": %d, "
                  "\"kernel\": \"%s\", \"preset\": \"%s\", \"documents\": %zu, \"q_total\": %lld, "
                  "\"kv_total\": %lld, \"lens\": %s, \"heads\": %lld, \"kv_heads\": %lld, "
                  "\"head_dim\": %lld, \"dtype\": \"%s\", \"causal\": %s, \"batch\": %lld, "
                  "\"window\": [%lld, %lld], \"calls\": %zu, \"iters\": %lld",
                  m.name.c_str(), P, num_threads(), kernel_name(), o.preset.c_str(), docs.size(),
                  static_cast<long long>(q_total), static_cast<long long>(kv_total),
                  json_ints(q_lens).c_str(), static_cast<long long>(o.heads),
                  static_cast<long long>(o.kv_heads), static_cast<long long>(o.head_dim),
                  dtype_name(o.dtype), o.causal ? "true" : "false", static_cast<long long>(o.batch),
                  static_cast<long long>(o.window_left), static_cast<long long>(o.window_right),
                  m.calls.size(), static_cast<long long>(o.iters));
      std::vector<double> per_round(R);
      for (std::size_t i = 0; i < R; ++i) per_round[i] = m.round_max[i * kFields + kFwdWall];
      std::printf(", \"fwd_ms\": %s, \"round_fwd_ms\": %s", num(m.med[kFwdWall]).c_str(),
                  json_doubles(per_round).c_str());
      for (int f = kFwdAttention; f <= kFwdHandshake; ++f)
        std::printf(", \"%s\": %s", kFieldNames[f], num(m.phase[f]).c_str());
      std::printf(", \"rank_fwd_attention_ms\": %s, \"measured_fwd_imbalance\": %s, "
                  "\"rank_model_gflop\": %s, \"model_imbalance\": %s, \"model_ms\": %s, "
                  "\"model_err\": %s, \"model_err_paired\": %s",
                  json_doubles(m.rank_fwd_attention).c_str(), num(imbalance(m.rank_fwd_attention)).c_str(),
                  json_doubles([&] {
                    std::vector<double> g = m.rank_flops;
                    for (double& x : g) x /= 1e9;
                    return g;
                  }()).c_str(),
                  num(imbalance(m.rank_flops)).c_str(), num(m.model_ms).c_str(),
                  num(m.model_ms / m.med[kFwdWall] - 1).c_str(), num(m.model_err_paired).c_str());
      if (o.backward) {
        for (std::size_t i = 0; i < R; ++i) per_round[i] = m.round_max[i * kFields + kBwdWall];
        std::printf(", \"bwd_ms\": %s, \"round_bwd_ms\": %s", num(m.med[kBwdWall]).c_str(),
                    json_doubles(per_round).c_str());
        for (int f = kBwdKernel; f <= kBwdHandshake; ++f)
          std::printf(", \"%s\": %s", kFieldNames[f], num(m.phase[f]).c_str());
        std::vector<double> step(R);
        for (std::size_t i = 0; i < R; ++i)
          step[i] = m.round_max[i * kFields + kFwdWall] + m.round_max[i * kFields + kBwdWall];
        std::printf(", \"fwd_bwd_ms\": %s, \"rank_bwd_kernel_ms\": %s, \"measured_bwd_imbalance\": %s, "
                    "\"bwd_model_ms\": %s, \"bwd_model_err\": %s, \"bwd_model_err_paired\": %s",
                    num(median(step)).c_str(), json_doubles(m.rank_bwd_kernel).c_str(),
                    num(imbalance(m.rank_bwd_kernel)).c_str(), num(m.bwd_model_ms).c_str(),
                    num(m.bwd_model_ms / m.med[kBwdWall] - 1).c_str(),
                    num(m.bwd_model_err_paired).c_str());
      }
      std::printf("}\n");
    }
    std::printf("{\"bench\": \"docs\", \"summary\": true, \"ranks\": %d, \"threads\": %d, "
                "\"documents\": %zu, \"doc_lengths\": %s, \"documents_on_several_ranks\": %lld, "
                "\"packed_over_one_by_one_fwd\": %s, \"packed_over_one_by_one_bwd\": %s, "
                "\"packed_over_one_by_one_fwd_bwd\": %s, \"bitwise_equal\": %s, \"max_abs_diff\": %s, "
                "\"model_gflops\": %s, \"model_gbps\": %s, \"bwd_model_gflops\": %s, "
                "\"bwd_model_gbps\": %s, \"backward\": %s}\n",
                P, num_threads(), docs.size(), json_ints(docs).c_str(),
                static_cast<long long>(straddling), num(ratio_fwd).c_str(), num(ratio_bwd).c_str(),
                num(ratio_step).c_str(), same_all ? "true" : "false", num(err_all).c_str(),
                num(rates.flops_per_s / 1e9).c_str(), num(rates.bytes_per_s / 1e9).c_str(),
                num(o.backward ? bwd_rates.flops_per_s / 1e9 : NAN).c_str(),
                num(o.backward ? bwd_rates.bytes_per_s / 1e9 : NAN).c_str(),
                o.backward ? "true" : "false");
  } else {
    std::printf("# %s: %zu documents, %lld tokens (%s), %lld on more than one rank; heads %lld/%lld x "
                "%lld %s%s, batch %lld, window %lld,%lld\n",
                o.preset.empty() ? "custom" : o.preset.c_str(), docs.size(),
                static_cast<long long>(q_total), length_summary(docs).c_str(),
                static_cast<long long>(straddling), static_cast<long long>(o.heads),
                static_cast<long long>(o.kv_heads), static_cast<long long>(o.head_dim),
                dtype_name(o.dtype), o.causal ? " causal" : "", static_cast<long long>(o.batch),
                static_cast<long long>(o.window_left), static_cast<long long>(o.window_right));
    std::printf("# %d ranks x %d thread(s), kernel %s, lens [%s], %lld rounds after %lld warm-up; "
                "model rates %.1f GFLOP/s, %.2f GB/s per rank%s\n",
                P, num_threads(), kernel_name(), join(q_lens).c_str(), static_cast<long long>(o.iters),
                static_cast<long long>(o.warmup), rates.flops_per_s / 1e9, rates.bytes_per_s / 1e9,
                calib ? " (calibration)" : " (given)");
    std::printf("%-12s %5s %10s %10s %9s %8s %10s %9s %9s %9s %9s", "mode", "calls", "fwd_ms", "attn_ms",
                "xchg_ms", "wait_ms", "model_ms", "model_err", "paired", "imb_meas", "imb_model");
    if (o.backward)
      std::printf(" %10s %10s %10s %9s %9s", "bwd_ms", "kernel_ms", "bwd_model", "bwd_err", "paired");
    std::printf("\n");
    for (const auto& mp : modes) {
      const Mode& m = *mp;
      std::printf("%-12s %5zu %10.2f %10.2f %9.2f %8.2f %10.2f %+8.1f%% %+8.1f%% %9.4f %9.4f",
                  m.name.c_str(), m.calls.size(), m.med[kFwdWall], m.phase[kFwdAttention],
                  m.phase[kFwdExchange], m.phase[kFwdWait], m.model_ms,
                  100 * (m.model_ms / m.med[kFwdWall] - 1), 100 * m.model_err_paired,
                  imbalance(m.rank_fwd_attention), imbalance(m.rank_flops));
      if (o.backward)
        std::printf(" %10.2f %10.2f %10.2f %+8.1f%% %+8.1f%%", m.med[kBwdWall], m.phase[kBwdKernel],
                    m.bwd_model_ms, 100 * (m.bwd_model_ms / m.med[kBwdWall] - 1),
                    100 * m.bwd_model_err_paired);
      std::printf("\n");
    }
    for (const auto& mp : modes) {
      std::printf("  %-12s per-rank fwd attention ms:", mp->name.c_str());
      for (double x : mp->rank_fwd_attention) std::printf(" %.2f", x);
      if (o.backward) {
        std::printf("; bwd kernel ms:");
        for (double x : mp->rank_bwd_kernel) std::printf(" %.2f", x);
      }
      std::printf("; modelled GFLOP:");
      for (double x : mp->rank_flops) std::printf(" %.2f", x / 1e9);
      std::printf("\n");
    }
    std::printf("packed / one_by_one (median of per-round ratios): fwd %.4f", ratio_fwd);
    if (o.backward) std::printf(", bwd %.4f, fwd+bwd %.4f", ratio_bwd, ratio_step);
    std::printf("; outputs%s %s (max |diff| %.3g)\n", o.backward ? " and gradients" : "",
                same_all ? "bitwise equal" : "DIFFER", err_all);
  }
  std::fflush(stdout);
  return 0;
}

}  // namespace
}  // namespace uaa::bench

int bench_docs_main(int argc, char** argv) {
  using namespace uaa::bench;
  return mpi_benchmark_main(argc, argv, SweepFor::docs, "uaa bench docs", kDocsUsage, run);
}
