// Building blocks of the program generators (internal to src/program/): places, a per-peer part
// list builder, and uaa's staging geometry of any rank in O(1) (see program.cpp's header comment).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "plan/layout.h"
#include "program/program.h"

namespace uaa::detail::build {

constexpr std::int64_t kAlign = 64;
inline std::int64_t align(std::int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }


inline Place tensor(Slot s, std::int64_t token, std::int64_t head) { return tensor_place(s, token, head); }
inline Place staged(Slot s, std::int64_t offset, std::int64_t pitch = 0) {
  Place p;
  p.slot = s;
  p.offset = offset;
  p.pitch = static_cast<std::int32_t>(pitch);
  return p;
}
inline Place pad() { return Place{}; }

// Appends parts to one side of an exchange step, one peer at a time.
class StepBuilder {
 public:
  StepBuilder(std::vector<Part>& parts, std::vector<PeerParts>& peers) : parts_(parts), peers_(peers) {}
  void begin_peer(int peer) {
    peer_ = peer;
    begin_ = static_cast<std::uint32_t>(parts_.size());
  }
  void add(std::int64_t tokens, std::int64_t heads, std::int64_t row_bytes, Place src, Place dst) {
    if (tokens <= 0 || heads <= 0 || row_bytes <= 0) return;
    Part x;
    x.tokens = tokens;
    x.heads = static_cast<std::int32_t>(heads);
    x.row_bytes = static_cast<std::int32_t>(row_bytes);
    x.src = src;
    x.dst = dst;
    parts_.push_back(x);
  }
  void end_peer() {
    const auto end = static_cast<std::uint32_t>(parts_.size());
    if (end > begin_) peers_.push_back(PeerParts{peer_, begin_, end});
  }

 private:
  std::vector<Part>& parts_;
  std::vector<PeerParts>& peers_;
  int peer_ = 0;
  std::uint32_t begin_ = 0;
};

// uaa forward: the staging geometry of any rank, computed on demand in O(1).
struct UaaGeometry {
  const Geometry& g;
  const std::vector<RankWork>& work;
  std::vector<std::int64_t> q_start, kv_start;
  std::int64_t row = 0, lse_row = sizeof(float);

  UaaGeometry(const Geometry& geo, const std::vector<RankWork>& w)
      : g(geo), work(w), q_start(prefix_sums(geo.q_lens)), kv_start(prefix_sums(geo.kv_lens)),
        row(geo.head_dim * geo.elem_bytes) {}

  RowRange tokens(int r) const { return {q_start[r], q_start[r + 1]}; }
  std::int64_t kv_total() const { return kv_start.back(); }
  std::int64_t q_total() const { return q_start.back(); }

  // Rows of x's piece i held by ranks other than x.
  std::int64_t foreign_rows(int x, int i) const {
    const WorkPiece& p = work[x].piece[i];
    return p.rows.size() - rows_held(p, tokens(x)).size();
  }
  // Index, among the foreign rows of x's piece i, of the first row held by rank s (s != x).
  std::int64_t rows_before(int x, int i, int s) const {
    const WorkPiece& p = work[x].piece[i];
    std::int64_t before = std::clamp(q_start[s], p.rows.begin, p.rows.end) - p.rows.begin;
    if (x < s) before -= rows_held(p, tokens(x)).size();
    return before;
  }
  std::int64_t kv_before(int x, int s) const {
    return kv_start[s] - (x < s ? g.kv_lens[x] : 0);
  }

  // Byte offsets of x's staging areas.
  struct InAreas {
    std::int64_t q[kMaxPieces] = {}, k = 0, v = 0, total = 0;
  };
  InAreas in_areas(int x) const {
    InAreas a;
    std::int64_t at = 0;
    const RankWork& w = work[x];
    for (int i = 0; i < w.pieces; ++i) {
      a.q[i] = at;
      at += align(foreign_rows(x, i) * w.piece[i].heads.size() * row);
    }
    const std::int64_t kv_bytes = (kv_total() - g.kv_lens[x]) * w.kv_heads.size() * row;
    a.k = at;
    at += align(kv_bytes);
    a.v = at;
    at += align(kv_bytes);
    a.total = w.pieces > 0 ? at : 0;
    return a;
  }  // Rank r's key segments over every rank's keys in global order: its own from the caller's k/v,
  // the others' from the K/V areas of its forward stage_in (held in `area`: stage_in for the
  // forward, saved for the backward).
  std::vector<KeySegment> key_segments(int r, Slot area) const {
    const RankWork& w = work[r];
    const std::int64_t nkv = w.kv_heads.size(), row_bytes = g.head_dim * g.elem_bytes;
    const InAreas at = in_areas(r);
    std::vector<KeySegment> kv;
    kv.reserve(g.kv_lens.size());
    for (int s = 0; s < static_cast<int>(g.kv_lens.size()); ++s) {
      if (g.kv_lens[s] == 0) continue;
      KeySegment k;
      k.tokens = g.kv_lens[s];
      k.dense_heads = nkv;
      if (s == r) {
        k.k = tensor(Slot::k, 0, w.kv_heads.begin);
        k.v = tensor(Slot::v, 0, w.kv_heads.begin);
      } else {
        const std::int64_t off = kv_before(r, s) * nkv * row_bytes;
        k.k = staged(area, at.k + off);
        k.v = staged(area, at.v + off);
      }
      kv.push_back(k);
    }
    return kv;
  }

  struct OutAreas {
    std::int64_t o[kMaxPieces] = {}, lse[kMaxPieces] = {}, total = 0;
  };
  OutAreas out_areas(int x) const {
    OutAreas a;
    std::int64_t at = 0;
    const RankWork& w = work[x];
    for (int i = 0; i < w.pieces; ++i) {
      a.o[i] = at;
      at += align(foreign_rows(x, i) * w.piece[i].heads.size() * row);
    }
    for (int i = 0; i < w.pieces && g.with_lse; ++i) {
      a.lse[i] = at;
      at += align(foreign_rows(x, i) * w.piece[i].heads.size() * lse_row);
    }
    a.total = at;
    return a;
  }
};

}  // namespace uaa::detail::build
