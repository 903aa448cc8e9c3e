#include "plan/strategy_layout.h"

#include <algorithm>

#include "common/strings.h"

namespace uaa::detail {
namespace {

std::int64_t sum(const std::vector<std::int64_t>& v) {
  std::int64_t s = 0;
  for (std::int64_t x : v) s += x;
  return s;
}

// Tokens per block: ceil(total / P), or the longest shard if that is longer (uneven splits).
std::int64_t padded_rows(const std::vector<std::int64_t>& lens) {
  const std::int64_t P = static_cast<std::int64_t>(lens.size());
  std::int64_t rows = (sum(lens) + P - 1) / P;
  for (std::int64_t x : lens) rows = std::max(rows, x);
  return rows;
}

void place_uniform(ExchangeSide& side, int ranks, std::int64_t bytes) {
  const std::int64_t stride = align_up(bytes, kBlockAlign);
  side.counts.assign(ranks, bytes);
  side.displs.resize(ranks);
  for (int j = 0; j < ranks; ++j) side.displs[j] = j * stride;
  side.total = ranks * stride;
}

}  // namespace

PaddedLayout compute_padded_layout(const LayoutInput& in) {
  PaddedLayout L;
  L.ranks = static_cast<int>(in.q_lens.size());
  L.rank = in.rank;
  const std::int64_t P = L.ranks;
  const std::int64_t g = in.q_heads / in.kv_heads;
  L.q_rows = padded_rows(in.q_lens);
  L.kv_rows = padded_rows(in.kv_lens);
  L.q_heads_per_rank = (in.q_heads + P - 1) / P;
  L.padded_q_heads = P * L.q_heads_per_rank;
  L.kv_head_begin.resize(L.ranks);
  for (int r = 0; r < L.ranks; ++r) {
    const std::int64_t first = r * L.q_heads_per_rank, last = first + L.q_heads_per_rank - 1;
    L.kv_head_begin[r] = first / g;
    L.kv_heads_per_rank = std::max(L.kv_heads_per_rank, last / g - first / g + 1);
  }
  const std::int64_t row = in.head_dim * in.elem_bytes;
  const RankWork w = uniform_work(L.q_heads_per_rank, L.q_rows, L.kv_heads_per_rank);
  L.qkv_block = qkv_block({0, L.q_rows}, L.kv_rows, w, row);
  L.out_block = out_block({0, L.q_rows}, w, row, in.with_lse);
  place_uniform(L.qkv_send, L.ranks, L.qkv_block.bytes);
  place_uniform(L.qkv_recv, L.ranks, L.qkv_block.bytes);
  place_uniform(L.out_send, L.ranks, L.out_block.bytes);
  place_uniform(L.out_recv, L.ranks, L.out_block.bytes);
  L.qkv_max_total = L.qkv_send.total;  // the same on every rank
  L.out_max_total = L.out_send.total;
  L.pad_q_tokens = P * L.q_rows - sum(in.q_lens);
  L.pad_kv_tokens = P * L.kv_rows - sum(in.kv_lens);
  return L;
}

GatherLayout compute_gather_layout(const LayoutInput& in) {
  GatherLayout L;
  L.ranks = static_cast<int>(in.q_lens.size());
  L.rank = in.rank;
  const std::int64_t row = in.head_dim * in.elem_bytes;
  const RankWork kv_only = uniform_work(0, 0, in.kv_heads);
  L.send_block = qkv_block({0, 0}, in.kv_lens[in.rank], kv_only, row);
  L.recv_block.resize(L.ranks);
  std::vector<std::int64_t> recv_bytes(L.ranks, 0);
  std::int64_t largest = 0;
  for (int j = 0; j < L.ranks; ++j) {
    const QkvBlock b = qkv_block({0, 0}, in.kv_lens[j], kv_only, row);
    largest = std::max(largest, b.bytes);
    if (j == in.rank) continue;
    L.recv_block[j] = b;
    recv_bytes[j] = b.bytes;
  }
  L.send.counts.assign(L.ranks, L.send_block.bytes);
  L.send.counts[in.rank] = 0;
  L.send.displs.assign(L.ranks, 0);
  L.send.total = L.send_block.bytes;
  L.recv.counts = recv_bytes;
  L.recv.displs.assign(L.ranks, 0);
  std::int64_t at = 0;
  for (int j = 0; j < L.ranks; ++j) {
    L.recv.displs[j] = at;
    at += align_up(recv_bytes[j], kBlockAlign);
  }
  L.recv.total = at;
  // Any rank's receive buffer is at most P blocks of the largest shard: a bound every rank computes
  // alike (the transport only needs a common size class).
  L.max_total = static_cast<std::int64_t>(L.ranks) * align_up(largest, kBlockAlign);
  return L;
}

std::string ulysses_problem(const std::vector<std::int64_t>& q_lens,
                            const std::vector<std::int64_t>& kv_lens, std::int64_t q_heads) {
  const std::int64_t P = static_cast<std::int64_t>(q_lens.size());
  const char* hint = " (strategy uaa runs any layout; ulysses_pad pads it)";
  const std::int64_t q = sum(q_lens), kv = sum(kv_lens);
  if (q % P != 0)
    return cat("strategy ulysses needs the query total to divide by the rank count: ", q,
               " tokens over ", P, " ranks", hint);
  if (kv % P != 0)
    return cat("strategy ulysses needs the key/value total to divide by the rank count: ", kv,
               " tokens over ", P, " ranks", hint);
  for (std::int64_t j = 0; j < P; ++j) {
    if (q_lens[j] != q / P)
      return cat("strategy ulysses needs every rank to hold total/P = ", q / P,
                 " query tokens but rank ", j, " holds ", q_lens[j], hint);
    if (kv_lens[j] != kv / P)
      return cat("strategy ulysses needs every rank to hold total/P = ", kv / P,
                 " key/value tokens but rank ", j, " holds ", kv_lens[j], hint);
  }
  if (q_heads % P != 0)
    return cat("strategy ulysses needs q_heads to divide by the rank count: ", q_heads,
               " heads over ", P, " ranks", hint);
  return {};
}

}  // namespace uaa::detail
