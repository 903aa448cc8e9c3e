// uaa_bench_copy_paths: what one node's copy mechanisms cost for the rows a Ulysses exchange moves.
// Single process, no MPI; it reads its own memory with process_vm_readv, which takes the same kernel
// path as reading a peer (page pinning per iovec). Prints, for `rows` rows of `row_bytes` bytes that
// lie `stride` bytes apart (default: FLUX's 12 of 24 heads x 128 fp32 per token, 2112 tokens):
//   memcpy contiguous            the copy every transport pays at least once
//   memcpy rows (pack)           uaa's pack / unpack step
//   process_vm_readv contiguous  what Open MPI's single-copy (CMA) transfer of a packed block costs
//   process_vm_readv rows        a peer read of the strided rows (uaa's peer-read path)
// Medians of 15 runs, 3 rounds. Usage: uaa_bench_copy_paths [rows row_bytes stride]
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

double median_ms(const std::function<void()>& f) {
  std::vector<double> t;
  for (int i = 0; i < 15; ++i) {
    const auto t0 = Clock::now();
    f();
    t.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// process_vm_readv of `local` from `remote` (this process), IOV_MAX entries per call, partial
// transfers continued.
void read_self(std::vector<iovec> local, std::vector<iovec> remote) {
  std::size_t li = 0, ri = 0;
  auto consume = [](std::vector<iovec>& v, std::size_t& i, std::size_t n) {
    while (n > 0) {
      if (n >= v[i].iov_len) {
        n -= v[i++].iov_len;
      } else {
        v[i].iov_base = static_cast<char*>(v[i].iov_base) + n;
        v[i].iov_len -= n;
        n = 0;
      }
    }
  };
  while (li < local.size() && ri < remote.size()) {
    const std::size_t ln = std::min<std::size_t>(IOV_MAX, local.size() - li);
    const std::size_t rn = std::min<std::size_t>(IOV_MAX, remote.size() - ri);
    const ssize_t n = process_vm_readv(getpid(), &local[li], ln, &remote[ri], rn, 0);
    if (n <= 0) {
      std::perror("process_vm_readv");
      std::exit(1);
    }
    consume(local, li, static_cast<std::size_t>(n));
    consume(remote, ri, static_cast<std::size_t>(n));
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::size_t rows = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 2112;
  const std::size_t row = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 6144;
  const std::size_t stride = argc > 3 ? std::strtoull(argv[3], nullptr, 10) : 12288;
  if (rows == 0 || row == 0 || stride < row) {
    std::fprintf(stderr, "usage: uaa_bench_copy_paths [rows row_bytes stride>=row_bytes]\n");
    return 2;
  }
  std::vector<char> src(rows * stride, 1), packed(rows * row, 2), dst(rows * row, 3);
  std::vector<iovec> strided_rows, whole_dst{{dst.data(), rows * row}};
  for (std::size_t t = 0; t < rows; ++t) strided_rows.push_back({src.data() + t * stride, row});
  std::printf("%zu rows x %zu bytes, stride %zu (%.1f MB)\n", rows, row, stride, rows * row / 1e6);
  for (int round = 0; round < 3; ++round) {
    const double mc = median_ms([&] { std::memcpy(dst.data(), packed.data(), rows * row); });
    const double pack = median_ms([&] {
      for (std::size_t t = 0; t < rows; ++t) std::memcpy(packed.data() + t * row, src.data() + t * stride, row);
    });
    const double pv = median_ms([&] { read_self(whole_dst, {{packed.data(), rows * row}}); });
    const double pv_rows = median_ms([&] { read_self(whole_dst, strided_rows); });
    std::printf("memcpy contiguous %.2f ms | memcpy rows (pack) %.2f ms | process_vm_readv contiguous %.2f ms | "
                "process_vm_readv rows %.2f ms | rows / (pack + contiguous) %.2f\n",
                mc, pack, pv, pv_rows, pv_rows / (pack + pv));
  }
  return 0;
}
