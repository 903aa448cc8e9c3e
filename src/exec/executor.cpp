#include "exec/executor.h"

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "common/clock.h"
#include "common/strings.h"
#include "core/validate.h"
#include "uaa/error.h"

namespace uaa::detail {
namespace {

void copy_block(const BlockAddress& src, const BlockAddress& dst, std::int64_t tokens,
                std::int64_t heads, std::int64_t row) {
  const auto run = static_cast<std::size_t>(row);
  if (src.head_stride == row && dst.head_stride == row) {  // a token's heads are contiguous
    const std::size_t token_bytes = run * static_cast<std::size_t>(heads);
    if (src.token_stride == row * heads && dst.token_stride == row * heads) {
      std::memcpy(dst.base, src.base, token_bytes * static_cast<std::size_t>(tokens));
      return;
    }
    for (std::int64_t t = 0; t < tokens; ++t)
      std::memcpy(dst.base + t * dst.token_stride, src.base + t * src.token_stride, token_bytes);
    return;
  }
  for (std::int64_t t = 0; t < tokens; ++t)
    for (std::int64_t h = 0; h < heads; ++h)
      std::memcpy(dst.base + t * dst.token_stride + h * dst.head_stride,
                  src.base + t * src.token_stride + h * src.head_stride, run);
}

void zero_block(const BlockAddress& dst, std::int64_t tokens, std::int64_t heads, std::int64_t row) {
  for (std::int64_t t = 0; t < tokens; ++t)
    for (std::int64_t h = 0; h < heads; ++h)
      std::memset(dst.base + t * dst.token_stride + h * dst.head_stride, 0,
                  static_cast<std::size_t>(row));
}

BlockAddress dense_at(std::byte* p, std::int64_t heads, std::int64_t row) {
  return {p, heads * row, row};
}

StridedBytes strided(const BlockAddress& a, std::int64_t tokens, std::int64_t heads, std::int64_t row) {
  StridedBytes s;
  s.address = reinterpret_cast<std::uintptr_t>(a.base);
  s.n0 = tokens;
  s.s0 = a.token_stride;
  s.n1 = heads;
  s.s1 = a.head_stride;
  s.run = row;
  return s;
}

// Fault injection for tests (docs/FAILURE_MODEL.md): UAA_INJECT_FAULT=<point> makes this process
// fail at that point as if the OS had refused the copy. Points: peer_write, peer_read.
bool injected(const char* point) {
  const char* env = std::getenv("UAA_INJECT_FAULT");
  return env != nullptr && std::strcmp(env, point) == 0;
}

}  // namespace

void bind_batch(Bindings& b, const AttentionShape& s, std::int64_t q_tokens,
                std::int64_t lse_batch_stride) {
  if (s.batch <= 1) return;
  b.q_heads = s.q_heads;
  b.kv_heads = s.kv_heads;
  b.lse_batch_stride = lse_batch_stride != 0 ? lse_batch_stride : q_tokens * b.lse_token_stride;
}

BlockAddress resolve(const Bindings& b, const Place& p, std::int64_t heads, std::int64_t row_bytes) {
  const std::int64_t es = b.elem_bytes;
  // Batched plans: head b * H + h of the place is head h of sequence b (a part or segment never
  // spans sequences: split_batches).
  auto split = [&](std::int64_t H, std::int64_t batch_stride) {
    return H > 0 ? std::pair{p.head % H, (p.head / H) * batch_stride} : std::pair{p.head, std::int64_t{0}};
  };
  auto in_tensor = [&](const ConstTensor& t, std::int64_t H) {
    auto* base = static_cast<std::byte*>(const_cast<void*>(t.data));
    const auto [h, at] = split(H, batch_stride_of(t));
    return BlockAddress{base + (at + p.token * t.token_stride + h * t.head_stride) * es,
                        t.token_stride * es, t.head_stride * es};
  };
  switch (p.slot) {
    case Slot::q: return in_tensor(b.q, b.q_heads);
    case Slot::k: return in_tensor(b.k, b.kv_heads);
    case Slot::v: return in_tensor(b.v, b.kv_heads);
    case Slot::out: return in_tensor(b.out, b.q_heads);
    case Slot::dout: return in_tensor(b.dout, b.q_heads);
    case Slot::dq: return in_tensor(b.dq, b.q_heads);
    case Slot::dk: return in_tensor(b.dk, b.kv_heads);
    case Slot::dv: return in_tensor(b.dv, b.kv_heads);
    case Slot::lse:
    case Slot::delta: {
      constexpr std::int64_t f = sizeof(float);
      const bool lse = p.slot == Slot::lse;
      float* data = lse ? b.lse : b.delta;
      const std::int64_t ts = lse ? b.lse_token_stride : b.delta_token_stride;
      const auto [h, at] = split(b.q_heads, lse ? b.lse_batch_stride : b.delta_batch_stride);
      auto* base = reinterpret_cast<std::byte*>(data + at + p.token * ts + h);
      return {base, ts * f, f};
    }
    case Slot::stage_in:
    case Slot::stage_out:
    case Slot::saved: {
      std::byte* area = p.slot == Slot::stage_in ? b.stage_in
                        : p.slot == Slot::stage_out ? b.stage_out : b.saved;
      return {area + p.offset, (p.pitch ? p.pitch : heads) * row_bytes, row_bytes};
    }
    case Slot::pad: break;
  }
  throw Error(ErrorCode::internal, "uaa: resolve() of a padding place");
}

void copy_local(const Bindings& b, const Part& x) {
  if (x.dst.slot == Slot::pad) return;
  const BlockAddress dst = resolve(b, x.dst, x.heads, x.row_bytes);
  if (x.src.slot == Slot::pad) {
    zero_block(dst, x.tokens, x.heads, x.row_bytes);
    return;
  }
  copy_block(resolve(b, x.src, x.heads, x.row_bytes), dst, x.tokens, x.heads, x.row_bytes);
}

void run_exchange_by_messages(Communicator& comm, const ExchangeStep& step, const Bindings& b,
                              WorkspaceBuffers& B, ExchangeTimes& t) {
  auto t0 = Clock::now();
  // Parts to myself (comparison strategies only): local copies, in order.
  for (const PeerParts& pp : step.send)
    if (pp.peer == step.self)
      for (std::uint32_t i = pp.begin; i < pp.end; ++i) copy_local(b, step.send_parts[i]);
  B.sends.clear();
  B.recvs.clear();
  B.unpack_parts.clear();
  B.unpack_offsets.clear();
  std::int64_t at = 0;
  for (const PeerParts& pp : step.send) {
    if (pp.peer == step.self) continue;
    for (std::uint32_t i = pp.begin; i < pp.end; ++i) {
      const Part& x = step.send_parts[i];
      std::byte* data;
      if (is_dense_staging(x.src, x.heads)) {
        data = resolve(b, x.src, x.heads, x.row_bytes).base;
      } else {
        data = B.pack.data() + at;
        at += packed_bytes(x);
        const BlockAddress dst = dense_at(data, x.heads, x.row_bytes);
        if (x.src.slot == Slot::pad)
          std::memset(data, 0, static_cast<std::size_t>(x.bytes()));
        else
          copy_block(resolve(b, x.src, x.heads, x.row_bytes), dst, x.tokens, x.heads, x.row_bytes);
      }
      B.sends.push_back(Message{pp.peer, data, x.bytes()});
    }
  }
  at = 0;
  for (const PeerParts& pp : step.recv) {
    if (pp.peer == step.self) continue;
    for (std::uint32_t i = pp.begin; i < pp.end; ++i) {
      const Part& x = step.recv_parts[i];
      std::byte* data;
      if (is_dense_staging(x.dst, x.heads)) {
        data = resolve(b, x.dst, x.heads, x.row_bytes).base;
      } else {
        data = B.unpack.data() + at;
        B.unpack_parts.push_back(i);
        B.unpack_offsets.push_back(at);
        at += packed_bytes(x);
      }
      B.recvs.push_back(Message{pp.peer, data, x.bytes()});
    }
  }
  t.pack += ms_since(t0);
  t0 = Clock::now();
  if (!B.sends.empty() || !B.recvs.empty()) comm.exchange(B.sends, B.recvs);
  t.transfer += ms_since(t0);
  t0 = Clock::now();
  for (std::size_t k = 0; k < B.unpack_parts.size(); ++k) {
    const Part& x = step.recv_parts[B.unpack_parts[k]];
    if (x.dst.slot == Slot::pad) continue;
    copy_block(dense_at(B.unpack.data() + B.unpack_offsets[k], x.heads, x.row_bytes),
               resolve(b, x.dst, x.heads, x.row_bytes), x.tokens, x.heads, x.row_bytes);
  }
  t.unpack += ms_since(t0);
}

std::string write_in_parts(Communicator& comm, const ExchangeStep& in, const Bindings& b,
                           const std::uint64_t* peer_stage_in, WorkspaceBuffers& B) {
  B.writes.clear();
  for (const PeerParts& pp : in.send) {
    if (pp.peer == in.self) continue;
    for (std::uint32_t i = pp.begin; i < pp.end; ++i) {
      const Part& x = in.send_parts[i];
      if (!is_tensor(x.src.slot) || x.dst.slot != Slot::stage_in)
        return cat("internal: part ", i, " to rank ", pp.peer,
                   " is not tensor -> stage_in (peer writes cannot move it)");
      const auto* remote_base = reinterpret_cast<std::byte*>(peer_stage_in[pp.peer]);
      Bindings remote;
      remote.stage_in = const_cast<std::byte*>(remote_base);
      const BlockAddress to = resolve(remote, x.dst, x.heads, x.row_bytes);
      const BlockAddress from = resolve(b, x.src, x.heads, x.row_bytes);
      B.writes.push_back(PeerWrite{pp.peer, strided(from, x.tokens, x.heads, x.row_bytes),
                                   strided(to, x.tokens, x.heads, x.row_bytes)});
    }
  }
  if (injected("peer_write")) return "write_peers: injected fault (UAA_INJECT_FAULT=peer_write)";
  try {
    comm.write_peers(B.writes);
  } catch (const Error& e) {
    return e.what();
  }
  return {};
}

std::string read_out_parts(Communicator& comm, const ExchangeStep& out, const Bindings& b,
                           const std::uint64_t* peer_stage_out, WorkspaceBuffers& B) {
  B.reads.clear();
  for (const PeerParts& pp : out.recv) {
    if (pp.peer == out.self) continue;
    for (std::uint32_t i = pp.begin; i < pp.end; ++i) {
      const Part& x = out.recv_parts[i];
      if (x.src.slot != Slot::stage_out || !is_tensor(x.dst.slot))
        return cat("internal: part ", i, " from rank ", pp.peer,
                   " is not stage_out -> tensor (peer reads cannot move it)");
      Bindings remote;
      remote.stage_out = reinterpret_cast<std::byte*>(peer_stage_out[pp.peer]);
      const BlockAddress from = resolve(remote, x.src, x.heads, x.row_bytes);
      const BlockAddress to = resolve(b, x.dst, x.heads, x.row_bytes);
      B.reads.push_back(PeerRead{pp.peer, strided(from, x.tokens, x.heads, x.row_bytes),
                                 strided(to, x.tokens, x.heads, x.row_bytes)});
    }
  }
  if (injected("peer_read")) return "read_peers: injected fault (UAA_INJECT_FAULT=peer_read)";
  try {
    comm.read_peers(B.reads);
  } catch (const Error& e) {
    return e.what();
  }
  return {};
}

namespace {

TokenSegment token_segment(const Bindings& b, const Place& p, std::int64_t tokens,
                           std::int64_t dense_heads, std::int64_t row, std::int64_t es) {
  const BlockAddress a = resolve(b, p, dense_heads, row);
  return TokenSegment{a.base, tokens, a.token_stride / es, a.head_stride / es};
}

// The key/value segments of a step (forward and backward name them alike).
void add_key_segments(const std::vector<KeySegment>& kv, const DocSpan& doc, const Bindings& b,
                      std::int64_t row, std::int64_t es, WorkspaceBuffers& B) {
  for (std::uint32_t i = doc.kv_begin; i < doc.kv_end; ++i) {
    const KeySegment& k = kv[i];
    B.kseg.push_back(token_segment(b, k.k, k.tokens, k.dense_heads, row, es));
    B.vseg.push_back(token_segment(b, k.v, k.tokens, k.dense_heads, row, es));
  }
}

}  // namespace

KernelProblem kernel_problem(const ComputeStep& c, const DocSpan& doc, const Bindings& b,
                             const AttentionShape& s, int threads, WorkspaceBuffers& B) {
  const std::int64_t es = b.elem_bytes, D = s.head_dim, row = D * es;
  B.qseg.clear();
  B.kseg.clear();
  B.vseg.clear();
  B.oseg.clear();
  auto segment = [&](const Place& p, std::int64_t tokens, std::int64_t dense_heads) {
    return token_segment(b, p, tokens, dense_heads, row, es);
  };
  for (std::uint32_t i = doc.q_begin; i < doc.q_end; ++i) {
    const QuerySegment& q = c.q[i];
    B.qseg.push_back(segment(q.q, q.tokens, q.dense_heads));
    const BlockAddress o = resolve(b, q.out, q.dense_heads, row);
    OutSegment os{o.base, o.token_stride / es, o.head_stride / es, nullptr, 0};
    if (q.lse.slot != Slot::pad) {
      const BlockAddress l = resolve(b, q.lse, q.dense_heads, sizeof(float));
      os.lse = reinterpret_cast<float*>(l.base);
      os.lse_token_stride = l.token_stride / static_cast<std::int64_t>(sizeof(float));
    }
    B.oseg.push_back(os);
  }
  add_key_segments(c.kv, doc, b, row, es, B);
  KernelProblem kp;
  kp.dtype = s.dtype;
  kp.head_dim = D;
  kp.q_heads = c.q_heads;
  kp.q_head_begin = c.q_head_begin;
  kp.kv_head_begin = c.kv_head_begin;
  kp.group = s.q_heads / s.kv_heads;
  kp.q = B.qseg;
  kp.k = B.kseg;
  kp.v = B.vseg;
  kp.out = B.oseg;
  kp.q_first = doc.q_first;
  kp.q_total = doc.q_total;
  kp.kv_total = doc.kv_total;
  kp.scale = s.scale;
  kp.causal = c.causal;
  kp.window_left = c.window_left;
  kp.window_right = c.window_right;
  kp.threads = threads;
  return kp;
}

BackwardProblem backward_problem(const BackwardStep& c, const DocSpan& doc, const Bindings& b,
                                 const AttentionShape& s, int threads, WorkspaceBuffers& B) {
  const std::int64_t es = b.elem_bytes, D = s.head_dim, row = D * es;
  B.qseg.clear();
  B.dout_seg.clear();
  B.kseg.clear();
  B.vseg.clear();
  B.lse_seg.clear();
  B.delta_seg.clear();
  B.oseg.clear();
  auto segment = [&](const Place& p, std::int64_t tokens, std::int64_t dense_heads) {
    return token_segment(b, p, tokens, dense_heads, row, es);
  };
  auto stat = [&](const Place& p, std::int64_t dense_heads) {
    const BlockAddress a = resolve(b, p, dense_heads, sizeof(float));
    return StatSegment{reinterpret_cast<const float*>(a.base),
                       a.token_stride / static_cast<std::int64_t>(sizeof(float))};
  };
  for (std::uint32_t i = doc.q_begin; i < doc.q_end; ++i) {
    const BackwardQuerySegment& q = c.q[i];
    B.qseg.push_back(segment(q.q, q.tokens, q.dense_heads));
    B.dout_seg.push_back(segment(q.dout, q.tokens, q.dense_heads));
    B.lse_seg.push_back(stat(q.lse, q.dense_heads));
    B.delta_seg.push_back(stat(q.delta, q.dense_heads));
    const BlockAddress o = resolve(b, q.dq, q.dense_heads, row);
    B.oseg.push_back(OutSegment{o.base, o.token_stride / es, o.head_stride / es, nullptr, 0});
  }
  add_key_segments(c.kv, doc, b, row, es, B);
  const std::int64_t f32_row = D * static_cast<std::int64_t>(sizeof(float));
  auto f32 = [&](const Place& p) -> float* {  // the document's first key of a partial block
    if (p.slot == Slot::pad) return nullptr;
    return reinterpret_cast<float*>(resolve(b, p, 1, f32_row).base) + doc.kv_first * D;
  };
  BackwardProblem bp;
  bp.dtype = s.dtype;
  bp.head_dim = D;
  bp.q_heads = c.q_heads;
  bp.q_head_begin = c.q_head_begin;
  bp.kv_head_begin = c.kv_head_begin;
  bp.group = s.q_heads / s.kv_heads;
  bp.q = B.qseg;
  bp.dout = B.dout_seg;
  bp.lse = B.lse_seg;
  bp.delta = B.delta_seg;
  bp.dq = B.oseg;
  bp.k = B.kseg;
  bp.v = B.vseg;
  bp.q_first = doc.q_first;
  bp.q_total = doc.q_total;
  bp.kv_total = doc.kv_total;
  bp.scale = s.scale;
  bp.causal = c.causal;
  bp.window_left = c.window_left;
  bp.window_right = c.window_right;
  bp.partial_head_stride = c.kv_total * D;  // the step's blocks hold every key of the sequence
  bp.threads = threads;
  bp.dk_partial = f32(c.dk_partial);
  bp.dv_partial = f32(c.dv_partial);
  bp.dk_carry = f32(c.dk_carry);
  bp.dv_carry = f32(c.dv_carry);
  return bp;
}

}  // namespace uaa::detail
