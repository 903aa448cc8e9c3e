// Property checks of exchange programs (src/program/program.h), shared by the unit tests
// (tests/unit/program_test.cpp), the randomized property test (tests/fuzz/plan_property_test.cpp)
// and the planner's libFuzzer target (tests/fuzz/plan_fuzz.cpp).
//
// check_programs() takes every rank's program of one geometry and strategy and returns "" or the
// first violated property, its message starting with the property's name in brackets:
//   [peers]      peer lists ordered by peer, no empty entries, ranges inside the part vectors, every
//                part in some range, positive part sizes, `self` is the rank;
//   [symmetry]   r's send parts to j are j's receive parts from r, same order, same fields;
//   [bounds]     staging blocks inside [0, stage_*_bytes) of the rank that owns them, tensor blocks
//                inside that rank's tensor (tokens and heads), row sizes match the slot, the slots
//                are the ones each exchange / segment may name;
//   [overlap]    no stage_in byte written by two receive parts, no stage_out byte by two compute
//                blocks;
//   [staging]    no staging wasted: stage_in_bytes / stage_out_bytes exceed the bytes written there
//                by at most the 64-byte alignment of each area (uaa: 5 in, 6 out; padded: 3 and 2
//                per block; allgather_kv: 2 in);
//   [compute]    kernel contract of a step: key segments cover kv_total, staging pitches hold the
//                heads read, uaa rows start on the query-row granule (counted from the document's
//                start); document spans partition the segments in document order;
//   [batch]      batched geometries: no caller-tensor place of a part or step spans two sequences;
//   [bytes]      bytes_sent()/bytes_received() are the sums over parts to/from other ranks, and the
//                strategy's independently derived counts;
//   [strategy]   what the strategy promises (uaa: never to itself; padded: every block travels,
//                equal counts; allgather_kv: one step, no output exchange);
//   [round trip] the simulated transport (below) and the kernel's view;
//   [coverage]   every (token, head) output (and lse) element written exactly once, every computed
//                row for another rank sent exactly once.
//
// The round trip runs every rank's program in one process. Every byte of every buffer holds a
// 64-bit provenance instead of a value: (tensor, global token, head, byte of the row), 0 for zeros
// (Slot::pad), kUnset for bytes nobody wrote. Caller tensors use deliberately non-dense layouts
// (padded token strides, head-major), which a program never sees: it names (token, head) only.
// The `in` exchange copies every part from the sender's src to the receiver's dst; each compute
// step (each document span of it) is checked against the kernel contract (its query rows, read in
// order from q_first, hold the global rows whose visible keys (causal, window, document) the kernel
// derives from its q_total/kv_total; its key positions 0..kv_total-1 hold the global keys from the
// span's kv_first of the kv heads its q heads read); it then
// writes every output row with the provenance of the query row it computed (zeros in: padding
// out); the `out` exchange copies; every rank's out and lse must hold its own rows, each written
// once.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <exception>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "kernels/kernel.h"
#include "plan/layout.h"
#include "program/program.h"
#include "uaa/plan.h"

namespace uaa::test {

// ---- geometry helpers ---------------------------------------------------------------------------

inline std::string geometry_str(const detail::Geometry& g) {
  std::ostringstream os;
  os << "ranks " << g.q_lens.size() << " q_lens [";
  for (std::size_t i = 0; i < g.q_lens.size(); ++i) os << (i ? " " : "") << g.q_lens[i];
  os << "] kv_lens [";
  for (std::size_t i = 0; i < g.kv_lens.size(); ++i) os << (i ? " " : "") << g.kv_lens[i];
  os << "] heads " << g.q_heads << "/" << g.kv_heads << " D " << g.head_dim << " elem "
     << g.elem_bytes << (g.causal ? " causal" : "") << (g.with_lse ? " lse" : "");
  if (g.batch > 1) os << " batch " << g.batch;
  if (g.window_left >= 0 || g.window_right >= 0) os << " window " << g.window_left << "," << g.window_right;
  if (g.q_doc_start.size() > 2) {
    os << " docs q [";
    for (std::size_t i = 0; i < g.q_doc_start.size(); ++i) os << (i ? " " : "") << g.q_doc_start[i];
    os << "] kv [";
    for (std::size_t i = 0; i < g.kv_doc_start.size(); ++i) os << (i ? " " : "") << g.kv_doc_start[i];
    os << "]";
  }
  return os.str();
}

inline std::int64_t sum_of(const std::vector<std::int64_t>& v) {
  std::int64_t s = 0;
  for (std::int64_t x : v) s += x;
  return s;
}

inline detail::WorkInput work_input_of(const detail::Geometry& g) { return detail::work_input(g); }

// Which generator: uaa, padded (ulysses and ulysses_pad) or allgather_kv.
enum class Gen { uaa, padded, allgather };

inline Gen gen_of(Strategy s) {
  switch (s) {
    case Strategy::uaa: return Gen::uaa;
    case Strategy::ulysses:
    case Strategy::ulysses_pad: return Gen::padded;
    case Strategy::allgather_kv: return Gen::allgather;
  }
  return Gen::uaa;
}

inline const char* gen_name(Gen k) {
  return k == Gen::uaa ? "uaa" : k == Gen::padded ? "padded" : "allgather_kv";
}

inline detail::Program compile_one(const detail::Geometry& g, Gen k, int rank,
                                   const std::vector<detail::RankWork>& work) {
  switch (k) {
    case Gen::uaa: return detail::compile_uaa_forward(g, work, rank);
    case Gen::padded: return detail::compile_padded_forward(g, rank);
    case Gen::allgather: return detail::compile_allgather_kv_forward(g, rank);
  }
  return {};
}

inline std::vector<detail::Program> compile_all(const detail::Geometry& g, Gen k) {
  const std::vector<detail::RankWork> work =
      k == Gen::uaa ? detail::split_work(work_input_of(g)) : std::vector<detail::RankWork>{};
  std::vector<detail::Program> all;
  for (int r = 0; r < static_cast<int>(g.q_lens.size()); ++r) all.push_back(compile_one(g, k, r, work));
  return all;
}

inline std::int64_t program_size(const detail::Program& p) {
  std::int64_t n = static_cast<std::int64_t>(p.in.send_parts.size() + p.in.recv_parts.size() +
                                             p.out.send_parts.size() + p.out.recv_parts.size());
  for (const detail::ComputeStep& s : p.compute) n += static_cast<std::int64_t>(s.q.size() + s.kv.size());
  return n;
}

// ---- the checker --------------------------------------------------------------------------------

struct CheckOptions {
  bool round_trip = true;
  // Largest simulation (provenance entries, 8 bytes each, over all ranks); larger cases get the
  // structural checks only (round_trip_skipped says so).
  std::int64_t max_sim_entries = std::int64_t{4} << 20;
};

struct CheckResult {
  std::string problem;  // "" when every property holds
  bool round_trip_skipped = false;
  bool overlap_skipped = false;  // strided blocks of more tokens than the overlap check walks
};

namespace check_detail {

using detail::ComputeStep;
using detail::ExchangeStep;
using detail::Geometry;
using detail::KeySegment;
using detail::Part;
using detail::PeerParts;
using detail::Place;
using detail::Program;
using detail::QuerySegment;
using detail::Slot;
using i64 = std::int64_t;

struct Failure : std::exception {
  std::string what_;
  int rank = -1, peer = -1;
  explicit Failure(std::string w, int r, int j) : what_(std::move(w)), rank(r), peer(j) {}
  const char* what() const noexcept override { return what_.c_str(); }
};

template <class... A>
[[noreturn]] void fail_at(int rank, int peer, const A&... a) {
  std::ostringstream os;
  (os << ... << a);
  throw Failure(os.str(), rank, peer);
}

inline std::string place_str(const Place& p) {
  std::ostringstream os;
  os << detail::slot_name(p.slot);
  if (detail::is_tensor(p.slot)) os << "(token " << p.token << ", head " << p.head << ")";
  if (detail::is_staging(p.slot)) os << "(offset " << p.offset << ", pitch " << p.pitch << ")";
  return os.str();
}

inline std::string part_str(const Part& p) {
  std::ostringstream os;
  os << p.tokens << "x" << p.heads << "x" << p.row_bytes << " " << place_str(p.src) << " -> "
     << place_str(p.dst);
  return os.str();
}

inline bool same_place(const Place& a, const Place& b) {
  return a.slot == b.slot && a.token == b.token && a.head == b.head && a.offset == b.offset &&
         a.pitch == b.pitch;
}

// Provenance of one byte: tag (4 bits) | global token (36) | head (12) | byte of the row (12).
using Prov = std::uint64_t;
enum Tag : Prov { kZero = 0, kQ = 1, kK = 2, kV = 3, kOut = 4, kLse = 5, kPadOut = 6, kPadLse = 7 };
inline constexpr Prov kUnset = ~Prov{0};
inline Prov prov(Prov tag, i64 token, i64 head, i64 byte) {
  return (tag << 60) | (static_cast<Prov>(token) << 24) | (static_cast<Prov>(head) << 12) |
         static_cast<Prov>(byte);
}
inline Prov tag_of(Prov p) { return p >> 60; }
inline i64 token_of(Prov p) { return static_cast<i64>((p >> 24) & ((Prov{1} << 36) - 1)); }
inline i64 head_of(Prov p) { return static_cast<i64>((p >> 12) & 0xfff); }
inline i64 byte_of(Prov p) { return static_cast<i64>(p & 0xfff); }
inline std::string prov_str(Prov p) {
  if (p == kZero) return "zero";
  if (p == kUnset) return "unwritten";
  static const char* names[] = {"zero", "q", "k", "v", "out", "lse", "pad-out", "pad-lse"};
  const Prov t = tag_of(p);
  std::ostringstream os;
  os << (t < 8 ? names[t] : "?") << "(token " << token_of(p) << ", head " << head_of(p)
     << ", byte " << byte_of(p) << ")";
  return os.str();
}

// A caller tensor of the simulation: element (t, h), byte b at ((t * ts + h * hs) * rb + b).
struct TensorMem {
  i64 tokens = 0, heads = 0, rb = 0, ts = 0, hs = 0;
  std::vector<Prov> data;
  std::vector<unsigned char> writes;  // per (t, h): how often something was written
  void init(i64 n, i64 h, i64 row, bool head_major, i64 extra) {
    tokens = n;
    heads = h;
    rb = row;
    if (head_major) {
      hs = n + extra;
      ts = 1;
    } else {
      ts = h + extra;
      hs = 1;
    }
    const i64 size = n > 0 && h > 0 ? ((n - 1) * ts + (h - 1) * hs + 1) * row : 0;
    data.assign(static_cast<std::size_t>(size), kUnset);
    writes.assign(static_cast<std::size_t>(n * h), 0);
  }
  Prov* at(i64 t, i64 h) { return data.data() + (t * ts + h * hs) * rb; }
};

struct RankMem {
  TensorMem q, k, v, out, lse;
  std::vector<Prov> stage_in, stage_out;
  std::vector<unsigned char> in_writes, out_computed, out_sent;  // per staging byte
};

// Bytes [lo, hi) of a staging buffer written by receive part `index` from peer `peer` (kind 0) or
// by the out (kind 1) / lse (kind 2) of q segment `peer` of compute step `index`.
struct Interval {
  i64 lo, hi;
  int kind;
  std::size_t index;
  i64 peer;
};

class Checker {
 public:
  Checker(const Geometry& g, const std::vector<Program>& progs, Gen kind)
      : g_(g), p_(progs), kind_(kind), P_(static_cast<int>(g.q_lens.size())) {
    row_ = g.head_dim * g.elem_bytes;
    group_ = g.kv_heads > 0 ? g.q_heads / g.kv_heads : 1;
    q_start_.assign(P_ + 1, 0);
    kv_start_.assign(P_ + 1, 0);
    for (int r = 0; r < P_; ++r) {
      q_start_[r + 1] = q_start_[r] + g.q_lens[r];
      kv_start_[r + 1] = kv_start_[r] + g.kv_lens[r];
    }
    Sq_ = q_start_[P_];
    Skv_ = kv_start_[P_];
    hpr_ = (g.q_heads + P_ - 1) / P_;
    if (kind == Gen::uaa) work_ = detail::split_work(work_input_of(g));
  }

  void structural() {
    if (static_cast<int>(p_.size()) != P_) fail_at(-1, -1, "[peers] ", p_.size(), " programs for ", P_, " ranks");
    for (int r = 0; r < P_; ++r) {
      check_peer_list(r, p_[r].in, "in");
      check_peer_list(r, p_[r].out, "out");
    }
    for (int r = 0; r < P_; ++r)
      for (int j = 0; j < P_; ++j) {
        check_symmetry(r, j, p_[r].in, p_[j].in, "in");
        check_symmetry(r, j, p_[r].out, p_[j].out, "out");
      }
    for (int r = 0; r < P_; ++r) check_parts(r);
    for (int r = 0; r < P_; ++r) check_compute(r);
    for (int r = 0; r < P_; ++r) check_batch(r);
    for (int r = 0; r < P_; ++r) check_overlap(r);
    for (int r = 0; r < P_; ++r) check_staging(r);
    for (int r = 0; r < P_; ++r) check_bytes(r);
    for (int r = 0; r < P_; ++r) check_strategy(r);
  }

  // Provenance entries the simulation needs.
  __int128 sim_entries() const {
    __int128 n = 0;
    for (int r = 0; r < P_; ++r) {
      n += static_cast<__int128>(g_.q_lens[r]) * (g_.q_heads + 1) * row_ * 2;
      n += static_cast<__int128>(g_.kv_lens[r]) * (g_.kv_heads + 2) * row_ * 2;
      n += g_.with_lse ? static_cast<__int128>(g_.q_lens[r]) * (g_.q_heads + 3) * 4 : 0;
      n += static_cast<__int128>(p_[r].stage_in_bytes) + p_[r].stage_out_bytes;
    }
    return n;
  }
  bool sim_possible() const {  // the provenance fields must hold every token, head and row byte
    return Sq_ + Skv_ < (i64{1} << 36) && g_.q_heads + P_ < 4096 && row_ < 4096;
  }

  bool overlap_skipped = false;

  void round_trip() {
    init_memory();
    for (int r = 0; r < P_; ++r) run_exchange(r, p_[r].in, "in");
    for (int r = 0; r < P_; ++r)
      for (std::size_t s = 0; s < p_[r].compute.size(); ++s) run_compute(r, s);
    for (int r = 0; r < P_; ++r) run_exchange(r, p_[r].out, "out");
    for (int r = 0; r < P_; ++r) verify_rank(r);
  }

 private:
  const Geometry& g_;
  const std::vector<Program>& p_;
  Gen kind_;
  int P_;
  i64 row_ = 0, group_ = 1, Sq_ = 0, Skv_ = 0, hpr_ = 0;
  std::vector<i64> q_start_, kv_start_;
  std::vector<detail::RankWork> work_;  // uaa's split
  // The simulation's memory, kept from one check to the next (assign() reuses the capacity: no
  // page faults for every case of a sweep).
  static std::vector<RankMem>& memory() {
    static thread_local std::vector<RankMem> pool;
    return pool;
  }
  std::vector<RankMem>& mem_ = memory();

  // ---- [peers] ----------------------------------------------------------------------------------
  void check_list(int r, const std::vector<PeerParts>& list, const std::vector<Part>& parts,
                  const char* what) {
    int last = -1;
    std::vector<char> used(parts.size(), 0);
    for (const PeerParts& e : list) {
      if (e.peer < 0 || e.peer >= P_) fail_at(r, e.peer, "[peers] rank ", r, " ", what, ": peer ", e.peer, " outside [0, ", P_, ")");
      if (e.peer <= last)
        fail_at(r, e.peer, "[peers] rank ", r, " ", what, ": peer ", e.peer, " listed after peer ", last, " (not ordered by peer, or twice)");
      last = e.peer;
      if (e.begin >= e.end) fail_at(r, e.peer, "[peers] rank ", r, " ", what, ": empty entry for peer ", e.peer, " [", e.begin, ", ", e.end, ")");
      if (e.end > parts.size())
        fail_at(r, e.peer, "[peers] rank ", r, " ", what, ": peer ", e.peer, " parts [", e.begin, ", ", e.end, ") past the ", parts.size(), " parts");
      for (std::uint32_t i = e.begin; i < e.end; ++i) used[i] = 1;
    }
    for (std::size_t i = 0; i < parts.size(); ++i) {
      const Part& pt = parts[i];
      if (!used[i]) fail_at(r, -1, "[peers] rank ", r, " ", what, ": part ", i, " (", part_str(pt), ") belongs to no peer");
      if (pt.tokens <= 0 || pt.heads <= 0 || pt.row_bytes <= 0)
        fail_at(r, -1, "[peers] rank ", r, " ", what, ": part ", i, " has a non-positive size: ", part_str(pt));
    }
  }
  void check_peer_list(int r, const ExchangeStep& x, const char* name) {
    if (x.self != r) fail_at(r, -1, "[peers] rank ", r, " exchange ", name, ": self is ", x.self);
    check_list(r, x.send, x.send_parts, (std::string(name) + ".send").c_str());
    check_list(r, x.recv, x.recv_parts, (std::string(name) + ".recv").c_str());
  }

  // ---- [symmetry] -------------------------------------------------------------------------------
  static const PeerParts* entry(const std::vector<PeerParts>& list, int peer) {
    for (const PeerParts& e : list)
      if (e.peer == peer) return &e;
    return nullptr;
  }
  void check_symmetry(int r, int j, const ExchangeStep& a, const ExchangeStep& b, const char* name) {
    const PeerParts* s = entry(a.send, j);
    const PeerParts* t = entry(b.recv, r);
    if (!s && !t) return;
    if (!s || !t)
      fail_at(r, j, "[symmetry] exchange ", name, ": rank ", r, (s ? " sends to " : " sends nothing to "), "rank ", j,
              " but rank ", j, (t ? " receives from " : " expects nothing from "), "rank ", r);
    const std::uint32_t ns = s->end - s->begin, nt = t->end - t->begin;
    if (ns != nt)
      fail_at(r, j, "[symmetry] exchange ", name, ": rank ", r, " sends ", ns, " parts to rank ", j, " which receives ", nt);
    for (std::uint32_t i = 0; i < ns; ++i) {
      const Part& x = a.send_parts[s->begin + i];
      const Part& y = b.recv_parts[t->begin + i];
      if (x.tokens != y.tokens || x.heads != y.heads || x.row_bytes != y.row_bytes ||
          !same_place(x.src, y.src) || !same_place(x.dst, y.dst))
        fail_at(r, j, "[symmetry] exchange ", name, ": part ", i, " from rank ", r, " to rank ", j, ": sender has ",
                part_str(x), ", receiver has ", part_str(y));
    }
  }

  // ---- [bounds] ---------------------------------------------------------------------------------
  i64 stage_size(int r, Slot s) const {
    return s == Slot::stage_in ? p_[r].stage_in_bytes : p_[r].stage_out_bytes;
  }
  i64 tensor_tokens(int r, Slot s) const {
    return s == Slot::k || s == Slot::v ? g_.kv_lens[r] : g_.q_lens[r];
  }
  i64 tensor_heads(Slot s) const { return s == Slot::k || s == Slot::v ? g_.kv_heads : g_.q_heads; }
  i64 tensor_row(Slot s) const { return s == Slot::lse ? 4 : row_; }
  static i64 pitch_of(const Place& pl, i64 dense) { return pl.pitch != 0 ? pl.pitch : dense; }

  // A block of tokens x heads x rb at `pl` on rank r (dense: heads per row when pitch is 0).
  // `describe` names the block for messages (called only on failure).
  template <class Describe>
  void check_place(int r, const Place& pl, i64 tokens, i64 heads, i64 rb, i64 dense, const Describe& describe) {
    if (tokens <= 0 || heads <= 0) return;
    auto what = [&] { return std::string(describe()); };
    if (detail::is_tensor(pl.slot)) {
      if (rb != tensor_row(pl.slot))
        fail_at(r, -1, "[bounds] ", what(), ": rows of ", rb, " bytes in ", detail::slot_name(pl.slot), " whose rows are ", tensor_row(pl.slot), " bytes");
      if (pl.slot == Slot::lse && !g_.with_lse) fail_at(r, -1, "[bounds] ", what(), ": names lse but the geometry has no lse");
      const i64 n = tensor_tokens(r, pl.slot), h = tensor_heads(pl.slot);
      if (pl.token < 0 || pl.head < 0 || pl.token + tokens > n || pl.head + heads > h)
        fail_at(r, -1, "[bounds] ", what(), ": tokens [", pl.token, ", ", pl.token + tokens, ") x heads [", pl.head, ", ",
                pl.head + heads, ") outside rank ", r, "'s ", detail::slot_name(pl.slot), " of ", n, " tokens x ", h, " heads");
    } else if (detail::is_staging(pl.slot)) {
      const i64 pitch = pitch_of(pl, dense);
      if (pl.pitch < 0 || (tokens > 1 && pitch < heads))
        fail_at(r, -1, "[bounds] ", what(), ": pitch ", pitch, " heads for a block of ", heads, " heads (rows would alias)");
      // Elements are read and written as floats / bf16 values: offsets on their alignment.
      const i64 align = rb == row_ ? g_.elem_bytes : rb == 4 ? 4 : 1;
      if (pl.offset % align != 0)
        fail_at(r, -1, "[bounds] ", what(), ": offset ", pl.offset, " is not a multiple of the ", align, "-byte element");
      const i64 end = pl.offset + ((tokens - 1) * pitch + heads) * rb, size = stage_size(r, pl.slot);
      if (pl.offset < 0 || end > size)
        fail_at(r, -1, "[bounds] ", what(), ": bytes [", pl.offset, ", ", end, ") outside rank ", r, "'s ", detail::slot_name(pl.slot), " of ", size, " bytes");
    } else if (pl.slot != Slot::pad) {
      fail_at(r, -1, "[bounds] ", what(), ": unknown slot ", static_cast<int>(pl.slot));
    }
  }

  void check_parts(int r) {
    const Program& p = p_[r];
    // Sends are checked on the sender's side and receives on the receiver's (the symmetry check
    // made both sides equal): src on r for sends, dst on r for receives.
    auto each = [&](const ExchangeStep& x, bool in) {
      for (const PeerParts& e : x.send)
        for (std::uint32_t i = e.begin; i < e.end; ++i) {
          const Part& pt = x.send_parts[i];
          auto what = [&] {
            std::ostringstream w;
            w << "rank " << r << " exchange " << (in ? "in" : "out") << " part " << i << " to rank " << e.peer
              << " (" << part_str(pt) << ") src";
            return w.str();
          };
          const bool ok = in ? (pt.src.slot == Slot::q || pt.src.slot == Slot::k || pt.src.slot == Slot::v || pt.src.slot == Slot::pad)
                             : (pt.src.slot == Slot::stage_out || pt.src.slot == Slot::pad);
          if (!ok) fail_at(r, e.peer, "[bounds] ", what(), ": exchange ", (in ? "in" : "out"), " may not read ", detail::slot_name(pt.src.slot));
          if (pt.src.slot == Slot::pad && pt.dst.slot == Slot::pad) fail_at(r, e.peer, "[bounds] ", what(), ": moves padding into padding");
          check_place(r, pt.src, pt.tokens, pt.heads, pt.row_bytes, pt.heads, what);
        }
      for (const PeerParts& e : x.recv)
        for (std::uint32_t i = e.begin; i < e.end; ++i) {
          const Part& pt = x.recv_parts[i];
          auto what = [&] {
            std::ostringstream w;
            w << "rank " << r << " exchange " << (in ? "in" : "out") << " part " << i << " from rank " << e.peer
              << " (" << part_str(pt) << ") dst";
            return w.str();
          };
          const bool ok = in ? (pt.dst.slot == Slot::stage_in || pt.dst.slot == Slot::pad)
                             : (pt.dst.slot == Slot::out || pt.dst.slot == Slot::lse || pt.dst.slot == Slot::pad);
          if (!ok) fail_at(r, e.peer, "[bounds] ", what(), ": exchange ", (in ? "in" : "out"), " may not write ", detail::slot_name(pt.dst.slot));
          check_place(r, pt.dst, pt.tokens, pt.heads, pt.row_bytes, pt.heads, what);
        }
    };
    each(p.in, true);
    each(p.out, false);
  }

  // kv heads (relative to kv_head_begin) that the q heads of a step read.
  std::pair<i64, i64> kv_local_range(const ComputeStep& s) const {
    const i64 lo = s.q_head_begin / group_ - s.kv_head_begin;
    const i64 hi = (s.q_head_begin + s.q_heads - 1) / group_ - s.kv_head_begin + 1;
    return {lo, hi};
  }

  // ---- [compute] --------------------------------------------------------------------------------
  void check_compute(int r) {
    const Program& p = p_[r];
    const i64 max_heads = kind_ == Gen::padded ? hpr_ * P_ : g_.q_heads;
    for (std::size_t si = 0; si < p.compute.size(); ++si) {
      const ComputeStep& s = p.compute[si];
      std::ostringstream sw;
      sw << "rank " << r << " step " << si << " (q heads [" << s.q_head_begin << ", " << s.q_head_begin + s.q_heads
         << "), kv head " << s.kv_head_begin << ", q_first " << s.q_first << ", q_total " << s.q_total
         << ", kv_total " << s.kv_total << ")";
      const std::string step = sw.str();
      if (s.q_heads <= 0 || s.q_head_begin < 0 || s.q_head_begin + s.q_heads > max_heads)
        fail_at(r, -1, "[compute] ", step, ": q heads outside [0, ", max_heads, ")");
      if (s.q.empty()) fail_at(r, -1, "[compute] ", step, ": no query segment");
      const auto [kv_lo, kv_hi] = kv_local_range(s);
      if (kv_lo < 0) fail_at(r, -1, "[compute] ", step, ": its q heads read kv head ", s.q_head_begin / group_, " before kv_head_begin");
      i64 kv_tokens = 0, q_tokens = 0;
      for (std::size_t i = 0; i < s.kv.size(); ++i) {
        const KeySegment& k = s.kv[i];
        if (k.tokens < 0) fail_at(r, -1, "[compute] ", step, " kv segment ", i, ": ", k.tokens, " tokens");
        kv_tokens += k.tokens;
        for (const Place* pl : {&k.k, &k.v}) {
          auto what = [&] {
            std::ostringstream w;
            w << step << " kv segment " << i << " " << place_str(*pl);
            return w.str();
          };
          const bool ok = pl->slot == (pl == &k.k ? Slot::k : Slot::v) || pl->slot == Slot::stage_in || pl->slot == Slot::pad;
          if (!ok) fail_at(r, -1, "[bounds] ", what(), ": a key/value segment may not read ", detail::slot_name(pl->slot));
          // Heads [0, kv_hi) of the block relative to kv_head_begin (those below kv_lo unread).
          check_place(r, *pl, k.tokens, kv_hi, row_, k.dense_heads, what);
        }
      }
      if (kv_tokens != s.kv_total)
        fail_at(r, -1, "[compute] ", step, ": key segments hold ", kv_tokens, " tokens but kv_total is ", s.kv_total);
      if (s.kv_total > Skv_) fail_at(r, -1, "[compute] ", step, ": kv_total past the ", Skv_, " keys");
      for (std::size_t i = 0; i < s.q.size(); ++i) {
        const QuerySegment& q = s.q[i];
        if (q.tokens < 0) fail_at(r, -1, "[compute] ", step, " q segment ", i, ": ", q.tokens, " tokens");
        q_tokens += q.tokens;
        auto what = [&] {
          std::ostringstream w;
          w << step << " q segment " << i;
          return w.str();
        };
        if (!(q.q.slot == Slot::q || q.q.slot == Slot::stage_in || q.q.slot == Slot::pad))
          fail_at(r, -1, "[bounds] ", what(), ": a query segment may not read ", detail::slot_name(q.q.slot));
        if (!(q.out.slot == Slot::out || q.out.slot == Slot::stage_out || q.out.slot == Slot::pad))
          fail_at(r, -1, "[bounds] ", what(), ": output may not go to ", detail::slot_name(q.out.slot));
        if (!(q.lse.slot == Slot::lse || q.lse.slot == Slot::stage_out || q.lse.slot == Slot::pad))
          fail_at(r, -1, "[bounds] ", what(), ": lse may not go to ", detail::slot_name(q.lse.slot));
        if (!g_.with_lse && q.lse.slot != Slot::pad)
          fail_at(r, -1, "[bounds] ", what(), ": writes lse (", place_str(q.lse), ") without with_lse");
        check_place(r, q.q, q.tokens, s.q_heads, row_, q.dense_heads, [&] { return what() + " q " + place_str(q.q); });
        check_place(r, q.out, q.tokens, s.q_heads, row_, q.dense_heads, [&] { return what() + " out " + place_str(q.out); });
        check_place(r, q.lse, q.tokens, s.q_heads, 4, q.dense_heads, [&] { return what() + " lse " + place_str(q.lse); });
      }
      if (s.q_first < 0 || s.q_first + q_tokens > s.q_total)
        fail_at(r, -1, "[compute] ", step, ": rows [", s.q_first, ", ", s.q_first + q_tokens, ") outside its q_total");
      if (kind_ == Gen::uaa && s.docs.empty() && s.q_first % detail::kQueryRowGranule != 0)
        fail_at(r, -1, "[compute] ", step, ": q_first is not a multiple of the query-row granule ", detail::kQueryRowGranule);
      check_spans(r, s, step);
    }
  }

  // Document spans: in document order, partitioning the step's segments; each span's rows inside
  // its document, starting on the granule from the document's start, its keys the whole document.
  void check_spans(int r, const ComputeStep& s, const std::string& step) {
    if (s.docs.empty()) {
      if (g_.q_doc_start.size() > 2 && kind_ == Gen::uaa)
        fail_at(r, -1, "[compute] ", step, ": a plan of ", g_.q_doc_start.size() - 1, " documents but no spans");
      return;
    }
    std::uint32_t q_at = 0, kv_at = 0;
    i64 prev_kv_end = 0;
    for (std::size_t d = 0; d < s.docs.size(); ++d) {
      const detail::DocSpan& sp = s.docs[d];
      if (sp.q_begin != q_at || sp.q_end <= sp.q_begin || sp.kv_begin < kv_at || sp.kv_end < sp.kv_begin ||
          sp.kv_end > s.kv.size())
        fail_at(r, -1, "[compute] ", step, " span ", d, ": segments [", sp.q_begin, ", ", sp.q_end, ") / [", sp.kv_begin,
                ", ", sp.kv_end, ") do not follow the previous span's");
      if (sp.kv_first < prev_kv_end)
        fail_at(r, -1, "[compute] ", step, " span ", d, ": documents out of order");
      i64 rows = 0, keys = 0;
      for (std::uint32_t i = sp.q_begin; i < sp.q_end && i < s.q.size(); ++i) rows += s.q[i].tokens;
      for (std::uint32_t i = sp.kv_begin; i < sp.kv_end && i < s.kv.size(); ++i) keys += s.kv[i].tokens;
      if (sp.q_first < 0 || sp.q_first + rows > sp.q_total)
        fail_at(r, -1, "[compute] ", step, " span ", d, ": rows [", sp.q_first, ", ", sp.q_first + rows, ") outside ", sp.q_total);
      if (keys != sp.kv_total)
        fail_at(r, -1, "[compute] ", step, " span ", d, ": ", keys, " keys but kv_total ", sp.kv_total);
      if (sp.q_first % detail::kQueryRowGranule != 0)
        fail_at(r, -1, "[compute] ", step, " span ", d, ": q_first ", sp.q_first, " is not on the granule");
      q_at = sp.q_end;
      kv_at = sp.kv_end;
      prev_kv_end = sp.kv_first + sp.kv_total;
    }
    if (q_at != s.q.size())
      fail_at(r, -1, "[compute] ", step, ": spans cover ", q_at, " of ", s.q.size(), " q segments");
  }

  // ---- [batch] ----------------------------------------------------------------------------------
  bool spans_sequences(Slot slot, i64 head, i64 heads) const {
    if (g_.batch <= 1 || heads <= 0 || !detail::is_tensor(slot)) return false;
    const bool kv = slot == Slot::k || slot == Slot::v;
    const i64 H = (kv ? g_.kv_heads : g_.q_heads) / g_.batch;
    return head / H != (head + heads - 1) / H;
  }
  void check_batch(int r) {
    if (g_.batch <= 1) return;
    for (const ExchangeStep* e : {&p_[r].in, &p_[r].out})
      for (const auto* parts : {&e->send_parts, &e->recv_parts})
        for (const Part& x : *parts)
          for (const Place* pl : {&x.src, &x.dst})
            if (spans_sequences(pl->slot, pl->head, x.heads))
              fail_at(r, -1, "[batch] part ", place_str(*pl), " of ", x.heads, " heads spans two sequences");
    for (const ComputeStep& s : p_[r].compute) {
      const i64 kv_heads = kv_local_range(s).second;
      for (const QuerySegment& q : s.q)
        for (const Place* pl : {&q.q, &q.out, &q.lse})
          if (spans_sequences(pl->slot, pl->head, s.q_heads))
            fail_at(r, -1, "[batch] step at q head ", s.q_head_begin, ": ", place_str(*pl), " spans two sequences");
      for (const KeySegment& k : s.kv)
        for (const Place* pl : {&k.k, &k.v})
          if (spans_sequences(pl->slot, pl->head, kv_heads))
            fail_at(r, -1, "[batch] step at q head ", s.q_head_begin, ": ", place_str(*pl), " spans two sequences");
    }
  }

  // ---- [overlap] --------------------------------------------------------------------------------
  // Strided blocks are one interval per token: past this many in one rank, the overlap check of
  // that rank is left out (huge token counts; overlap_skipped says so).
  static constexpr std::size_t kMaxIntervals = std::size_t{1} << 22;
  void add_block(std::vector<Interval>& out, const Place& pl, i64 tokens, i64 heads, i64 rb,
                 i64 dense, int kind, std::size_t index, i64 peer) {
    if (tokens <= 0 || heads <= 0) return;
    const i64 pitch = pitch_of(pl, dense);
    if (pitch == heads || tokens == 1) {
      out.push_back({pl.offset, pl.offset + tokens * heads * rb, kind, index, peer});
    } else if (out.size() + static_cast<std::size_t>(tokens) > kMaxIntervals) {
      overlap_skipped = true;
    } else {
      for (i64 t = 0; t < tokens; ++t)
        out.push_back({pl.offset + t * pitch * rb, pl.offset + (t * pitch + heads) * rb, kind, index, peer});
    }
  }
  std::string interval_str(int r, const Interval& x) const {
    std::ostringstream os;
    if (x.kind == 0) {
      os << "part " << x.index << " from rank " << x.peer << " (" << part_str(p_[r].in.recv_parts[x.index]) << ")";
    } else {
      os << "step " << x.index << " q segment " << x.peer << (x.kind == 1 ? " out" : " lse");
    }
    return os.str();
  }
  void no_overlap(int r, std::vector<Interval>& v, const char* buffer) const {
    std::sort(v.begin(), v.end(), [](const Interval& a, const Interval& b) { return a.lo < b.lo; });
    for (std::size_t i = 1; i < v.size(); ++i)
      if (v[i].lo < v[i - 1].hi)
        fail_at(r, -1, "[overlap] rank ", r, " ", buffer, " bytes [", v[i].lo, ", ", std::min(v[i].hi, v[i - 1].hi),
                ") written twice: by ", interval_str(r, v[i - 1]), " and by ", interval_str(r, v[i]));
  }
  void check_overlap(int r) {
    const Program& p = p_[r];
    std::vector<Interval> in, out;
    for (const PeerParts& e : p.in.recv)
      for (std::uint32_t i = e.begin; i < e.end; ++i) {
        const Part& pt = p.in.recv_parts[i];
        if (pt.dst.slot != Slot::stage_in) continue;
        add_block(in, pt.dst, pt.tokens, pt.heads, pt.row_bytes, pt.heads, 0, i, e.peer);
      }
    for (std::size_t si = 0; si < p.compute.size(); ++si) {
      const ComputeStep& s = p.compute[si];
      for (std::size_t i = 0; i < s.q.size(); ++i) {
        const QuerySegment& q = s.q[i];
        const i64 seg = static_cast<i64>(i);
        if (q.out.slot == Slot::stage_out) add_block(out, q.out, q.tokens, s.q_heads, row_, q.dense_heads, 1, si, seg);
        if (q.lse.slot == Slot::stage_out) add_block(out, q.lse, q.tokens, s.q_heads, 4, q.dense_heads, 2, si, seg);
      }
    }
    no_overlap(r, in, "stage_in");
    no_overlap(r, out, "stage_out");
  }

  // ---- [staging] --------------------------------------------------------------------------------
  void check_staging(int r) {
    const Program& p = p_[r];
    i64 in = 0, out = 0;
    for (const PeerParts& e : p.in.recv)
      for (std::uint32_t i = e.begin; i < e.end; ++i)
        if (p.in.recv_parts[i].dst.slot == Slot::stage_in) in += p.in.recv_parts[i].bytes();
    for (const ComputeStep& s : p.compute)
      for (const QuerySegment& q : s.q) {
        if (q.out.slot == Slot::stage_out) out += q.tokens * s.q_heads * row_;
        if (q.lse.slot == Slot::stage_out) out += q.tokens * s.q_heads * 4;
      }
    const i64 in_areas = kind_ == Gen::uaa ? 5 : kind_ == Gen::padded ? 3 * P_ : 2;
    const i64 out_areas = kind_ == Gen::uaa ? 6 : kind_ == Gen::padded ? 2 * P_ : 0;
    if (p.stage_in_bytes > in + 63 * in_areas || p.stage_out_bytes > out + 63 * out_areas || p.stage_in_bytes < 0 ||
        p.stage_out_bytes < 0)
      fail_at(r, -1, "[staging] rank ", r, ": stage_in ", p.stage_in_bytes, " bytes for ", in, " received, stage_out ",
              p.stage_out_bytes, " bytes for ", out, " computed (at most ", in_areas, " / ", out_areas,
              " areas of 63 bytes of alignment allowed)");
  }

  // ---- [bytes] ----------------------------------------------------------------------------------
  static i64 bytes_with_peers(const std::vector<PeerParts>& list, const std::vector<Part>& parts, int self, int only = -1) {
    i64 n = 0;
    for (const PeerParts& e : list) {
      if (only >= 0 ? e.peer != only : e.peer == self) continue;
      for (std::uint32_t i = e.begin; i < e.end; ++i) n += parts[i].bytes();
    }
    return n;
  }
  // Independently derived bytes r sends to peer j in each exchange (in, out).
  std::pair<i64, i64> expected_to(int r, int j) const {
    const i64 Hq = g_.q_heads, lse = g_.with_lse ? 4 : 0;
    if (kind_ == Gen::allgather) return {2 * g_.kv_lens[r] * g_.kv_heads * row_, 0};
    if (kind_ == Gen::padded) {
      const i64 Sp = padded_rows(g_.q_lens), Skp = padded_rows(g_.kv_lens);
      const i64 kvh = padded_kv_heads();
      return {(Sp * hpr_ + 2 * Skp * kvh) * row_, Sp * hpr_ * (row_ + lse)};
    }
    // uaa, from the split: r sends j its rows of j's pieces and its keys/values of the kv heads
    // j's query heads read; j returns the output (and lse) of r's rows of j's pieces.
    const detail::RowRange mine{q_start_[r], q_start_[r + 1]}, theirs{q_start_[j], q_start_[j + 1]};
    const detail::RankWork& wj = work_[j];
    const detail::RankWork& wr = work_[r];
    i64 in = 0, out = 0;
    for (int i = 0; i < wj.pieces; ++i)
      in += detail::rows_held(wj.piece[i], mine).size() * wj.piece[i].heads.size() * row_;
    if (wj.pieces > 0) {
      const i64 first = wj.piece[0].heads.begin, last = wj.piece[wj.pieces - 1].heads.end - 1;
      in += 2 * g_.kv_lens[r] * (last / group_ - first / group_ + 1) * row_;
    }
    for (int i = 0; i < wr.pieces; ++i)
      out += detail::rows_held(wr.piece[i], theirs).size() * wr.piece[i].heads.size() * (row_ + lse);
    (void)Hq;
    return {in, out};
  }
  // uaa with whole heads (q_heads divides by P, some rows): plain Ulysses' counts, from the heads
  // alone.
  std::pair<i64, i64> plain_ulysses_to(int r, int j) const {
    const i64 h = g_.q_heads / P_, lse = g_.with_lse ? 4 : 0;
    const i64 nkv_j = ((j + 1) * h - 1) / group_ - (j * h) / group_ + 1;
    return {g_.q_lens[r] * h * row_ + 2 * g_.kv_lens[r] * nkv_j * row_, g_.q_lens[j] * h * (row_ + lse)};
  }
  i64 padded_rows(const std::vector<i64>& lens) const {
    i64 rows = (sum_of(lens) + P_ - 1) / P_;
    for (i64 x : lens) rows = std::max(rows, x);
    return rows;
  }
  i64 padded_kv_heads() const {
    i64 n = 0;
    for (int r = 0; r < P_; ++r) {
      const i64 first = r * hpr_, last = first + hpr_ - 1;
      n = std::max(n, last / group_ - first / group_ + 1);
    }
    return n;
  }
  void check_bytes(int r) {
    const Program& p = p_[r];
    const i64 in_s = bytes_with_peers(p.in.send, p.in.send_parts, r), in_r = bytes_with_peers(p.in.recv, p.in.recv_parts, r);
    const i64 out_s = bytes_with_peers(p.out.send, p.out.send_parts, r), out_r = bytes_with_peers(p.out.recv, p.out.recv_parts, r);
    if (p.in.bytes_to_peers() != in_s || p.out.bytes_to_peers() != out_s || p.bytes_sent() != in_s + out_s)
      fail_at(r, -1, "[bytes] rank ", r, ": bytes_sent() ", p.bytes_sent(), " (in ", p.in.bytes_to_peers(), ", out ",
              p.out.bytes_to_peers(), ") but its parts to other ranks hold ", in_s + out_s, " (in ", in_s, ", out ", out_s, ")");
    if (p.in.bytes_from_peers() != in_r || p.out.bytes_from_peers() != out_r || p.bytes_received() != in_r + out_r)
      fail_at(r, -1, "[bytes] rank ", r, ": bytes_received() ", p.bytes_received(), " but its parts from other ranks hold ",
              in_r + out_r);
    i64 want_s = 0, want_r = 0;
    for (int j = 0; j < P_; ++j) {
      if (j == r) continue;
      const auto [a, b] = expected_to(r, j);
      const auto [c, d] = expected_to(j, r);
      if (kind_ == Gen::uaa && Sq_ > 0 && g_.q_heads % P_ == 0 && plain_ulysses_to(r, j) != std::make_pair(a, b))
        fail_at(r, j, "[bytes] rank ", r, " to rank ", j, ": heads divide but the split's counts ", a, " + ", b,
                " are not plain Ulysses' ", plain_ulysses_to(r, j).first, " + ", plain_ulysses_to(r, j).second);
      const i64 got_in = bytes_with_peers(p.in.send, p.in.send_parts, r, j);
      const i64 got_out = bytes_with_peers(p.out.send, p.out.send_parts, r, j);
      if (got_in != a || got_out != b)
        fail_at(r, j, "[bytes] rank ", r, " sends rank ", j, " ", got_in, " + ", got_out, " bytes (in + out) but ",
                gen_name(kind_), " should send ", a, " + ", b);
      want_s += a + b;
      want_r += c + d;
    }
    if (p.bytes_sent() != want_s || p.bytes_received() != want_r)
      fail_at(r, -1, "[bytes] rank ", r, ": sends/receives ", p.bytes_sent(), "/", p.bytes_received(), " bytes, expected ",
              want_s, "/", want_r);
  }

  // ---- [strategy] -------------------------------------------------------------------------------
  void check_strategy(int r) {
    const Program& p = p_[r];
    if (kind_ == Gen::uaa) {
      for (const auto* list : {&p.in.send, &p.in.recv, &p.out.send, &p.out.recv})
        if (entry(*list, r)) fail_at(r, r, "[strategy] uaa: rank ", r, " exchanges parts with itself");
    } else if (kind_ == Gen::padded) {
      // Every block travels, the own one included: equal counts to and from every rank.
      const auto [a, b] = expected_to(r, r);
      for (int j = 0; j < P_; ++j) {
        const i64 in_s = bytes_with_peers(p.in.send, p.in.send_parts, r, j), in_r = bytes_with_peers(p.in.recv, p.in.recv_parts, r, j);
        const i64 out_s = bytes_with_peers(p.out.send, p.out.send_parts, r, j), out_r = bytes_with_peers(p.out.recv, p.out.recv_parts, r, j);
        if (in_s != a || in_r != a || out_s != b || out_r != b)
          fail_at(r, j, "[strategy] padded: rank ", r, " with rank ", j, ": in ", in_s, "/", in_r, " out ", out_s, "/", out_r,
                  " bytes (sent/received); every pair, self included, moves in ", a, " out ", b);
      }
    } else {
      if (!p.out.send.empty() || !p.out.recv.empty() || !p.out.send_parts.empty() || !p.out.recv_parts.empty())
        fail_at(r, -1, "[strategy] allgather_kv: rank ", r, " has an output exchange");
      if (p.compute.size() > 1 || (g_.q_lens[r] > 0 && p.compute.size() != 1))
        fail_at(r, -1, "[strategy] allgather_kv: rank ", r, " has ", p.compute.size(), " compute steps");
      if (entry(p.in.send, r) || entry(p.in.recv, r)) fail_at(r, r, "[strategy] allgather_kv: rank ", r, " exchanges with itself");
      for (const ComputeStep& s : p.compute) {
        i64 n = 0;
        for (const QuerySegment& q : s.q) {
          n += q.tokens;
          if (q.q.slot != Slot::q || q.out.slot != Slot::out)
            fail_at(r, -1, "[strategy] allgather_kv: rank ", r, " reads or writes its rows elsewhere than in its tensors");
        }
        if (s.q_head_begin != 0 || s.q_heads != g_.q_heads || n != g_.q_lens[r])
          fail_at(r, -1, "[strategy] allgather_kv: rank ", r, "'s step computes heads [", s.q_head_begin, ", ",
                  s.q_head_begin + s.q_heads, ") of ", n, " rows, not all heads of its ", g_.q_lens[r], " rows");
      }
    }
  }

  // ---- [round trip] -----------------------------------------------------------------------------
  void init_memory() {
    if (static_cast<int>(mem_.size()) < P_) mem_.resize(P_);
    for (int r = 0; r < P_; ++r) {
      RankMem& m = mem_[r];
      // Deliberately unlike each other and not dense: padded token strides and head-major.
      m.q.init(g_.q_lens[r], g_.q_heads, row_, false, 1);
      m.k.init(g_.kv_lens[r], g_.kv_heads, row_, true, 2);
      m.v.init(g_.kv_lens[r], g_.kv_heads, row_, false, 0);
      m.out.init(g_.q_lens[r], g_.q_heads, row_, true, 1);
      m.lse.init(g_.with_lse ? g_.q_lens[r] : 0, g_.q_heads, 4, false, 3);
      for (i64 t = 0; t < g_.q_lens[r]; ++t)
        for (i64 h = 0; h < g_.q_heads; ++h) {
          Prov* e = m.q.at(t, h);
          for (i64 b = 0; b < row_; ++b) e[b] = prov(kQ, q_start_[r] + t, h, b);
        }
      for (i64 t = 0; t < g_.kv_lens[r]; ++t)
        for (i64 h = 0; h < g_.kv_heads; ++h) {
          Prov* k = m.k.at(t, h);
          Prov* v = m.v.at(t, h);
          for (i64 b = 0; b < row_; ++b) {
            k[b] = prov(kK, kv_start_[r] + t, h, b);
            v[b] = prov(kV, kv_start_[r] + t, h, b);
          }
        }
      m.stage_in.assign(static_cast<std::size_t>(p_[r].stage_in_bytes), kUnset);
      m.stage_out.assign(static_cast<std::size_t>(p_[r].stage_out_bytes), kUnset);
      m.in_writes.assign(m.stage_in.size(), 0);
      m.out_computed.assign(m.stage_out.size(), 0);
      m.out_sent.assign(m.stage_out.size(), 0);
    }
  }

  TensorMem& tensor(int r, Slot s) {
    RankMem& m = mem_[r];
    switch (s) {
      case Slot::q: return m.q;
      case Slot::k: return m.k;
      case Slot::v: return m.v;
      case Slot::out: return m.out;
      default: return m.lse;
    }
  }

  // Byte 0 of element (t, h) of the block at `pl` on rank r (nullptr: padding). `idx` receives the
  // staging byte offset (or the tensor element index), for the write/read counts.
  Prov* elem(int r, const Place& pl, i64 t, i64 h, i64 dense, i64 rb, i64* idx) {
    if (pl.slot == Slot::pad) return nullptr;
    if (detail::is_tensor(pl.slot)) {
      TensorMem& m = tensor(r, pl.slot);
      const i64 tt = pl.token + t, hh = pl.head + h;
      if (tt < 0 || tt >= m.tokens || hh < 0 || hh >= m.heads || rb != m.rb)
        fail_at(r, -1, "[bounds] rank ", r, ": element (", tt, ", ", hh, ") of ", detail::slot_name(pl.slot), " outside its ",
                m.tokens, " x ", m.heads, " tensor");
      *idx = tt * m.heads + hh;
      return m.at(tt, hh);
    }
    std::vector<Prov>& buf = pl.slot == Slot::stage_in ? mem_[r].stage_in : mem_[r].stage_out;
    const i64 at = pl.offset + (t * pitch_of(pl, dense) + h) * rb;
    if (at < 0 || at + rb > static_cast<i64>(buf.size()))
      fail_at(r, -1, "[bounds] rank ", r, ": bytes [", at, ", ", at + rb, ") outside ", detail::slot_name(pl.slot), " of ", buf.size());
    *idx = at;
    return buf.data() + at;
  }

  void run_exchange(int r, const ExchangeStep& x, const char* name) {
    const bool in = std::string(name) == "in";
    for (const PeerParts& e : x.send) {
      const int j = e.peer;
      for (std::uint32_t i = e.begin; i < e.end; ++i) {
        const Part& pt = x.send_parts[i];
        for (i64 t = 0; t < pt.tokens; ++t)
          for (i64 h = 0; h < pt.heads; ++h) {
            i64 si = 0, di = 0;
            const Prov* src = elem(r, pt.src, t, h, pt.heads, pt.row_bytes, &si);
            Prov* dst = elem(j, pt.dst, t, h, pt.heads, pt.row_bytes, &di);
            if (!in && src) {
              RankMem& m = mem_[r];
              for (i64 b = 0; b < pt.row_bytes; ++b) {
                if (++m.out_sent[si + b] > 1)
                  fail_at(r, j, "[coverage] rank ", r, " sends stage_out byte ", si + b, " twice (", prov_str(src[b]),
                          "), the second time in part ", i, " to rank ", j, " (", part_str(pt), ")");
                if (!m.out_computed[si + b] && pt.dst.slot != Slot::pad)
                  fail_at(r, j, "[coverage] rank ", r, " sends stage_out byte ", si + b, " that no compute step wrote, in part ", i,
                          " to rank ", j, " (", part_str(pt), ")");
              }
            }
            if (!dst) continue;
            if (pt.dst.slot == Slot::stage_in) {
              RankMem& m = mem_[j];
              for (i64 b = 0; b < pt.row_bytes; ++b)
                if (++m.in_writes[di + b] > 1)
                  fail_at(j, r, "[overlap] rank ", j, " stage_in byte ", di + b, " written twice, the second time by part ", i,
                          " from rank ", r, " (", part_str(pt), ")");
            } else if (detail::is_tensor(pt.dst.slot)) {
              ++tensor(j, pt.dst.slot).writes[di];
            }
            for (i64 b = 0; b < pt.row_bytes; ++b) dst[b] = src ? src[b] : kZero;
          }
      }
    }
  }

  // Decodes one row: 0 zeros, 1 consistent provenance of `tag` (token, head out), -1 otherwise.
  static int decode_row(const Prov* e, i64 rb, Prov tag, i64* token, i64* head, Prov* bad) {
    if (e[0] == kZero) {
      for (i64 b = 1; b < rb; ++b)
        if (e[b] != kZero) return *bad = e[b], -1;
      return 0;
    }
    if (tag_of(e[0]) != tag || e[0] == kUnset) return *bad = e[0], -1;
    *token = token_of(e[0]);
    *head = head_of(e[0]);
    for (i64 b = 0; b < rb; ++b)
      if (e[b] != prov(tag, *token, *head, b)) return *bad = e[b], -1;
    return 1;
  }

  void run_compute(int r, std::size_t si) {
    const ComputeStep& s = p_[r].compute[si];
    if (s.docs.empty()) run_span(r, si, detail::DocSpan{0, static_cast<std::uint32_t>(s.q.size()), 0,
                                                        static_cast<std::uint32_t>(s.kv.size()), s.q_first,
                                                        s.q_total, 0, s.kv_total});
    for (const detail::DocSpan& d : s.docs) run_span(r, si, d);
  }

  // The document of global query row `tok` (query start, rows, key start, keys).
  std::array<i64, 4> doc_of(i64 tok) const {
    if (g_.q_doc_start.size() <= 2) return {0, Sq_, 0, Skv_};
    const auto it = std::upper_bound(g_.q_doc_start.begin(), g_.q_doc_start.end() - 1, tok) - 1;
    const std::size_t d = static_cast<std::size_t>(it - g_.q_doc_start.begin());
    return {g_.q_doc_start[d], g_.q_doc_start[d + 1] - g_.q_doc_start[d], g_.kv_doc_start[d],
            g_.kv_doc_start[d + 1] - g_.kv_doc_start[d]};
  }

  void run_span(int r, std::size_t si, const detail::DocSpan& span) {
    const ComputeStep& s = p_[r].compute[si];
    std::ostringstream sw;
    sw << "rank " << r << " step " << si << " (q heads [" << s.q_head_begin << ", " << s.q_head_begin + s.q_heads
       << "), kv head " << s.kv_head_begin << ", q_first " << s.q_first << ", q_total " << s.q_total << ", kv_total "
       << s.kv_total << (s.causal ? ", causal" : "") << ")";
    const std::string step = sw.str();
    // Keys: position j of the concatenated segments is global key j of every kv head read.
    const auto [kv_lo, kv_hi] = kv_local_range(s);
    i64 pos = span.kv_first;
    for (std::size_t i = span.kv_begin; i < span.kv_end; ++i) {
      const KeySegment& ks = s.kv[i];
      for (i64 t = 0; t < ks.tokens; ++t, ++pos)
        for (i64 kl = kv_lo; kl < kv_hi; ++kl) {
          const i64 kvh = s.kv_head_begin + kl;
          if (kvh >= g_.kv_heads) continue;  // padded kv heads: whatever they hold is never output
          for (int which = 0; which < 2; ++which) {
            i64 idx = 0, tok = 0, head = 0;
            Prov bad = 0;
            const Prov tag = which == 0 ? kK : kV;
            const Prov* e = elem(r, which == 0 ? ks.k : ks.v, t, kl, ks.dense_heads, row_, &idx);
            const int d = e ? decode_row(e, row_, tag, &tok, &head, &bad) : 0;
            if (d != 1 || tok != pos || head != kvh)
              fail_at(r, -1, "[round trip] ", step, ": key position ", pos, " (kv segment ", i, " token ", t, ") of kv head ",
                      kvh, " holds ", d == 1 ? prov_str(e[0]) : d == 0 ? std::string("zeros") : prov_str(bad),
                      " instead of ", which == 0 ? "k" : "v", "(token ", pos, ", head ", kvh, ")");
          }
        }
    }
    // Queries: the kernel's row position q_first + i must be a global row whose causal horizon is
    // the kernel's; the output carries the row's provenance.
    i64 p = span.q_first;
    for (std::size_t i = span.q_begin; i < span.q_end; ++i) {
      const QuerySegment& qs = s.q[i];
      for (i64 t = 0; t < qs.tokens; ++t, ++p) {
        i64 row_token = -1;
        for (i64 h = 0; h < s.q_heads; ++h) {
          const i64 hg = s.q_head_begin + h;
          i64 idx = 0, tok = 0, head = 0;
          Prov bad = 0;
          const Prov* e = elem(r, qs.q, t, h, qs.dense_heads, row_, &idx);
          const int d = e ? decode_row(e, row_, kQ, &tok, &head, &bad) : 0;
          if (d < 0)
            fail_at(r, -1, "[round trip] ", step, " q segment ", i, " token ", t, " head ", hg, ": reads ", prov_str(bad),
                    " (not one whole query row)");
          if (d == 1) {
            if (head != hg)
              fail_at(r, -1, "[round trip] ", step, " q segment ", i, " token ", t, ": local head ", h, " (global ", hg,
                      ") holds query head ", head, " (token ", tok, ")");
            if (row_token >= 0 && tok != row_token)
              fail_at(r, -1, "[round trip] ", step, " q segment ", i, " token ", t, ": heads hold different tokens ", row_token,
                      " and ", tok);
            row_token = tok;
            // The keys the kernel lets row position p see (global key numbers), and the keys
            // global row tok sees in its document: the same range, or both none.
            i64 k0 = span.kv_first + detail::first_visible_key(p, span.q_total, span.kv_total, s.window_left);
            i64 k1 = span.kv_first + detail::last_visible_key(p, span.q_total, span.kv_total, s.causal, s.window_right);
            const auto [qs0, nq, ks0, nk] = doc_of(tok);
            i64 t0 = ks0 + detail::first_visible_key(tok - qs0, nq, nk, g_.window_left);
            i64 t1 = ks0 + detail::last_visible_key(tok - qs0, nq, nk, g_.causal, g_.window_right);
            if (k0 > k1) k0 = 0, k1 = -1;
            if (t0 > t1) t0 = 0, t1 = -1;
            if (k0 != t0 || k1 != t1)
              fail_at(r, -1, "[round trip] ", step, " q segment ", i, " token ", t, ": the kernel lets row position ", p,
                      " attend keys [", k0, ", ", k1, "] but global query row ", tok, " attends keys [", t0, ", ", t1, "]");
          }
          // The kernel writes output row (t, h) of this segment.
          write_out(r, qs.out, t, h, qs.dense_heads, row_, d == 1 ? prov(kOut, tok, hg, 0) : prov(kPadOut, 0, 0, 0), step, i);
          if (qs.lse.slot != Slot::pad)
            write_out(r, qs.lse, t, h, qs.dense_heads, 4, d == 1 ? prov(kLse, tok, hg, 0) : prov(kPadLse, 0, 0, 0), step, i);
        }
      }
    }
  }

  void write_out(int r, const Place& pl, i64 t, i64 h, i64 dense, i64 rb, Prov base, const std::string& step, std::size_t seg) {
    i64 idx = 0;
    Prov* e = elem(r, pl, t, h, dense, rb, &idx);
    if (!e) return;
    if (pl.slot == Slot::stage_out) {
      RankMem& m = mem_[r];
      for (i64 b = 0; b < rb; ++b)
        if (++m.out_computed[idx + b] > 1)
          fail_at(r, -1, "[overlap] ", step, " q segment ", seg, " token ", t, " head ", h, ": stage_out byte ", idx + b,
                  " written twice (it held ", prov_str(e[b]), ")");
    } else {
      ++tensor(r, pl.slot).writes[idx];
    }
    for (i64 b = 0; b < rb; ++b) e[b] = base + static_cast<Prov>(b);
  }

  void verify_rank(int r) {
    RankMem& m = mem_[r];
    for (std::size_t b = 0; b < m.stage_out.size(); ++b) {
      const Prov t = tag_of(m.stage_out[b]);
      if (m.out_computed[b] && m.out_sent[b] == 0 && (t == kOut || t == kLse) && m.stage_out[b] != kUnset)
        fail_at(r, -1, "[coverage] rank ", r, " computed ", prov_str(m.stage_out[b]), " at stage_out byte ", b,
                " but never sends it");
    }
    for (int which = 0; which < (g_.with_lse ? 2 : 1); ++which) {
      TensorMem& o = which == 0 ? m.out : m.lse;
      const Prov tag = which == 0 ? kOut : kLse;
      for (i64 t = 0; t < o.tokens; ++t)
        for (i64 h = 0; h < o.heads; ++h) {
          const int w = o.writes[static_cast<std::size_t>(t * o.heads + h)];
          if (w != 1)
            fail_at(r, -1, "[coverage] rank ", r, " ", which == 0 ? "out" : "lse", " element (token ", t, ", head ", h,
                    ") written ", w, " times");
          const Prov* e = o.at(t, h);
          for (i64 b = 0; b < o.rb; ++b)
            if (e[b] != prov(tag, q_start_[r] + t, h, b))
              fail_at(r, -1, "[round trip] rank ", r, " ", which == 0 ? "out" : "lse", " element (token ", t, ", head ", h,
                      ") byte ", b, " holds ", prov_str(e[b]), " instead of ", prov_str(prov(tag, q_start_[r] + t, h, b)));
        }
    }
  }
};

}  // namespace check_detail

// Every property above for every rank's program of `g` (programs[r] is rank r's).
inline CheckResult check_programs(const detail::Geometry& g, const std::vector<detail::Program>& programs, Gen kind,
                                  const CheckOptions& opt = {}) {
  CheckResult res;
  check_detail::Checker c(g, programs, kind);
  try {
    c.structural();
    if (opt.round_trip && c.sim_possible() && c.sim_entries() <= opt.max_sim_entries) {
      c.round_trip();
    } else {
      res.round_trip_skipped = true;
    }
    res.overlap_skipped = c.overlap_skipped;
  } catch (const check_detail::Failure& f) {
    std::ostringstream os;
    os << f.what() << "\n  geometry: " << geometry_str(g) << " (" << gen_name(kind) << ")";
    for (int r : {f.rank, f.peer}) {
      if (r < 0 || r >= static_cast<int>(programs.size()) || (r == f.peer && f.peer == f.rank)) continue;
      if (program_size(programs[r]) <= 400) os << "\n  program of rank " << r << ":\n" << detail::describe(programs[r]);
    }
    res.problem = os.str();
  }
  return res;
}

// Compiles every rank's program and checks it; with a simulation too large for `opt`, also runs
// the round trip on the same geometry with 2-byte rows (head_dim 1, 2-byte elements) and 4 times
// the budget (the token and head logic does not depend on the row size; the byte logic was checked
// structurally on the real one).
inline CheckResult compile_and_check(const detail::Geometry& g, Gen kind, const CheckOptions& opt = {}) {
  CheckResult res = check_programs(g, compile_all(g, kind), kind, opt);
  if (res.problem.empty() && res.round_trip_skipped && opt.round_trip && g.head_dim * g.elem_bytes > 2) {
    detail::Geometry small = g;
    small.head_dim = 1;
    small.elem_bytes = 2;
    CheckOptions more = opt;
    more.max_sim_entries = 4 * opt.max_sim_entries;
    res = check_programs(small, compile_all(small, kind), kind, more);
  }
  return res;
}

}  // namespace uaa::test
