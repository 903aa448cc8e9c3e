// Argument parsing of `uaa run` (no MPI needed).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "args.h"

namespace {

using uaa::cli::ArgError;
using uaa::cli::parse_run_args;
using uaa::cli::RunOptions;

RunOptions parse(std::vector<const char*> args) { return parse_run_args(args); }

void expect_error(std::vector<const char*> args, const std::string& needle) {
  try {
    parse(args);
    ADD_FAILURE() << "accepted; expected an error containing '" << needle << "'";
  } catch (const ArgError& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(Args, ParsesEveryOption) {
  const RunOptions o = parse({"--lens", "1000,1001,0", "--kv-lens=5,6,7", "--heads", "24",
                              "--kv-heads", "8", "--head-dim", "64", "--dtype", "bf16", "--causal",
                              "--iters", "3", "--seed", "18446744073709551615", "--check", "--load",
                              "in", "--save=out", "--json"});
  EXPECT_EQ(*o.lens, (std::vector<std::int64_t>{1000, 1001, 0}));
  EXPECT_EQ(*o.kv_lens, (std::vector<std::int64_t>{5, 6, 7}));
  EXPECT_EQ(*o.heads, 24);
  EXPECT_EQ(*o.kv_heads, 8);
  EXPECT_EQ(*o.head_dim, 64);
  EXPECT_EQ(o.dtype, uaa::DType::bf16);
  EXPECT_TRUE(o.causal && o.check && o.json);
  EXPECT_EQ(o.iters, 3);
  EXPECT_EQ(o.seed, 18446744073709551615ull);
  EXPECT_EQ(o.load_dir, "in");
  EXPECT_EQ(o.save_dir, "out");
}

TEST(Args, Defaults) {
  const RunOptions o = parse({"--seq", "10", "--heads", "3"});
  EXPECT_EQ(*o.seq, 10);
  EXPECT_FALSE(o.kv_heads || o.head_dim || o.lens || o.kv_lens || o.kv_seq);
  EXPECT_EQ(o.dtype, uaa::DType::f32);
  EXPECT_EQ(o.iters, 1);
  EXPECT_FALSE(o.causal || o.check || o.json);
  EXPECT_TRUE(parse({"--help"}).help);
}

TEST(Args, RejectsBadInput) {
  expect_error({"--seq", "10"}, "--heads is required");
  expect_error({"--heads", "2"}, "--lens or --seq");
  expect_error({"--seq", "10", "--lens", "1,2", "--heads", "2"}, "not both");
  expect_error({"--seq", "10", "--kv-seq", "3", "--kv-lens", "1", "--heads", "2"}, "not both");
  expect_error({"--seq", "x", "--heads", "2"}, "not an integer");
  expect_error({"--seq", "-5", "--heads", "2"}, "outside");
  expect_error({"--seq", "99999999999999999999", "--heads", "2"}, "outside");
  expect_error({"--lens", "1,,2", "--heads", "2"}, "empty entry");
  expect_error({"--lens", "1,2,", "--heads", "2"}, "empty entry");
  expect_error({"--lens", "1,-2", "--heads", "2"}, "outside");
  expect_error({"--seq", "4", "--heads", "0"}, "outside");
  expect_error({"--seq", "4", "--heads", "2", "--iters", "0"}, "outside");
  expect_error({"--seq", "4", "--heads", "2", "--dtype", "f16"}, "not one of");
  expect_error({"--seq", "4", "--heads", "2", "--seed", "-1"}, "--seed");
  expect_error({"--seq", "4", "--heads", "2", "--frob"}, "unknown option '--frob'");
  expect_error({"--seq", "4", "--heads", "2", "extra"}, "unexpected argument 'extra'");
  expect_error({"--seq", "4", "--heads"}, "needs a value");
  expect_error({"--seq", "4", "--heads", "2", "--heads", "3"}, "more than once");
  expect_error({"--seq", "4", "--heads", "2", "--causal=yes"}, "takes no value");
  expect_error({"--seq", "4", "--heads", "2", "--load="}, "needs a directory");
}

TEST(Args, Backward) {
  RunOptions o = parse({"--seq", "10", "--heads", "3", "--backward"});
  EXPECT_TRUE(o.backward);
  EXPECT_TRUE(o.backward_saved);  // the default mode
  o = parse({"--seq", "10", "--heads", "3", "--backward", "--backward-mode", "recompute"});
  EXPECT_TRUE(o.backward);
  EXPECT_FALSE(o.backward_saved);
  o = parse({"--seq", "10", "--heads", "3", "--backward", "--backward-mode=saved"});
  EXPECT_TRUE(o.backward_saved);
  EXPECT_FALSE(parse({"--seq", "10", "--heads", "3"}).backward);
  expect_error({"--seq", "4", "--heads", "2", "--backward", "--backward-mode", "both"},
               "--backward-mode: 'both' is not one of saved, recompute");
  expect_error({"--seq", "4", "--heads", "2", "--backward-mode", "saved"},
               "--backward-mode needs --backward");
  expect_error({"--seq", "4", "--heads", "2", "--backward", "--strategy", "ulysses_pad"},
               "--backward needs --strategy uaa");
  expect_error({"--seq", "4", "--heads", "2", "--backward=1"}, "takes no value");
  expect_error({"--seq", "4", "--heads", "2", "--backward", "--backward"}, "more than once");
}

TEST(Args, DocumentsBatchWindow) {
  RunOptions o = parse({"--seq", "10", "--heads", "3"});
  EXPECT_FALSE(o.docs || o.kv_docs || o.batch || o.window_given);
  EXPECT_EQ(o.window_left, -1);
  EXPECT_EQ(o.window_right, -1);
  o = parse({"--seq", "10", "--heads", "3", "--docs", "3,0,7", "--kv-docs=1,2,3", "--batch", "2",
             "--window", "8,0", "--causal", "--backward"});
  EXPECT_EQ(*o.docs, (std::vector<std::int64_t>{3, 0, 7}));
  EXPECT_EQ(*o.kv_docs, (std::vector<std::int64_t>{1, 2, 3}));
  EXPECT_EQ(*o.batch, 2);
  EXPECT_TRUE(o.window_given);
  EXPECT_EQ(o.window_left, 8);
  EXPECT_EQ(o.window_right, 0);
  o = parse({"--seq", "10", "--heads", "3", "--window=-1,5"});
  EXPECT_EQ(o.window_left, -1);
  EXPECT_EQ(o.window_right, 5);
  o = parse({"--seq", "10", "--heads", "3", "--window", "-1,-1"});
  EXPECT_TRUE(o.window_given);
  EXPECT_EQ(o.window_left, -1);
  EXPECT_EQ(o.window_right, -1);
  // The library raises documents that do not sum to the totals (on every rank); the parser only
  // checks the lists themselves.
  EXPECT_EQ(*parse({"--seq", "10", "--heads", "3", "--docs", "1"}).docs, (std::vector<std::int64_t>{1}));

  expect_error({"--seq", "4", "--heads", "2", "--window", "-2,0"},
               "--window: -2 is outside [-1, ...] (the left side of '-2,0'");
  expect_error({"--seq", "4", "--heads", "2", "--window", "0,-3"},
               "--window: -3 is outside [-1, ...] (the right side of '0,-3'");
  expect_error({"--seq", "4", "--heads", "2", "--window", "8"}, "--window: '8' is not L,R");
  expect_error({"--seq", "4", "--heads", "2", "--window", "1,2,3"}, "--window: '1,2,3' is not L,R");
  expect_error({"--seq", "4", "--heads", "2", "--window", ",0"}, "--window: empty entry in ',0'");
  expect_error({"--seq", "4", "--heads", "2", "--window", "a,0"}, "--window: 'a' is not an integer");
  expect_error({"--seq", "4", "--heads", "2", "--window"}, "--window needs a value");
  expect_error({"--seq", "4", "--heads", "2", "--docs", "1,-2"}, "--docs: -2 is outside [0, ...]");
  expect_error({"--seq", "4", "--heads", "2", "--docs", "1,,2"}, "--docs: empty entry in '1,,2'");
  expect_error({"--seq", "4", "--heads", "2", "--docs", "x"}, "--docs: 'x' is not an integer");
  expect_error({"--seq", "4", "--heads", "2", "--kv-docs", "1,3"}, "--kv-docs needs --docs");
  expect_error({"--seq", "4", "--heads", "2", "--docs", "1,3", "--kv-docs", "4"},
               "--kv-docs has 1 value(s) but --docs has 2");
  expect_error({"--seq", "4", "--heads", "2", "--kv-docs", "1,-3", "--docs", "4"},
               "--kv-docs: -3 is outside [0, ...]");
  expect_error({"--seq", "4", "--heads", "2", "--batch", "0"}, "--batch: 0 is outside [1, 2147483647]");
  expect_error({"--seq", "4", "--heads", "2", "--batch", "two"}, "--batch: 'two' is not an integer");
  expect_error({"--seq", "4", "--heads", "2", "--batch", "2", "--batch", "2"}, "--batch is given more than once");
  expect_error({"--seq", "4", "--heads", "2", "--docs", "4", "--docs", "4"}, "--docs is given more than once");
}

TEST(Args, EvenSplit) {
  EXPECT_EQ(uaa::cli::even_split(10, 4), (std::vector<std::int64_t>{3, 3, 2, 2}));
  EXPECT_EQ(uaa::cli::even_split(2, 3), (std::vector<std::int64_t>{1, 1, 0}));
  EXPECT_EQ(uaa::cli::even_split(4608, 2), (std::vector<std::int64_t>{2304, 2304}));
  EXPECT_EQ(uaa::cli::even_split(0, 2), (std::vector<std::int64_t>{0, 0}));
}

}  // namespace
