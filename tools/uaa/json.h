// A minimal one-line JSON object writer for machine-readable tool output.
//
//   JsonWriter j;
//   j.field("ranks", 3).field("lens", std::vector<std::int64_t>{1, 2}).begin_object("ms");
//   j.field("total", 1.5).end_object();
//   std::puts(j.str().c_str());   // {"ranks": 3, "lens": [1, 2], "ms": {"total": 1.5}}
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace uaa::cli {

class JsonWriter {
 public:
  JsonWriter() { out_ = "{"; }

  JsonWriter& field(const std::string& key, const std::string& v) { return raw(key, quote(v)); }
  JsonWriter& field(const std::string& key, const char* v) { return raw(key, quote(v)); }
  JsonWriter& field(const std::string& key, bool v) { return raw(key, v ? "true" : "false"); }
  JsonWriter& field(const std::string& key, std::int64_t v) { return raw(key, std::to_string(v)); }
  JsonWriter& field(const std::string& key, int v) { return raw(key, std::to_string(v)); }
  JsonWriter& field(const std::string& key, std::uint64_t v) { return raw(key, std::to_string(v)); }
  JsonWriter& field(const std::string& key, double v) { return raw(key, number(v)); }
  JsonWriter& field(const std::string& key, const std::vector<std::int64_t>& v) {
    std::string s = "[";
    for (std::size_t i = 0; i < v.size(); ++i) {
      if (i) s += ", ";
      s += std::to_string(v[i]);
    }
    return raw(key, s + "]");
  }
  JsonWriter& field(const std::string& key, const std::vector<std::string>& v) {
    std::string s = "[";
    for (std::size_t i = 0; i < v.size(); ++i) {
      if (i) s += ", ";
      s += quote(v[i]);
    }
    return raw(key, s + "]");
  }
  JsonWriter& begin_object(const std::string& key) {
    raw(key, "{");
    first_ = true;
    return *this;
  }
  JsonWriter& end_object() {
    out_ += "}";
    first_ = false;
    return *this;
  }
  std::string str() const { return out_ + "}"; }

  // Finite numbers with enough digits to round-trip; NaN and infinities (not JSON) become null.
  static std::string number(double v) {
    if (!std::isfinite(v)) return "null";
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.9g", v);
    return buf;
  }
  static std::string quote(const std::string& s) {
    std::string q = "\"";
    for (unsigned char c : s) {
      if (c == '"' || c == '\\') {
        q += '\\';
        q += static_cast<char>(c);
      } else if (c < 0x20) {
        char buf[8];
        std::snprintf(buf, sizeof buf, "\\u%04x", c);
        q += buf;
      } else {
        q += static_cast<char>(c);
      }
    }
    return q + "\"";
  }

 private:
  JsonWriter& raw(const std::string& key, const std::string& value) {
    if (!first_) out_ += ", ";
    first_ = false;
    out_ += quote(key) + ": " + value;
    if (value == "{") first_ = true;
    return *this;
  }

  std::string out_;
  bool first_ = true;
};

}  // namespace uaa::cli
