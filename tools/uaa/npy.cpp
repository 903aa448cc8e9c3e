#include "npy.h"

#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>
#include <sstream>

#include "text.h"
#include "uaa/error.h"

namespace uaa::npy {
namespace {

using cli::cat;

constexpr unsigned char kMagic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
constexpr std::int64_t kElemBytes = 4;  // float32

[[noreturn]] void fail(const std::string& what) {
  throw Error(ErrorCode::invalid_argument, "npy: " + what);
}

std::uint64_t le16(const unsigned char* p) { return p[0] | (std::uint64_t{p[1]} << 8); }
std::uint64_t le32(const unsigned char* p) {
  return p[0] | (std::uint64_t{p[1]} << 8) | (std::uint64_t{p[2]} << 16) |
         (std::uint64_t{p[3]} << 24);
}

// Checked product of dimensions; nullopt-like failure via exception.
std::int64_t checked_product(const std::vector<std::int64_t>& dims, std::size_t from) {
  std::int64_t n = 1;
  for (std::size_t i = from; i < dims.size(); ++i) {
    if (dims[i] < 0) fail(cat("negative dimension ", dims[i]));
    if (dims[i] != 0 && n > std::numeric_limits<std::int64_t>::max() / dims[i])
      fail(cat("shape ", shape_string(dims), " has too many elements"));
    n *= dims[i];
  }
  return n;
}

// The header dictionary, e.g. "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }".
class DictParser {
 public:
  DictParser(const char* begin, const char* end) : begin_(begin), p_(begin), end_(end) {}

  struct Result {
    bool has_descr = false, has_order = false, has_shape = false;
    std::string descr;
    bool fortran_order = false;
    std::vector<std::int64_t> shape;
  };

  Result parse() {
    Result r;
    skip_ws();
    expect('{');
    skip_ws();
    while (!at('}')) {
      const std::string key = string_literal();
      skip_ws();
      expect(':');
      skip_ws();
      if (key == "descr") {
        if (r.has_descr) error("duplicate key 'descr'");
        r.has_descr = true;
        if (!at('\'') && !at('"'))
          error("descr must be a string (structured dtypes are not supported)");
        r.descr = string_literal();
      } else if (key == "fortran_order") {
        if (r.has_order) error("duplicate key 'fortran_order'");
        r.has_order = true;
        r.fortran_order = boolean();
      } else if (key == "shape") {
        if (r.has_shape) error("duplicate key 'shape'");
        r.has_shape = true;
        r.shape = tuple();
      } else {
        error(cat("unexpected key '", printable(key), "'"));
      }
      skip_ws();
      if (at(',')) {
        ++p_;
        skip_ws();
      } else if (!at('}')) {
        error("expected ',' or '}'");
      }
    }
    ++p_;  // '}'
    skip_ws();
    if (p_ != end_) error("unexpected text after the dictionary");
    if (!r.has_descr) fail("header has no 'descr'");
    if (!r.has_order) fail("header has no 'fortran_order'");
    if (!r.has_shape) fail("header has no 'shape'");
    return r;
  }

 private:
  [[noreturn]] void error(const std::string& what) const {
    fail(cat("malformed header: ", what, " at offset ", p_ - begin_));
  }
  static std::string printable(const std::string& s) {
    std::string out;
    for (char c : s) out += (c >= 0x20 && c < 0x7f) ? c : '?';
    return out;
  }
  bool at(char c) const { return p_ != end_ && *p_ == c; }
  void expect(char c) {
    if (!at(c)) error(std::string("expected '") + c + "'");
    ++p_;
  }
  void skip_ws() {
    while (p_ != end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' || *p_ == '\r')) ++p_;
  }
  bool word(const char* w) {
    const std::size_t n = std::strlen(w);
    if (static_cast<std::size_t>(end_ - p_) < n || std::memcmp(p_, w, n) != 0) return false;
    p_ += n;
    return true;
  }
  std::string string_literal() {
    if (!at('\'') && !at('"')) error("expected a quoted string");
    const char quote = *p_++;
    std::string s;
    while (true) {
      if (p_ == end_) error("unterminated string");
      const char c = *p_;
      if (c == quote) break;
      if (c == '\\') error("escape sequences are not supported");
      if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) >= 0x7f)
        error("non-printable character in string");
      if (s.size() >= 64) error("string too long");
      s += c;
      ++p_;
    }
    ++p_;
    return s;
  }
  bool boolean() {
    if (word("True")) return true;
    if (word("False")) return false;
    error("expected True or False");
  }
  std::int64_t integer() {
    if (at('-')) error("negative dimension");
    if (p_ == end_ || *p_ < '0' || *p_ > '9') error("expected a non-negative integer");
    std::int64_t v = 0;
    while (p_ != end_ && *p_ >= '0' && *p_ <= '9') {
      const int d = *p_ - '0';
      if (v > (std::numeric_limits<std::int64_t>::max() - d) / 10) error("dimension overflows");
      v = v * 10 + d;
      ++p_;
    }
    if (at('L') || at('l')) ++p_;  // written by Python 2 era numpy
    return v;
  }
  std::vector<std::int64_t> tuple() {
    expect('(');
    skip_ws();
    std::vector<std::int64_t> dims;
    bool trailing_comma = false;
    while (!at(')')) {
      if (dims.size() >= 32) error("more than 32 dimensions");
      dims.push_back(integer());
      skip_ws();
      trailing_comma = false;
      if (at(',')) {
        ++p_;
        trailing_comma = true;
        skip_ws();
      } else if (!at(')')) {
        error("expected ',' or ')' in shape");
      }
    }
    if (dims.size() == 1 && !trailing_comma) error("shape (n) is not a tuple; write (n,)");
    ++p_;  // ')'
    return dims;
  }

  const char* begin_;
  const char* p_;
  const char* end_;
};

struct FileCloser {
  void operator()(std::FILE* f) const { std::fclose(f); }
};
using File = std::unique_ptr<std::FILE, FileCloser>;

File open_for_read(const std::string& path, std::uint64_t& size) {
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (ec || !std::filesystem::exists(status))
    fail(path + ": cannot open: no such file");
  if (!std::filesystem::is_regular_file(status)) fail(path + ": not a regular file");
  size = std::filesystem::file_size(path, ec);
  if (ec) fail(path + ": cannot get the file size: " + ec.message());
  File f(std::fopen(path.c_str(), "rb"));
  if (!f) fail(path + ": cannot open: " + std::strerror(errno));
  return f;
}

void read_exact(std::FILE* f, const std::string& path, std::uint64_t offset, void* dst,
                std::uint64_t bytes) {
  if (bytes == 0) return;
  if (offset > static_cast<std::uint64_t>(std::numeric_limits<long>::max()) ||
      std::fseek(f, static_cast<long>(offset), SEEK_SET) != 0)
    fail(cat(path, ": cannot seek to byte ", offset));
  if (std::fread(dst, 1, bytes, f) != bytes)
    fail(cat(path, ": short read (", bytes, " bytes at offset ", offset,
             "); was the file changed?"));
}

void to_host_order(float* data, std::size_t n) {
  if constexpr (std::endian::native == std::endian::big) {
    for (std::size_t i = 0; i < n; ++i) {
      std::uint32_t u;
      std::memcpy(&u, data + i, 4);
      u = (u >> 24) | ((u >> 8) & 0xff00u) | ((u << 8) & 0xff0000u) | (u << 24);
      std::memcpy(data + i, &u, 4);
    }
  } else {
    (void)data;
    (void)n;
  }
}

}  // namespace

std::int64_t Header::elements() const { return checked_product(shape, 0); }
std::int64_t Header::row_elements() const { return checked_product(shape, 1); }

std::string shape_string(std::span<const std::int64_t> shape) {
  std::ostringstream os;
  os << '(';
  for (std::size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  if (shape.size() == 1) os << ',';
  os << ')';
  return os.str();
}

std::uint64_t header_size(std::span<const unsigned char> b) {
  if (b.size() < 8) fail(cat("file too short for a .npy preamble (", b.size(), " bytes)"));
  if (std::memcmp(b.data(), kMagic, sizeof kMagic) != 0) fail("bad magic: not a .npy file");
  const int major = b[6], minor = b[7];
  if (major < 1 || major > 3 || minor != 0)
    fail(cat("unsupported format version ", major, ".", minor));
  const std::size_t pre = major == 1 ? 10 : 12;
  if (b.size() < pre) fail("truncated header: the file ends inside the preamble");
  const std::uint64_t len = major == 1 ? le16(b.data() + 8) : le32(b.data() + 8);
  if (len > kMaxHeaderBytes)
    fail(cat("header length ", len, " exceeds the limit of ", kMaxHeaderBytes, " bytes"));
  return pre + len;
}

Header parse_header(std::span<const unsigned char> bytes, std::uint64_t file_size) {
  if (bytes.size() > file_size) fail("internal: more bytes than the file has");
  const std::uint64_t total = header_size(bytes);
  if (total > file_size)
    fail(cat("truncated header: header length ", total, " runs past the end of the file (",
             file_size, " bytes)"));
  if (total > bytes.size()) fail("truncated header: fewer bytes given than the header needs");
  const std::size_t pre = bytes[6] == 1 ? 10 : 12;
  const char* text = reinterpret_cast<const char*>(bytes.data());
  DictParser::Result r = DictParser(text + pre, text + total).parse();
  if (r.descr != "<f4")
    fail("dtype '" + r.descr + "' is not supported (only '<f4': little-endian float32)");
  if (r.fortran_order) fail("fortran_order True is not supported (C order only)");

  Header h;
  h.major = bytes[6];
  h.minor = bytes[7];
  h.shape = std::move(r.shape);
  h.data_offset = total;
  const std::int64_t n = h.elements();
  if (n > std::numeric_limits<std::int64_t>::max() / kElemBytes)
    fail(cat("shape ", shape_string(h.shape), " has too many elements"));
  const std::uint64_t need = static_cast<std::uint64_t>(n * kElemBytes);
  const std::uint64_t have = file_size - total;
  if (have < need)
    fail(cat("data truncated: shape ", shape_string(h.shape), " needs ", need,
             " bytes, the file has ", have));
  if (have > need)
    fail(cat("file has ", have - need, " bytes after the data of shape ", shape_string(h.shape)));
  return h;
}

Array decode(std::span<const unsigned char> file) {
  const Header h = parse_header(file, file.size());
  Array a;
  a.shape = h.shape;
  const auto n = static_cast<std::size_t>(h.elements());
  a.data.resize(n);
  if (n) std::memcpy(a.data.data(), file.data() + h.data_offset, n * sizeof(float));
  to_host_order(a.data.data(), n);
  return a;
}

std::string encode_header(std::span<const std::int64_t> shape) {
  const std::vector<std::int64_t> dims(shape.begin(), shape.end());
  const std::int64_t n = checked_product(dims, 0);
  if (n > std::numeric_limits<std::int64_t>::max() / kElemBytes)
    fail(cat("shape ", shape_string(shape), " has too many elements"));
  const std::string dict =
      cat("{'descr': '<f4', 'fortran_order': False, 'shape': ", shape_string(shape), ", }");
  int major = 1;
  std::size_t pre = 10;
  std::size_t len = dict.size() + 1;  // + '\n'
  len += (64 - (pre + len) % 64) % 64;
  if (len > 0xffff) {
    major = 2;
    pre = 12;
    len = dict.size() + 1;
    len += (64 - (pre + len) % 64) % 64;
  }
  std::string out(reinterpret_cast<const char*>(kMagic), sizeof kMagic);
  out += static_cast<char>(major);
  out += '\0';
  for (std::size_t i = 0; i < pre - 8; ++i) out += static_cast<char>((len >> (8 * i)) & 0xff);
  out += dict;
  out.append(len - dict.size() - 1, ' ');
  out += '\n';
  return out;
}

std::vector<unsigned char> encode(std::span<const std::int64_t> shape, const float* data) {
  const std::string header = encode_header(shape);
  const std::vector<std::int64_t> dims(shape.begin(), shape.end());
  const auto bytes = static_cast<std::size_t>(checked_product(dims, 0) * kElemBytes);
  std::vector<unsigned char> out(header.size() + bytes);
  std::memcpy(out.data(), header.data(), header.size());
  if (bytes) std::memcpy(out.data() + header.size(), data, bytes);
  to_host_order(reinterpret_cast<float*>(out.data() + header.size()), bytes / 4);  // symmetric
  return out;
}

Header read_header(const std::string& path) {
  std::uint64_t size = 0;
  File f = open_for_read(path, size);
  // Errors of the format itself get the path in front: "npy: q.npy: bad magic: ...".
  auto with_path = [&](auto&& parse) {
    try {
      return parse();
    } catch (const Error& e) {
      const std::string msg = e.what();
      throw Error(e.code(), "npy: " + path + ": " + (msg.rfind("npy: ", 0) == 0 ? msg.substr(5) : msg));
    }
  };
  std::vector<unsigned char> buf(static_cast<std::size_t>(std::min<std::uint64_t>(size, 12)));
  read_exact(f.get(), path, 0, buf.data(), buf.size());
  const std::uint64_t total = with_path([&] { return header_size(buf); });
  if (total > size)
    fail(cat(path, ": truncated header: header length ", total,
             " runs past the end of the file (", size, " bytes)"));
  buf.resize(static_cast<std::size_t>(total));
  read_exact(f.get(), path, 0, buf.data(), buf.size());
  return with_path([&] { return parse_header(buf, size); });
}

void read_rows(const std::string& path, const Header& h, std::int64_t first, std::int64_t count,
               float* dst) {
  if (h.shape.empty()) fail(path + ": a 0-d array has no rows");
  if (first < 0 || count < 0 || first > h.shape[0] || count > h.shape[0] - first)
    fail(cat(path, ": rows [", first, ", ", first + count, ") are outside the ", h.shape[0],
             " rows of the file"));
  const std::int64_t row = h.row_elements();
  std::uint64_t size = 0;
  File f = open_for_read(path, size);
  const std::uint64_t end = h.data_offset + static_cast<std::uint64_t>(h.elements()) * kElemBytes;
  if (size != end)
    fail(cat(path, ": file size changed since its header was read (", size, " bytes, expected ",
             end, ")"));
  const std::uint64_t offset =
      h.data_offset + static_cast<std::uint64_t>(first) * static_cast<std::uint64_t>(row) * kElemBytes;
  const std::uint64_t n = static_cast<std::uint64_t>(count) * static_cast<std::uint64_t>(row);
  read_exact(f.get(), path, offset, dst, n * kElemBytes);
  to_host_order(dst, static_cast<std::size_t>(n));
}

Array read(const std::string& path) {
  const Header h = read_header(path);
  Array a;
  a.shape = h.shape;
  a.data.resize(static_cast<std::size_t>(h.elements()));
  if (h.shape.empty()) {
    std::uint64_t size = 0;
    File f = open_for_read(path, size);
    read_exact(f.get(), path, h.data_offset, a.data.data(), kElemBytes);
    to_host_order(a.data.data(), 1);
  } else {
    read_rows(path, h, 0, h.shape[0], a.data.data());
  }
  return a;
}

void write(const std::string& path, std::span<const std::int64_t> shape, const float* data) {
  std::string header;
  try {
    header = encode_header(shape);
  } catch (const Error& e) {
    throw Error(e.code(), std::string("npy: ") + path + ": " + (e.what() + 5));
  }
  const std::vector<std::int64_t> dims(shape.begin(), shape.end());
  const auto n = static_cast<std::size_t>(checked_product(dims, 0));
  File f(std::fopen(path.c_str(), "wb"));
  if (!f) fail(path + ": cannot create: " + std::strerror(errno));
  bool ok = std::fwrite(header.data(), 1, header.size(), f.get()) == header.size();
  if constexpr (std::endian::native == std::endian::big) {
    std::vector<float> tmp(data, data + n);
    to_host_order(tmp.data(), n);
    ok = ok && std::fwrite(tmp.data(), sizeof(float), n, f.get()) == n;
  } else {
    ok = ok && (n == 0 || std::fwrite(data, sizeof(float), n, f.get()) == n);
  }
  std::FILE* raw = f.release();
  if (std::fclose(raw) != 0) ok = false;
  if (!ok) fail(path + ": write failed: " + std::strerror(errno));
}

}  // namespace uaa::npy
