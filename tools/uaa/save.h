// `uaa run --save DIR`: all files or none.
//
// Every file is written to a temporary name in DIR (".NAME.uaa-tmp-PID-N"), in pieces, and
// synced. Only when every file is complete are they renamed over their final names; a file that
// already exists is first kept under a backup name (a hard link, or a rename where links are not
// supported), so that a rename failing half-way is undone: every file gets its old content back (or
// disappears if it did not exist). Until commit(), a failure (or the destructor) removes the
// temporaries and leaves DIR as it was.
//
// prepare_dir() checks DIR before the run: it creates it if needed, checks that a file can be
// created in it, and that no final name is taken by something that is not a regular file.
//
// UAA_TOOL_SAVE_FAULT=write:NAME or rename:NAME makes the save fail while writing NAME's data or
// when renaming NAME (for tests of the roll-back).
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

#include "npy.h"
#include "text.h"
#include "uaa/error.h"

namespace uaa::cli {

class AtomicSave {
 public:
  explicit AtomicSave(std::string dir) : dir_(std::move(dir)) {
    if (const char* f = std::getenv("UAA_TOOL_SAVE_FAULT"); f != nullptr && *f) fault_ = f;
  }
  AtomicSave(const AtomicSave&) = delete;
  AtomicSave& operator=(const AtomicSave&) = delete;
  ~AtomicSave() { discard(); }

  // Creates DIR if needed and checks it: a file can be created there, and none of `names` exists
  // as anything but a regular file. Throws uaa::Error(invalid_argument) saying what is wrong.
  static void prepare_dir(const std::string& dir, std::span<const std::string> names) {
    namespace fs = std::filesystem;
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) fail(cat("--save: cannot create the directory ", dir, ": ", ec.message()));
    if (!fs::is_directory(dir, ec)) fail(cat("--save: ", dir, " is not a directory"));
    const std::string probe = path_in(dir, cat(".uaa-probe-", ::getpid()));
    const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) fail(cat("--save: cannot create files in ", dir, ": ", std::strerror(errno)));
    ::close(fd);
    ::unlink(probe.c_str());
    for (const std::string& n : names) check_final(path_in(dir, n));
  }

  // Starts file `name` (a float32 .npy of `shape`); returns its index for write().
  int open(const std::string& name, std::span<const std::int64_t> shape) {
    File f;
    f.name = name;
    f.final_path = path_in(dir_, name);
    std::string header;
    try {
      header = npy::encode_header(shape);
    } catch (const Error& e) {
      fail(cat("--save: ", f.final_path, ": ", e.what()));
    }
    f.expected = static_cast<std::int64_t>(header.size());
    std::int64_t n = 1;
    for (std::int64_t d : shape) n *= d;
    f.expected += n * 4;
    for (int attempt = 0;; ++attempt) {
      f.temp_path = path_in(dir_, cat(".", name, ".uaa-tmp-", ::getpid(), "-", counter_++));
      f.fd = ::open(f.temp_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
      if (f.fd >= 0) break;
      if (errno != EEXIST || attempt > 100)
        fail(cat("--save: cannot create ", f.temp_path, ": ", std::strerror(errno)));
    }
    files_.push_back(f);
    const int i = static_cast<int>(files_.size()) - 1;
    put(i, header.data(), header.size());
    return i;
  }

  // Appends `n` floats (stored little-endian) to file i.
  void write(int i, const float* data, std::int64_t n) {
    File& f = files_[static_cast<std::size_t>(i)];
    if (fault_ == "write:" + f.name)
      fail(cat("--save: writing ", f.temp_path, ": injected failure (UAA_TOOL_SAVE_FAULT)"));
    if constexpr (std::endian::native == std::endian::little) {
      put(i, data, static_cast<std::size_t>(n) * sizeof(float));
    } else {
      std::vector<std::uint32_t> tmp(static_cast<std::size_t>(n));
      std::memcpy(tmp.data(), data, tmp.size() * 4);
      for (auto& w : tmp)
        w = (w >> 24) | ((w >> 8) & 0xff00u) | ((w << 8) & 0xff0000u) | (w << 24);
      put(i, tmp.data(), tmp.size() * 4);
    }
  }

  // Makes every file visible under its final name, or none (see above). Throws uaa::Error.
  void commit() {
    namespace fs = std::filesystem;
    for (File& f : files_) {
      if (f.written != f.expected)
        fail(cat("--save: ", f.final_path, ": ", f.written, " of ", f.expected,
                 " bytes written (internal error)"));
      if (::fsync(f.fd) != 0) fail(cat("--save: syncing ", f.temp_path, ": ", std::strerror(errno)));
      const int fd = f.fd;
      f.fd = -1;
      if (::close(fd) != 0) fail(cat("--save: closing ", f.temp_path, ": ", std::strerror(errno)));
    }
    for (File& f : files_) check_final(f.final_path);
    // Backups of the files being replaced.
    for (File& f : files_) {
      struct stat st;
      if (::lstat(f.final_path.c_str(), &st) != 0) continue;  // new file
      f.backup_path = path_in(dir_, cat(".", f.name, ".uaa-old-", ::getpid()));
      ::unlink(f.backup_path.c_str());
      if (::link(f.final_path.c_str(), f.backup_path.c_str()) == 0) {
        f.backup = Backup::link;
      } else if (::rename(f.final_path.c_str(), f.backup_path.c_str()) == 0) {
        f.backup = Backup::moved;
      } else {
        const std::string why = std::strerror(errno);
        roll_back();
        fail(cat("--save: cannot keep the old ", f.final_path, " while replacing it: ", why,
                 " (nothing was replaced)"));
      }
    }
    for (File& f : files_) {
      const bool injected = fault_ == "rename:" + f.name;
      if (injected || ::rename(f.temp_path.c_str(), f.final_path.c_str()) != 0) {
        const std::string why =
            injected ? "injected failure (UAA_TOOL_SAVE_FAULT)" : std::strerror(errno);
        roll_back();
        fail(cat("--save: renaming ", f.temp_path, " to ", f.final_path, ": ", why,
                 " (every file of the save was put back as it was)"));
      }
      f.renamed = true;
    }
    for (File& f : files_)
      if (f.backup != Backup::none) ::unlink(f.backup_path.c_str());
    const int dfd = ::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      ::fsync(dfd);
      ::close(dfd);
    }
    files_.clear();
  }

  // Removes every temporary (nothing was renamed yet, or it was rolled back).
  void discard() {
    for (File& f : files_) {
      if (f.fd >= 0) ::close(f.fd);
      f.fd = -1;
      if (!f.renamed) ::unlink(f.temp_path.c_str());
    }
    files_.clear();
  }

 private:
  enum class Backup { none, link, moved };
  struct File {
    std::string name, final_path, temp_path, backup_path;
    int fd = -1;
    std::int64_t written = 0, expected = 0;
    Backup backup = Backup::none;
    bool renamed = false;
  };

  [[noreturn]] static void fail(const std::string& what) {
    throw Error(ErrorCode::invalid_argument, what);
  }
  static std::string path_in(const std::string& dir, const std::string& name) {
    return (std::filesystem::path(dir) / name).string();
  }
  static void check_final(const std::string& path) {
    struct stat st;
    if (::lstat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode))
      fail(cat("--save: ", path, " exists and is not a regular file (nothing was written)"));
  }

  void put(int i, const void* data, std::size_t bytes) {
    File& f = files_[static_cast<std::size_t>(i)];
    const char* p = static_cast<const char*>(data);
    while (bytes > 0) {
      const ssize_t w = ::write(f.fd, p, std::min<std::size_t>(bytes, std::size_t{1} << 30));
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0)
        fail(cat("--save: writing ", f.temp_path, ": ", std::strerror(w < 0 ? errno : ENOSPC),
                 " (nothing was replaced)"));
      p += w;
      bytes -= static_cast<std::size_t>(w);
      f.written += w;
    }
  }

  // Undoes every rename and backup made so far: old files back under their names, new ones gone.
  void roll_back() {
    for (File& f : files_) {
      if (f.renamed) {
        if (f.backup != Backup::none) {
          ::rename(f.backup_path.c_str(), f.final_path.c_str());
          f.backup = Backup::none;
        } else {
          ::unlink(f.final_path.c_str());
        }
        f.renamed = false;
        continue;
      }
      if (f.backup == Backup::link) ::unlink(f.backup_path.c_str());
      if (f.backup == Backup::moved) ::rename(f.backup_path.c_str(), f.final_path.c_str());
      f.backup = Backup::none;
    }
  }

  std::string dir_, fault_;
  std::vector<File> files_;
  int counter_ = 0;
};

}  // namespace uaa::cli
