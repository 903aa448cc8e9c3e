// Memory of `uaa run`: what this process may still allocate, and byte arithmetic for estimates.
//
// Before it allocates anything, every rank compares the bytes it will need with what is available
// to it, and the ranks agree on the result (one error naming the rank, the need and the limit),
// instead of letting the kernel's OOM killer end a rank with "signal 9" (Linux overcommits, so a
// large allocation "succeeds" and the process dies when it touches the pages).
//
// Available to a rank: the smallest of
//   - each cgroup limit above the process: cgroup v2 memory.max - memory.current (the process's
//     cgroup and its ancestors), or cgroup v1 memory.limit_in_bytes (hierarchical) -
//     memory.usage_in_bytes, divided by the ranks of the job in that cgroup on that node;
//   - /proc/meminfo MemAvailable divided by the ranks of the job on the node.
// UAA_TOOL_MEMORY_LIMIT_BYTES (bytes, or with a K/M/G/T suffix, powers of 1024) replaces all of
// that with a per-rank figure: for tests, and for machines where the detection is wrong.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>

#include "text.h"
#include "uaa/error.h"

namespace uaa::cli::mem {

constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max();

inline std::int64_t sat_add(std::int64_t a, std::int64_t b) {
  return a > kMax - b ? kMax : a + b;
}
inline std::int64_t sat_mul(std::int64_t a, std::int64_t b) {
  if (a == 0 || b == 0) return 0;
  return a > kMax / b ? kMax : a * b;
}
template <typename... T>
std::int64_t sat_product(std::int64_t a, T... rest) {
  ((a = sat_mul(a, rest)), ...);
  return a;
}

// "21474836480 bytes (20.0 GiB)"
inline std::string bytes_text(std::int64_t b) {
  static const char* units[] = {"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  std::string s = cat(b, " bytes");
  if (b >= 1024) {
    double v = static_cast<double>(b);
    int u = -1;
    while (v >= 1024 && u < 5) {
      v /= 1024;
      ++u;
    }
    char buf[48];
    std::snprintf(buf, sizeof buf, " (%.1f %s)", v, units[u]);
    s += buf;
  }
  return s;
}

// "123", "4K", "512M", "2G", "1T" (powers of 1024; an optional trailing "B" or "iB"). nullopt if
// malformed or out of range.
inline std::optional<std::int64_t> parse_size(std::string_view t) {
  std::size_t i = 0;
  std::int64_t v = 0;
  if (t.empty() || !std::isdigit(static_cast<unsigned char>(t[0]))) return std::nullopt;
  while (i < t.size() && std::isdigit(static_cast<unsigned char>(t[i]))) {
    const int d = t[i] - '0';
    if (v > (kMax - d) / 10) return std::nullopt;
    v = v * 10 + d;
    ++i;
  }
  std::string_view unit = t.substr(i);
  std::int64_t mult = 1;
  if (!unit.empty()) {
    const char u = static_cast<char>(std::toupper(static_cast<unsigned char>(unit[0])));
    const std::string_view rest = unit.substr(1);
    if (!(rest.empty() || rest == "B" || rest == "iB" || rest == "b")) return std::nullopt;
    switch (u) {
      case 'K': mult = 1ll << 10; break;
      case 'M': mult = 1ll << 20; break;
      case 'G': mult = 1ll << 30; break;
      case 'T': mult = 1ll << 40; break;
      case 'B': if (!rest.empty()) return std::nullopt; break;
      default: return std::nullopt;
    }
  }
  if (v > kMax / mult) return std::nullopt;
  return v * mult;
}

inline std::optional<std::string> read_text(const std::string& path) {
  std::ifstream f(path);
  if (!f) return std::nullopt;
  std::ostringstream os;
  os << f.rdbuf();
  return os.str();
}

// A number at the start of a cgroup file ("max" and other words: nullopt).
inline std::optional<std::int64_t> leading_number(const std::optional<std::string>& text) {
  if (!text) return std::nullopt;
  std::size_t n = 0;
  while (n < text->size() && std::isdigit(static_cast<unsigned char>((*text)[n]))) ++n;
  if (n == 0) return std::nullopt;
  return parse_size(std::string_view(*text).substr(0, n));
}

// MemAvailable of /proc/meminfo, in bytes.
inline std::optional<std::int64_t> meminfo_available(const std::string& text) {
  std::istringstream is(text);
  std::string line;
  while (std::getline(is, line)) {
    if (line.rfind("MemAvailable:", 0) != 0) continue;
    std::istringstream ls(line.substr(13));
    std::int64_t kb = 0;
    std::string unit;
    if (!(ls >> kb) || kb < 0) return std::nullopt;
    ls >> unit;
    return sat_mul(kb, unit == "kB" || unit.empty() ? 1024 : 1);
  }
  return std::nullopt;
}

// The process's cgroup paths from /proc/self/cgroup: the v2 one ("0::/path") and the v1 memory
// controller's ("N:memory[,...]:/path").
struct CgroupPaths {
  std::optional<std::string> v2, v1_memory;
};
inline CgroupPaths parse_proc_cgroup(const std::string& text) {
  CgroupPaths p;
  std::istringstream is(text);
  std::string line;
  while (std::getline(is, line)) {
    const std::size_t a = line.find(':');
    if (a == std::string::npos) continue;
    const std::size_t b = line.find(':', a + 1);
    if (b == std::string::npos) continue;
    const std::string controllers = line.substr(a + 1, b - a - 1);
    const std::string path = line.substr(b + 1);
    if (line.substr(0, a) == "0" && controllers.empty()) {
      p.v2 = path;
      continue;
    }
    std::istringstream cs(controllers);
    std::string c;
    while (std::getline(cs, c, ','))
      if (c == "memory") p.v1_memory = path;
  }
  return p;
}

// The tightest cgroup limit on this process: free bytes (limit - usage) and where.
struct CgroupFree {
  std::int64_t bytes = 0;
  std::string where;  // "/sys/fs/cgroup/x: memory.max 1073741824 bytes (1.0 GiB) - memory.current ..."
  std::string dir;    // the limiting cgroup's directory (ranks in the same one share it)
};

inline std::optional<CgroupFree> cgroup_free(const std::string& root = "/sys/fs/cgroup",
                                             const std::string& proc_cgroup = "/proc/self/cgroup") {
  namespace fs = std::filesystem;
  std::error_code ec;
  const std::optional<std::string> text = read_text(proc_cgroup);
  if (!text) return std::nullopt;
  const CgroupPaths paths = parse_proc_cgroup(*text);
  std::optional<CgroupFree> best;
  auto consider = [&](std::int64_t limit, std::int64_t used, const std::string& dir,
                      const char* limit_name, const char* used_name) {
    const std::int64_t free = std::max<std::int64_t>(0, limit - used);
    if (best && best->bytes <= free) return;
    best = CgroupFree{free,
                      cat(dir, ": ", limit_name, " ", bytes_text(limit), " - ", used_name, " ",
                          bytes_text(used)),
                      dir};
  };
  if (paths.v2) {
    for (const char* base_name : {"", "/unified"}) {
      const fs::path base = fs::path(root + base_name);
      if (!fs::exists(base / "cgroup.controllers", ec)) continue;
      fs::path dir = base / fs::path(*paths.v2).relative_path();
      if (!fs::is_directory(dir, ec)) dir = base;  // a cgroup namespace: we are at its root
      for (;;) {
        const auto limit = leading_number(read_text((dir / "memory.max").string()));
        if (limit) {
          const auto used = leading_number(read_text((dir / "memory.current").string()));
          consider(*limit, used.value_or(0), dir.string(), "memory.max", "memory.current");
        }
        if (dir == base || !dir.has_parent_path() || dir.parent_path() == dir) break;
        dir = dir.parent_path();
        if (dir.string().size() < base.string().size()) break;
      }
      break;
    }
  }
  if (paths.v1_memory) {
    const fs::path base = fs::path(root) / "memory";
    fs::path dir = base / fs::path(*paths.v1_memory).relative_path();
    if (!fs::is_directory(dir, ec)) dir = base;
    auto limit = leading_number(read_text((dir / "memory.limit_in_bytes").string()));
    if (const auto stat = read_text((dir / "memory.stat").string())) {
      std::istringstream is(*stat);
      std::string key;
      std::int64_t value = 0;
      while (is >> key >> value)
        if (key == "hierarchical_memory_limit" && (!limit || value < *limit)) limit = value;
    }
    // v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages).
    if (limit && *limit < (std::int64_t{1} << 60)) {
      const auto used = leading_number(read_text((dir / "memory.usage_in_bytes").string()));
      consider(*limit, used.value_or(0), dir.string(), "memory.limit_in_bytes",
               "memory.usage_in_bytes");
    }
  }
  return best;
}

// What this process sees, before the ranks that share a pool divide it.
struct Detected {
  std::optional<std::int64_t> override_bytes;  // UAA_TOOL_MEMORY_LIMIT_BYTES
  std::optional<CgroupFree> cgroup;
  std::optional<std::int64_t> mem_available;   // /proc/meminfo MemAvailable
  std::string host;                            // host name and boot id: ranks on one node
};

inline constexpr const char* kLimitVariable = "UAA_TOOL_MEMORY_LIMIT_BYTES";

// Throws uaa::Error(invalid_argument) when UAA_TOOL_MEMORY_LIMIT_BYTES is malformed.
inline Detected detect() {
  Detected d;
  if (const char* env = std::getenv(kLimitVariable); env != nullptr && *env) {
    d.override_bytes = parse_size(env);
    if (!d.override_bytes)
      throw Error(ErrorCode::invalid_argument,
                  cat(kLimitVariable, "='", env, "' is not a byte count (e.g. 1073741824 or 1G)"));
  }
  d.cgroup = cgroup_free();
  if (const auto t = read_text("/proc/meminfo")) d.mem_available = meminfo_available(*t);
  char host[256] = {};
  gethostname(host, sizeof host - 1);
  d.host = host;
  if (const auto boot = read_text("/proc/sys/kernel/random/boot_id")) d.host += "/" + *boot;
  return d;
}

// This rank's share: `node_ranks` ranks of the job on this node, `cgroup_ranks` in its limiting
// cgroup. `how` says where the figure comes from.
struct Available {
  std::int64_t bytes = kMax;
  std::string how;
};
inline Available share(const Detected& d, int node_ranks, int cgroup_ranks) {
  Available a;
  if (d.override_bytes) {
    a.bytes = *d.override_bytes;
    a.how = cat(kLimitVariable, "=", *d.override_bytes);
    return a;
  }
  node_ranks = std::max(node_ranks, 1);
  cgroup_ranks = std::max(cgroup_ranks, 1);
  if (d.mem_available) {
    a.bytes = *d.mem_available / node_ranks;
    a.how = cat("MemAvailable ", bytes_text(*d.mem_available), " / ", node_ranks,
                " rank(s) on this node");
  }
  if (d.cgroup && d.cgroup->bytes / cgroup_ranks < a.bytes) {
    a.bytes = d.cgroup->bytes / cgroup_ranks;
    a.how = cat("cgroup ", d.cgroup->where, " / ", cgroup_ranks, " rank(s) in it");
  }
  if (a.how.empty()) a.how = "no limit found";
  return a;
}

}  // namespace uaa::cli::mem
