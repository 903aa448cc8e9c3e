// Progress lines of long `uaa run`s: a thread on rank 0 prints what the command is doing on
// stderr, at most once every `interval` seconds (UAA_TOOL_PROGRESS_SECONDS, default 10; 0: never),
// starting after the first interval, so that short runs print nothing. It never calls MPI.
//
//   uaa run: progress: 42 s: iteration 3 of 10
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "text.h"
#include "uaa/error.h"

namespace uaa::cli {

class Progress {
 public:
  static constexpr const char* kVariable = "UAA_TOOL_PROGRESS_SECONDS";

  // The interval from UAA_TOOL_PROGRESS_SECONDS; throws uaa::Error(invalid_argument) if malformed.
  static double interval_from_env() {
    const char* env = std::getenv(kVariable);
    if (env == nullptr || *env == '\0') return 10.0;
    char* end = nullptr;
    const double v = std::strtod(env, &end);
    if (end == env || *end != '\0' || !(v >= 0) || v > 1e9)
      throw Error(ErrorCode::invalid_argument,
                  cat(kVariable, "='", env, "' is not a number of seconds (0: no progress lines)"));
    return v;
  }

  Progress() = default;
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;
  ~Progress() { stop(); }

  // Starts the thread (interval > 0).
  void start(double interval_seconds) {
    if (interval_seconds <= 0 || thread_.joinable()) return;
    start_ = std::chrono::steady_clock::now();
    const auto interval = std::chrono::duration<double>(interval_seconds);
    thread_ = std::thread([this, interval] {
      std::unique_lock<std::mutex> lock(mutex_);
      auto next = std::chrono::steady_clock::now() +
                  std::chrono::duration_cast<std::chrono::steady_clock::duration>(interval);
      while (!stopped_) {
        if (cv_.wait_until(lock, next, [this] { return stopped_; })) break;
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
        std::fprintf(stderr, "uaa run: progress: %.0f s: %s\n", s, what_.c_str());
        std::fflush(stderr);
        next += std::chrono::duration_cast<std::chrono::steady_clock::duration>(interval);
        const auto now = std::chrono::steady_clock::now();
        if (next < now) next = now + std::chrono::duration_cast<std::chrono::steady_clock::duration>(interval);
      }
    });
  }

  void set(std::string what) {
    std::lock_guard<std::mutex> lock(mutex_);
    what_ = std::move(what);
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopped_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  std::thread thread_;
  bool stopped_ = false;
  std::string what_ = "starting";
  std::chrono::steady_clock::time_point start_;
};

}  // namespace uaa::cli
