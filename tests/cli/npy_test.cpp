// The .npy reader/writer of the uaa tool: round trips, header versions, and every malformed input.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "npy.h"
#include "uaa/error.h"

namespace {

using Bytes = std::vector<unsigned char>;
namespace npy = uaa::npy;

// Builds a file: magic, version, header length field, the header text, then `data_bytes` bytes.
Bytes make_file(const std::string& dict, int major = 1, std::size_t data_bytes = 0,
                int minor = 0) {
  Bytes b = {0x93, 'N', 'U', 'M', 'P', 'Y', static_cast<unsigned char>(major),
             static_cast<unsigned char>(minor)};
  const std::size_t len = dict.size();
  const int width = major == 1 ? 2 : 4;
  for (int i = 0; i < width; ++i) b.push_back(static_cast<unsigned char>((len >> (8 * i)) & 0xff));
  b.insert(b.end(), dict.begin(), dict.end());
  for (std::size_t i = 0; i < data_bytes; ++i) b.push_back(static_cast<unsigned char>(i * 7));
  return b;
}

std::string dict_for(const std::string& shape, const std::string& descr = "'<f4'",
                     const std::string& order = "False") {
  return "{'descr': " + descr + ", 'fortran_order': " + order + ", 'shape': " + shape + ", }\n";
}

// Expects decode() to throw uaa::Error(invalid_argument) whose message contains `needle`.
void expect_rejected(const Bytes& file, const std::string& needle) {
  try {
    npy::decode(file);
    ADD_FAILURE() << "accepted a malformed file; expected an error containing '" << needle << "'";
  } catch (const uaa::Error& e) {
    EXPECT_EQ(e.code(), uaa::ErrorCode::invalid_argument);
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message: " << e.what() << "\nexpected to contain: " << needle;
  }
}

std::vector<float> iota(std::size_t n) {
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<float>(i) * 0.5f - 3.0f;
  return v;
}

class TempDir {
 public:
  TempDir() {
    path_ = std::filesystem::temp_directory_path() /
            ("uaa_npy_test_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) +
             "_" + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

void write_bytes(const std::string& path, const Bytes& b) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

TEST(Npy, RoundTripInMemory) {
  const std::vector<std::vector<std::int64_t>> shapes = {{}, {0}, {5}, {2, 3, 4}, {0, 3, 4}, {3, 0, 2},
                                                         {1, 1, 1, 1, 7}};
  for (const auto& shape : shapes) {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    const std::vector<float> data = iota(static_cast<std::size_t>(n));
    const Bytes file = npy::encode(shape, data.data());
    const npy::Array a = npy::decode(file);
    EXPECT_EQ(a.shape, shape) << npy::shape_string(shape);
    EXPECT_EQ(a.data, data) << npy::shape_string(shape);
  }
}

TEST(Npy, HeaderIsVersion1AlignedAndNumpyStyle) {
  const std::int64_t shape[] = {4481, 24, 128};
  const std::string h = npy::encode_header(shape);
  EXPECT_EQ(h.size() % 64, 0u);
  EXPECT_EQ(static_cast<unsigned char>(h[6]), 1);
  EXPECT_EQ(h[7], 0);
  EXPECT_EQ(h.back(), '\n');
  EXPECT_NE(h.find("{'descr': '<f4', 'fortran_order': False, 'shape': (4481, 24, 128), }"),
            std::string::npos);
  const std::size_t len = static_cast<unsigned char>(h[8]) | (static_cast<unsigned char>(h[9]) << 8);
  EXPECT_EQ(len + 10, h.size());
  const std::int64_t one[] = {7};
  EXPECT_NE(npy::encode_header(one).find("'shape': (7,)"), std::string::npos);
}

TEST(Npy, ReadsVersion2And3Headers) {
  for (int major : {2, 3}) {
    const Bytes file = make_file(dict_for("(2, 3)"), major, 24);
    const npy::Header h = npy::parse_header(file, file.size());
    EXPECT_EQ(h.major, major);
    EXPECT_EQ(h.shape, (std::vector<std::int64_t>{2, 3}));
    EXPECT_EQ(h.data_offset, 12 + dict_for("(2, 3)").size());
    EXPECT_EQ(npy::decode(file).data.size(), 6u);
  }
}

TEST(Npy, AcceptsHeaderVariations) {
  const std::vector<std::string> dicts = {
      "{\"descr\": \"<f4\", \"fortran_order\": False, \"shape\": (2, 3)}",
      "{'shape': (2,3), 'fortran_order': False, 'descr': '<f4'}    \n",
      "  {  'descr' : '<f4' ,'fortran_order':False,'shape':( 2 , 3 , ) , }",
      "{'descr': '<f4', 'fortran_order': False, 'shape': (2L, 3L), }",
  };
  for (const std::string& d : dicts) {
    const Bytes file = make_file(d, 1, 24);
    EXPECT_NO_THROW({
      const npy::Array a = npy::decode(file);
      EXPECT_EQ(a.shape, (std::vector<std::int64_t>{2, 3}));
    }) << d;
  }
}

TEST(Npy, RejectsBadMagic) {
  Bytes file = make_file(dict_for("(2,)"), 1, 8);
  file[1] = 'X';
  expect_rejected(file, "bad magic");
  expect_rejected(Bytes{'P', 'K', 3, 4, 0, 0, 0, 0, 0, 0, 0, 0}, "bad magic");
}

TEST(Npy, RejectsTooShortAndTruncatedPreamble) {
  expect_rejected(Bytes{}, "too short");
  expect_rejected(Bytes{0x93, 'N', 'U', 'M'}, "too short");
  // Version 2 needs 12 bytes of preamble; only 10 present.
  expect_rejected(Bytes{0x93, 'N', 'U', 'M', 'P', 'Y', 2, 0, 10, 0}, "truncated header");
}

TEST(Npy, RejectsUnsupportedVersion) {
  expect_rejected(make_file(dict_for("(2,)"), 4, 8), "version 4.0");
  expect_rejected(make_file(dict_for("(2,)"), 1, 8, 1), "version 1.1");
  expect_rejected(make_file(dict_for("(2,)"), 0, 8), "version 0.0");
}

TEST(Npy, RejectsHeaderLengthPastTheFile) {
  Bytes file = make_file(dict_for("(2,)"), 1, 0);
  file[8] = 0xff;  // header length 0x??ff > the file
  expect_rejected(file, "runs past the end of the file");
  Bytes v2 = make_file(dict_for("(2,)"), 2, 0);
  v2[11] = 0x7f;  // ~2 GB header length
  expect_rejected(v2, "exceeds the limit");
  // Header cut short inside the dictionary.
  const Bytes whole = make_file(dict_for("(2,)"), 1, 8);
  expect_rejected(Bytes(whole.begin(), whole.begin() + 30), "runs past the end of the file");
}

TEST(Npy, RejectsMalformedDictionaries) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"", "expected '{'"},
      {"   \n", "expected '{'"},
      {"'descr': '<f4'", "expected '{'"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2,), ", "expected a quoted string"},
      {"{'descr': '<f4', 'fortran_order': False}", "no 'shape'"},
      {"{'fortran_order': False, 'shape': (2,)}", "no 'descr'"},
      {"{'descr': '<f4', 'shape': (2,)}", "no 'fortran_order'"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'extra': 1}", "unexpected key 'extra'"},
      {"{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2,)}", "duplicate key"},
      {"{'descr: '<f4', 'fortran_order': False, 'shape': (2,)}", "expected ':'"},
      {"{'descr': '<f4, 'fortran_order': False, 'shape': (2,)}", "expected ','"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2,)", "expected ',' or '}'"},
      {"{'descr': '<f4', 'fortran_order': false, 'shape': (2,)}", "expected True or False"},
      {"{'descr': '<f4', 'fortran_order': 0, 'shape': (2,)}", "expected True or False"},
      {"{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,)}", "structured"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': [2]}", "expected '('"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2)}", "not a tuple"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2 3)}", "expected ',' or ')'"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2.5,)}", "expected ',' or ')'"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (,)}", "non-negative integer"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2,)} x", "after the dictionary"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2,)}}", "after the dictionary"},
      {"{'descr': '<\\x66', 'fortran_order': False, 'shape': (2,)}", "escape"},
      {std::string("{'descr': '<f4") + '\0' + "', 'fortran_order': False, 'shape': (2,)}",
       "non-printable"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }\xff", "after the dictionary"},
  };
  for (const auto& [dict, needle] : cases) {
    SCOPED_TRACE(dict);
    expect_rejected(make_file(dict, 1, 8), needle);
  }
}

TEST(Npy, RejectsOtherDtypes) {
  for (const char* d : {"'<f8'", "'>f4'", "'<i4'", "'|u1'", "'f4'", "'<f2'", "'<f4 '"})
    expect_rejected(make_file(dict_for("(2,)", d), 1, 8), "is not supported");
}

TEST(Npy, RejectsFortranOrder) {
  expect_rejected(make_file(dict_for("(2, 2)", "'<f4'", "True"), 1, 16), "fortran_order True");
}

TEST(Npy, RejectsDataShorterOrLongerThanTheShape) {
  expect_rejected(make_file(dict_for("(2, 3)"), 1, 23), "data truncated");
  expect_rejected(make_file(dict_for("(2, 3)"), 1, 0), "data truncated");
  expect_rejected(make_file(dict_for("()"), 1, 3), "data truncated");
  expect_rejected(make_file(dict_for("(2, 3)"), 1, 25), "after the data");
  expect_rejected(make_file(dict_for("(0, 3)"), 1, 4), "after the data");
}

TEST(Npy, RejectsNegativeAndOverflowingDimensions) {
  expect_rejected(make_file(dict_for("(-1, 3)"), 1, 0), "negative dimension");
  expect_rejected(make_file(dict_for("(2, -3)"), 1, 0), "negative dimension");
  expect_rejected(make_file(dict_for("(99999999999999999999,)"), 1, 0), "overflows");
  expect_rejected(make_file(dict_for("(9223372036854775808,)"), 1, 0), "overflows");
  expect_rejected(make_file(dict_for("(1099511627776, 1099511627776)"), 1, 0), "too many elements");
  expect_rejected(make_file(dict_for("(4611686018427387904,)"), 1, 0), "too many elements");
  // Huge but representable shapes must fail on the data size, not allocate.
  expect_rejected(make_file(dict_for("(1000000000000,)"), 1, 8), "data truncated");
  std::string many = "(";
  for (int i = 0; i < 40; ++i) many += "1, ";
  expect_rejected(make_file(dict_for(many + ")"), 1, 4), "more than 32 dimensions");
}

TEST(Npy, FilesRoundTripAndRowSlices) {
  TempDir dir;
  const std::int64_t shape[] = {5, 2, 3};
  const std::vector<float> data = iota(30);
  const std::string path = dir.file("a.npy");
  npy::write(path, shape, data.data());
  const npy::Array a = npy::read(path);
  EXPECT_EQ(a.shape, (std::vector<std::int64_t>{5, 2, 3}));
  EXPECT_EQ(a.data, data);

  const npy::Header h = npy::read_header(path);
  EXPECT_EQ(h.row_elements(), 6);
  EXPECT_EQ(h.elements(), 30);
  std::vector<float> rows(12);
  npy::read_rows(path, h, 2, 2, rows.data());
  EXPECT_EQ(rows, std::vector<float>(data.begin() + 12, data.begin() + 24));
  npy::read_rows(path, h, 5, 0, rows.data());  // empty slice at the end is fine
  EXPECT_THROW(npy::read_rows(path, h, 4, 2, rows.data()), uaa::Error);
  EXPECT_THROW(npy::read_rows(path, h, -1, 1, rows.data()), uaa::Error);

  const std::int64_t empty_shape[] = {0, 4, 8};
  npy::write(dir.file("e.npy"), empty_shape, nullptr);
  EXPECT_EQ(npy::read(dir.file("e.npy")).shape, (std::vector<std::int64_t>{0, 4, 8}));
}

TEST(Npy, FileErrorsNameThePath) {
  TempDir dir;
  try {
    npy::read_header(dir.file("missing.npy"));
    ADD_FAILURE() << "no error for a missing file";
  } catch (const uaa::Error& e) {
    EXPECT_NE(std::string(e.what()).find("missing.npy"), std::string::npos) << e.what();
  }
  EXPECT_THROW(npy::read_header(dir.file("")), uaa::Error);  // a directory

  Bytes bad = make_file(dict_for("(2,)", "'<f8'"), 1, 16);
  write_bytes(dir.file("f8.npy"), bad);
  try {
    npy::read_header(dir.file("f8.npy"));
    ADD_FAILURE() << "accepted <f8";
  } catch (const uaa::Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("f8.npy"), std::string::npos) << msg;
    EXPECT_NE(msg.find("'<f8' is not supported"), std::string::npos) << msg;
  }

  // Truncated on disk: header promises more than the file holds.
  const std::int64_t shape[] = {4, 4};
  const std::vector<float> data = iota(16);
  Bytes good = npy::encode(shape, data.data());
  write_bytes(dir.file("cut.npy"), Bytes(good.begin(), good.end() - 5));
  EXPECT_THROW(npy::read(dir.file("cut.npy")), uaa::Error);
  write_bytes(dir.file("tiny.npy"), Bytes(good.begin(), good.begin() + 5));
  EXPECT_THROW(npy::read(dir.file("tiny.npy")), uaa::Error);
  write_bytes(dir.file("hdr.npy"), Bytes(good.begin(), good.begin() + 40));
  EXPECT_THROW(npy::read(dir.file("hdr.npy")), uaa::Error);

  EXPECT_THROW(npy::write(dir.file("no/such/dir/x.npy"), shape, data.data()), uaa::Error);
  const std::int64_t negative[] = {-1, 2};
  EXPECT_THROW(npy::write(dir.file("neg.npy"), negative, data.data()), uaa::Error);
}

// Every prefix of a valid file is rejected cleanly (no crash, no over-read under sanitizers).
TEST(Npy, EveryTruncationIsRejected) {
  const std::int64_t shape[] = {3, 2};
  const std::vector<float> data = iota(6);
  const Bytes good = npy::encode(shape, data.data());
  for (std::size_t n = 0; n < good.size(); ++n) {
    const Bytes cut(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(n));
    EXPECT_THROW(npy::decode(cut), uaa::Error) << "prefix of " << n << " bytes";
  }
  EXPECT_NO_THROW(npy::decode(good));
}

// Single-byte corruptions of the header either decode to a valid array or throw uaa::Error.
TEST(Npy, CorruptedHeaderBytesNeverCrash) {
  const std::int64_t shape[] = {3, 2};
  const std::vector<float> data = iota(6);
  const Bytes good = npy::encode(shape, data.data());
  const std::size_t header = good.size() - data.size() * 4;
  for (std::size_t i = 0; i < header; ++i) {
    for (unsigned char v : {0x00, 0x20, 0x27, 0x28, 0x29, 0x2c, 0x2d, 0x31, 0x39, 0x7b, 0x7d, 0xff}) {
      Bytes b = good;
      b[i] = v;
      try {
        npy::decode(b);
      } catch (const uaa::Error&) {
      }
    }
  }
}

}  // namespace
