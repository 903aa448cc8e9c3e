// Pieces of `uaa run` that need no MPI: the canonical options the ranks agree on, the memory
// detection's parsers, and the all-or-nothing --save.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "args.h"
#include "data.h"
#include "kernels/kernel.h"
#include "memory.h"
#include "npy.h"
#include "save.h"

namespace {

namespace fs = std::filesystem;
using uaa::cli::AtomicSave;
using uaa::cli::canonical_options;
using uaa::cli::describe_option;
using uaa::cli::options_digest;
using uaa::cli::OptionValue;
using uaa::cli::parse_run_args;
using uaa::cli::RunOptions;

RunOptions parse(std::vector<const char*> args) { return parse_run_args(args); }

// ---- Options -------------------------------------------------------------------------------

TEST(ToolOptions, DigestIsEqualForEqualMeaningAndDiffersOtherwise) {
  const auto a = parse({"--lens", "1,2", "--heads", "4", "--iters", "3"});
  const auto b = parse({"--heads=4", "--iters=3", "--lens=1,2"});
  EXPECT_EQ(options_digest(a), options_digest(b));
  EXPECT_NE(options_digest(a), options_digest(parse({"--lens", "1,2", "--heads", "4", "--iters", "2"})));
  EXPECT_NE(options_digest(a), options_digest(parse({"--lens", "1,2", "--heads", "4", "--iters", "3", "--check"})));
  EXPECT_NE(options_digest(a), options_digest(parse({"--lens", "12", "--heads", "4", "--iters", "3"})));
  // --backward and its mode take part; the default mode and the explicit default are one run.
  const auto bwd = parse({"--lens", "1,2", "--heads", "4", "--iters", "3", "--backward"});
  EXPECT_NE(options_digest(a), options_digest(bwd));
  EXPECT_EQ(options_digest(bwd), options_digest(parse({"--lens", "1,2", "--heads", "4", "--iters", "3",
                                                       "--backward", "--backward-mode", "saved"})));
  EXPECT_NE(options_digest(bwd), options_digest(parse({"--lens", "1,2", "--heads", "4", "--iters", "3",
                                                       "--backward", "--backward-mode", "recompute"})));
  // Documents, batch and window take part; --window -1,-1 is given (a different option list)
  // but the same attention as no --window.
  const auto plain = parse({"--seq", "8", "--heads", "2"});
  EXPECT_NE(options_digest(plain), options_digest(parse({"--seq", "8", "--heads", "2", "--docs", "8"})));
  EXPECT_NE(options_digest(parse({"--seq", "8", "--heads", "2", "--docs", "3,5"})),
            options_digest(parse({"--seq", "8", "--heads", "2", "--docs", "5,3"})));
  EXPECT_NE(options_digest(parse({"--seq", "8", "--heads", "2", "--docs", "3,5"})),
            options_digest(parse({"--seq", "8", "--heads", "2", "--docs", "3,5", "--kv-docs", "3,5"})));
  EXPECT_NE(options_digest(plain), options_digest(parse({"--seq", "8", "--heads", "2", "--batch", "2"})));
  EXPECT_NE(options_digest(parse({"--seq", "8", "--heads", "2", "--window", "8,0"})),
            options_digest(parse({"--seq", "8", "--heads", "2", "--window", "0,8"})));
  EXPECT_EQ(options_digest(parse({"--seq", "8", "--heads", "2", "--window", "8,0"})),
            options_digest(parse({"--seq", "8", "--heads", "2", "--window=8,0"})));
  // The default and the explicit default mean the same run.
  EXPECT_EQ(options_digest(parse({"--seq", "8", "--heads", "2"})),
            options_digest(parse({"--seq", "8", "--heads", "2", "--iters", "1", "--dtype", "f32"})));
}

TEST(ToolOptions, CanonicalListNamesEveryOption) {
  const auto opts = canonical_options(parse({"--lens", "1,2", "--heads", "4", "--causal"}));
  std::vector<std::string> names;
  for (const OptionValue& v : opts) names.push_back(v.name);
  for (const char* n : {"--lens", "--seq", "--kv-lens", "--kv-seq", "--heads", "--kv-heads",
                        "--head-dim", "--dtype", "--causal", "--strategy", "--iters", "--seed",
                        "--check", "--backward", "--backward-mode", "--load", "--save", "--json",
                        "--help", "--docs", "--kv-docs", "--batch", "--window"})
    EXPECT_NE(std::find(names.begin(), names.end(), n), names.end()) << n;
  EXPECT_EQ(opts[0].value, "1,2");
  EXPECT_TRUE(opts[0].given);
  EXPECT_FALSE(opts[1].given);  // --seq
}

TEST(ToolOptions, Describe) {
  EXPECT_EQ(describe_option(1, {"--iters", false, true, "2"}), "rank 1 has 2");
  EXPECT_EQ(describe_option(0, {"--check", true, true, ""}), "rank 0 gives it");
  EXPECT_EQ(describe_option(3, {"--check", true, false, ""}), "rank 3 does not give it");
  EXPECT_EQ(describe_option(2, {"--seq", false, false, ""}), "rank 2 does not give it");
}

// ---- --check's reference masks ------------------------------------------------------------

// reference_window: the float64 reference, given rows [a, b) of a document and the keys and window
// sides reference_window chooses, sees exactly the keys the plan's mask shows every row (uaa/plan.h:
// i + kv - q - L <= j <= i + kv - q + R, causal capping R at 0, -1 unbounded).
TEST(ToolCheck, ReferenceWindowShowsEveryRowItsKeys) {
  using uaa::detail::first_visible_key;
  using uaa::detail::last_visible_key;
  int cases = 0;
  for (std::int64_t ql = 0; ql <= 7; ++ql)
    for (std::int64_t kl = 0; kl <= 7; ++kl)
      for (bool causal : {false, true})
        for (std::int64_t wl : {-1, 0, 1, 3, 9})
          for (std::int64_t wr : {-1, 0, 2, 9})
            for (std::int64_t a = 0; a < ql; ++a)
              for (std::int64_t b = a + 1; b <= ql; ++b) {
                const uaa::cli::ReferenceWindow w =
                    uaa::cli::reference_window(a, b, ql, kl, causal, wl, wr);
                ASSERT_GE(w.key_first, 0);
                ASSERT_LE(w.key_first + w.keys, kl);
                const std::int64_t right = causal ? 0 : wr;
                for (std::int64_t i = a; i < b; ++i) {
                  const std::int64_t al = i + kl - ql;
                  std::int64_t first = wl < 0 ? 0 : std::max<std::int64_t>(0, al - wl);
                  std::int64_t last = right < 0 ? kl - 1 : std::min(kl - 1, al + right);
                  if (first > last) first = 0, last = -1;  // none
                  std::int64_t rf = 0, rl = -1;
                  if (w.keys > 0) {
                    ASSERT_GE(w.window_left, wl < 0 ? -1 : 0);
                    ASSERT_GE(w.window_right, right < 0 ? -1 : 0);
                    rf = w.key_first + first_visible_key(i - a, b - a, w.keys, w.window_left);
                    rl = w.key_first + last_visible_key(i - a, b - a, w.keys, false, w.window_right);
                    if (rf > rl) rf = 0, rl = -1;
                  }
                  ASSERT_EQ(first, rf) << "q " << ql << " kv " << kl << " causal " << causal << " window "
                                       << wl << "," << wr << " rows " << a << "-" << b << " row " << i;
                  ASSERT_EQ(last, rl) << "q " << ql << " kv " << kl << " causal " << causal << " window "
                                      << wl << "," << wr << " rows " << a << "-" << b << " row " << i;
                  ++cases;
                }
              }
  EXPECT_GT(cases, 10000);
}

// ---- Memory --------------------------------------------------------------------------------

TEST(ToolMemory, ParseSize) {
  using uaa::cli::mem::parse_size;
  EXPECT_EQ(parse_size("123"), 123);
  EXPECT_EQ(parse_size("4K"), 4096);
  EXPECT_EQ(parse_size("256M"), 256ll << 20);
  EXPECT_EQ(parse_size("2GiB"), 2ll << 30);
  EXPECT_EQ(parse_size("1T"), 1ll << 40);
  EXPECT_FALSE(parse_size(""));
  EXPECT_FALSE(parse_size("abc"));
  EXPECT_FALSE(parse_size("-5"));
  EXPECT_FALSE(parse_size("5X"));
  EXPECT_FALSE(parse_size("99999999999999999999"));
  EXPECT_FALSE(parse_size("9999999999T"));
}

TEST(ToolMemory, Saturates) {
  using namespace uaa::cli::mem;
  EXPECT_EQ(sat_mul(kMax / 2, 3), kMax);
  EXPECT_EQ(sat_add(kMax - 1, 5), kMax);
  EXPECT_EQ(sat_product(2, 3, 4), 24);
  EXPECT_EQ(bytes_text(268435456), "268435456 bytes (256.0 MiB)");
  EXPECT_EQ(bytes_text(100), "100 bytes");
}

TEST(ToolMemory, Meminfo) {
  EXPECT_EQ(uaa::cli::mem::meminfo_available("MemTotal: 100 kB\nMemFree: 5 kB\nMemAvailable:   24174852 kB\n"),
            24174852ll * 1024);
  EXPECT_FALSE(uaa::cli::mem::meminfo_available("MemTotal: 100 kB\n"));
}

TEST(ToolMemory, ProcCgroup) {
  using uaa::cli::mem::parse_proc_cgroup;
  auto p = parse_proc_cgroup("0::/user.slice/job\n");
  ASSERT_TRUE(p.v2);
  EXPECT_EQ(*p.v2, "/user.slice/job");
  EXPECT_FALSE(p.v1_memory);
  p = parse_proc_cgroup("5:devices:/\n4:memory:/docker/abc\n3:cpu,cpuacct:/\n0::/\n");
  ASSERT_TRUE(p.v1_memory);
  EXPECT_EQ(*p.v1_memory, "/docker/abc");
  p = parse_proc_cgroup("7:memory,hugetlb:/x\n");
  ASSERT_TRUE(p.v1_memory);
  EXPECT_EQ(*p.v1_memory, "/x");
}

void write_file(const fs::path& p, const std::string& text) {
  fs::create_directories(p.parent_path());
  std::ofstream(p) << text;
}

TEST(ToolMemory, CgroupV2TightestAncestorWins) {
  const fs::path root = fs::temp_directory_path() / ("uaa_tool_cg2_" + std::to_string(::getpid()));
  fs::remove_all(root);
  write_file(root / "cgroup.controllers", "memory\n");
  write_file(root / "job" / "memory.max", "1000000\n");
  write_file(root / "job" / "memory.current", "200000\n");
  write_file(root / "job" / "step" / "memory.max", "max\n");
  write_file(root / "job" / "step" / "memory.current", "100\n");
  write_file(root / "proc_cgroup", "0::/job/step\n");
  const auto f = uaa::cli::mem::cgroup_free(root.string(), (root / "proc_cgroup").string());
  ASSERT_TRUE(f);
  EXPECT_EQ(f->bytes, 800000);
  EXPECT_NE(f->where.find("memory.max 1000000 bytes"), std::string::npos) << f->where;
  EXPECT_EQ(f->dir, (root / "job").string());
  fs::remove_all(root);
}

TEST(ToolMemory, CgroupV1) {
  const fs::path root = fs::temp_directory_path() / ("uaa_tool_cg1_" + std::to_string(::getpid()));
  fs::remove_all(root);
  write_file(root / "memory" / "j" / "memory.limit_in_bytes", "500000\n");
  write_file(root / "memory" / "j" / "memory.usage_in_bytes", "100000\n");
  write_file(root / "memory" / "j" / "memory.stat", "cache 0\nhierarchical_memory_limit 400000\n");
  write_file(root / "proc_cgroup", "4:memory:/j\n");
  auto f = uaa::cli::mem::cgroup_free(root.string(), (root / "proc_cgroup").string());
  ASSERT_TRUE(f);
  EXPECT_EQ(f->bytes, 300000);
  // "No limit" (a huge number) is no limit.
  write_file(root / "memory" / "j" / "memory.limit_in_bytes", "9223372036854771712\n");
  write_file(root / "memory" / "j" / "memory.stat", "hierarchical_memory_limit 9223372036854771712\n");
  EXPECT_FALSE(uaa::cli::mem::cgroup_free(root.string(), (root / "proc_cgroup").string()));
  fs::remove_all(root);
}

TEST(ToolMemory, ShareDividesByRanks) {
  uaa::cli::mem::Detected d;
  d.mem_available = 1000;
  auto a = uaa::cli::mem::share(d, 4, 4);
  EXPECT_EQ(a.bytes, 250);
  d.cgroup = uaa::cli::mem::CgroupFree{600, "cg", "cg"};
  a = uaa::cli::mem::share(d, 4, 4);
  EXPECT_EQ(a.bytes, 150);
  EXPECT_NE(a.how.find("cgroup"), std::string::npos);
  d.override_bytes = 77;
  EXPECT_EQ(uaa::cli::mem::share(d, 4, 4).bytes, 77);
}

// ---- --save --------------------------------------------------------------------------------

class ToolSave : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("uaa_tool_save_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    ::unsetenv("UAA_TOOL_SAVE_FAULT");
  }
  void TearDown() override {
    ::unsetenv("UAA_TOOL_SAVE_FAULT");
    fs::remove_all(dir_);
  }
  // Saves a.npy and b.npy holding `value`.
  void save(float value) {
    AtomicSave s(dir_.string());
    const std::int64_t shape[1] = {3};
    const float data[3] = {value, value, value};
    for (const char* name : {"a.npy", "b.npy"}) {
      const int i = s.open(name, shape);
      s.write(i, data, 1);
      s.write(i, data + 1, 2);
    }
    s.commit();
  }
  float read(const char* name) { return uaa::npy::read((dir_ / name).string()).data.at(2); }
  std::vector<std::string> listing() {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(dir_)) names.push_back(e.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  }
  fs::path dir_;
};

TEST_F(ToolSave, CommitReplacesEveryFile) {
  save(1);
  save(2);
  EXPECT_EQ(read("a.npy"), 2);
  EXPECT_EQ(read("b.npy"), 2);
  EXPECT_EQ(listing(), (std::vector<std::string>{"a.npy", "b.npy"}));
}

TEST_F(ToolSave, FailureWhileWritingKeepsTheOldFiles) {
  save(1);
  ::setenv("UAA_TOOL_SAVE_FAULT", "write:b.npy", 1);
  EXPECT_THROW(save(2), uaa::Error);
  EXPECT_EQ(read("a.npy"), 1);
  EXPECT_EQ(read("b.npy"), 1);
  EXPECT_EQ(listing(), (std::vector<std::string>{"a.npy", "b.npy"}));
}

TEST_F(ToolSave, FailedRenameRollsBack) {
  save(1);
  ::setenv("UAA_TOOL_SAVE_FAULT", "rename:b.npy", 1);  // after a.npy was renamed
  try {
    save(2);
    ADD_FAILURE() << "no error";
  } catch (const uaa::Error& e) {
    EXPECT_NE(std::string(e.what()).find("put back"), std::string::npos) << e.what();
  }
  EXPECT_EQ(read("a.npy"), 1);
  EXPECT_EQ(read("b.npy"), 1);
  EXPECT_EQ(listing(), (std::vector<std::string>{"a.npy", "b.npy"}));
}

TEST_F(ToolSave, FailedRenameOfNewFilesLeavesNothing) {
  ::setenv("UAA_TOOL_SAVE_FAULT", "rename:b.npy", 1);
  EXPECT_THROW(save(2), uaa::Error);
  EXPECT_TRUE(listing().empty());
}

TEST_F(ToolSave, PrepareDirRefusesANonFileAndCreatesTheDirectory) {
  fs::create_directories(dir_ / "b.npy");
  const std::vector<std::string> names = {"a.npy", "b.npy"};
  try {
    AtomicSave::prepare_dir(dir_.string(), names);
    ADD_FAILURE() << "no error";
  } catch (const uaa::Error& e) {
    EXPECT_NE(std::string(e.what()).find("b.npy exists and is not a regular file"), std::string::npos)
        << e.what();
  }
  AtomicSave::prepare_dir((dir_ / "new" / "deeper").string(), names);
  EXPECT_TRUE(fs::is_directory(dir_ / "new" / "deeper"));
  EXPECT_TRUE(fs::is_empty(dir_ / "new" / "deeper"));
  std::ofstream(dir_ / "file") << "x";
  EXPECT_THROW(AtomicSave::prepare_dir((dir_ / "file" / "sub").string(), names), uaa::Error);
}

TEST_F(ToolSave, DestructorWithoutCommitRemovesTemporaries) {
  {
    AtomicSave s(dir_.string());
    const std::int64_t shape[1] = {1};
    const float x = 1;
    s.write(s.open("a.npy", shape), &x, 1);
  }
  EXPECT_TRUE(listing().empty());
}

}  // namespace
