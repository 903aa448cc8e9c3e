// A small, strict reader/writer for NumPy .npy files holding little-endian float32 ('<f4') arrays.
//
// Read: format versions 1.0, 2.0 and 3.0; C order only; the data must be exactly as long as the
// shape says. Write: version 1.0 (2.0 only if the header would not fit 1.0's 16-bit length).
// Every problem (bad magic, truncated or oversized header, malformed dictionary, other dtype,
// fortran_order True, negative or overflowing dimensions, data shorter or longer than the shape)
// throws uaa::Error(invalid_argument) with a message saying what is wrong; nothing reads past the
// bytes it was given.
//
//   uaa::npy::Header h = uaa::npy::read_header("q.npy");          // shape, data offset
//   std::vector<float> rows(n * h.row_elements());
//   uaa::npy::read_rows("q.npy", h, first, n, rows.data());       // rows [first, first + n)
//   uaa::npy::write("out.npy", {S, H, D}, out.data());
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace uaa::npy {

// Longest header (dictionary text) accepted when reading.
inline constexpr std::uint64_t kMaxHeaderBytes = 1u << 20;

struct Header {
  int major = 1, minor = 0;          // format version
  std::vector<std::int64_t> shape;   // C order; empty for a 0-d array (one element)
  std::uint64_t data_offset = 0;     // byte offset of the first element in the file
  std::int64_t elements() const;     // product of shape (1 for 0-d)
  std::int64_t row_elements() const; // product of shape[1:] (elements per leading index)
};

// Bytes of the whole preamble + header, read from the first bytes of a file (the magic, version and
// header length; at most 12 bytes are inspected). Throws if those bytes are not a valid preamble.
std::uint64_t header_size(std::span<const unsigned char> first_bytes);

// Parses the preamble and header at the start of `bytes` (which hold at least the whole header) of
// a file of `file_size` bytes, and checks that the data that follows has exactly the size the shape
// needs. Throws uaa::Error on any problem.
Header parse_header(std::span<const unsigned char> bytes, std::uint64_t file_size);

// Decodes a whole .npy file held in memory into a shape and float values (for tests and fuzzing).
struct Array {
  std::vector<std::int64_t> shape;
  std::vector<float> data;
};
Array decode(std::span<const unsigned char> file);

// Encodes a complete .npy file (version 1.0 header + data) in memory.
std::vector<unsigned char> encode(std::span<const std::int64_t> shape, const float* data);
// Only the preamble + header for `shape`, padded so the data starts at a multiple of 64.
std::string encode_header(std::span<const std::int64_t> shape);

// Files. Errors name the path.
Header read_header(const std::string& path);
// Reads leading-index rows [first, first + count) into dst (count * row_elements() floats).
void read_rows(const std::string& path, const Header& header, std::int64_t first,
               std::int64_t count, float* dst);
Array read(const std::string& path);
void write(const std::string& path, std::span<const std::int64_t> shape, const float* data);

// "(3, 4, 5)" — shape as Python prints it.
std::string shape_string(std::span<const std::int64_t> shape);

}  // namespace uaa::npy
