// libFuzzer target for the .npy reader: any bytes must decode or throw uaa::Error — never crash,
// over-read (ASan) or allocate without bound. Also the file path: header_size + parse_header on
// a prefix, as read_header does. Seed corpus: corpus/npy.
#include <cstddef>
#include <cstdint>
#include <span>

#include "uaa/error.h"
#include "uaa/npy.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const unsigned char> bytes(data, size);
  try {
    const uaa::npy::Array a = uaa::npy::decode(bytes);
    std::int64_t n = 1;
    for (std::int64_t d : a.shape) n *= d;
    if (static_cast<std::size_t>(n) != a.data.size()) __builtin_trap();  // decode lied
  } catch (const uaa::Error&) {
  }
  try {
    const std::uint64_t hs = uaa::npy::header_size(bytes.first(size < 12 ? size : 12));
    if (hs <= size) uaa::npy::parse_header(bytes.first(hs), size);
  } catch (const uaa::Error&) {
  }
  return 0;
}
