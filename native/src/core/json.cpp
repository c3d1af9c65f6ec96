#include "json.h"

#include <charconv>
#include <cmath>
#include <unordered_set>

namespace vdiff {

namespace {
constexpr int kMaxDepth = 512;

std::string describe_byte(char c) {
  unsigned char u = static_cast<unsigned char>(c);
  if (u >= 0x20 && u < 0x7f) return std::string("'") + c + "'";
  static const char* hex = "0123456789abcdef";
  return std::string("byte 0x") + hex[u >> 4] + hex[u & 15];
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xc0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xe0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else {
    out += static_cast<char>(0xf0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  }
}
}  // namespace

// Recursive-descent parser over the input text; `pos_` is the offset reported in errors.
class JsonParser {
 public:
  explicit JsonParser(std::string_view text) : text_(text) {}

  Json parse_document() {
    Json value = parse_value(0);
    skip_whitespace();
    if (pos_ != text_.size()) fail("unexpected " + describe_byte(text_[pos_]) + " after the JSON value");
    return value;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw JsonError("JSON error at offset " + std::to_string(pos_) + ": " + what, pos_);
  }

  bool at_end() const { return pos_ >= text_.size(); }

  void skip_whitespace() {
    while (!at_end()) {
      char c = text_[pos_];
      if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
      ++pos_;
    }
  }

  void expect_literal(std::string_view word) {
    if (text_.substr(pos_, word.size()) != word) fail("invalid literal (expected '" + std::string(word) + "')");
    pos_ += word.size();
  }

  Json parse_value(int depth) {
    skip_whitespace();
    if (at_end()) fail("unexpected end of input (expected a value)");
    Json value;
    char c = text_[pos_];
    switch (c) {
      case '{': return parse_object(depth + 1);
      case '[': return parse_array(depth + 1);
      case '"':
        value.type_ = Json::Type::String;
        value.string_ = parse_string();
        return value;
      case 't':
        expect_literal("true");
        value.type_ = Json::Type::Bool;
        value.bool_ = true;
        return value;
      case 'f':
        expect_literal("false");
        value.type_ = Json::Type::Bool;
        return value;
      case 'n': expect_literal("null"); return value;
      default:
        if (c == '-' || (c >= '0' && c <= '9')) return parse_number();
        fail("unexpected " + describe_byte(c) + " (expected a value)");
    }
  }

  Json parse_object(int depth) {
    if (depth > kMaxDepth) fail("nesting deeper than " + std::to_string(kMaxDepth) + " levels");
    ++pos_;  // '{'
    Json obj;
    obj.type_ = Json::Type::Object;
    std::unordered_set<std::string> seen;
    skip_whitespace();
    if (!at_end() && text_[pos_] == '}') {
      ++pos_;
      return obj;
    }
    for (;;) {
      skip_whitespace();
      if (at_end()) fail("unexpected end of input inside an object");
      if (text_[pos_] != '"') fail("unexpected " + describe_byte(text_[pos_]) + " (expected a string key)");
      size_t key_offset = pos_;
      std::string key = parse_string();
      if (!seen.insert(key).second) {
        pos_ = key_offset;
        fail("duplicate key \"" + key + "\"");
      }
      skip_whitespace();
      if (at_end() || text_[pos_] != ':') fail("expected ':' after an object key");
      ++pos_;
      Json member = parse_value(depth);
      obj.keys_.push_back(std::move(key));
      obj.items_.push_back(std::move(member));
      skip_whitespace();
      if (at_end()) fail("unexpected end of input inside an object");
      if (text_[pos_] == ',') {
        ++pos_;
        continue;
      }
      if (text_[pos_] == '}') {
        ++pos_;
        return obj;
      }
      fail("unexpected " + describe_byte(text_[pos_]) + " (expected ',' or '}')");
    }
  }

  Json parse_array(int depth) {
    if (depth > kMaxDepth) fail("nesting deeper than " + std::to_string(kMaxDepth) + " levels");
    ++pos_;  // '['
    Json arr;
    arr.type_ = Json::Type::Array;
    skip_whitespace();
    if (!at_end() && text_[pos_] == ']') {
      ++pos_;
      return arr;
    }
    for (;;) {
      arr.items_.push_back(parse_value(depth));
      skip_whitespace();
      if (at_end()) fail("unexpected end of input inside an array");
      if (text_[pos_] == ',') {
        ++pos_;
        continue;
      }
      if (text_[pos_] == ']') {
        ++pos_;
        return arr;
      }
      fail("unexpected " + describe_byte(text_[pos_]) + " (expected ',' or ']')");
    }
  }

  uint32_t parse_hex4() {
    if (pos_ + 4 > text_.size()) fail("truncated \\u escape");
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      char c = text_[pos_ + i];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= c - '0';
      else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
      else {
        pos_ += i;
        fail("invalid hex digit " + describe_byte(c) + " in \\u escape");
      }
    }
    pos_ += 4;
    return v;
  }

  // Validates one raw UTF-8 sequence starting at pos_ and appends it.
  void copy_utf8_sequence(std::string& out) {
    unsigned char lead = static_cast<unsigned char>(text_[pos_]);
    int extra;
    uint32_t cp;
    if (lead >= 0xc2 && lead <= 0xdf) {
      extra = 1;
      cp = lead & 0x1f;
    } else if (lead >= 0xe0 && lead <= 0xef) {
      extra = 2;
      cp = lead & 0x0f;
    } else if (lead >= 0xf0 && lead <= 0xf4) {
      extra = 3;
      cp = lead & 0x07;
    } else fail("invalid UTF-8 " + describe_byte(text_[pos_]) + " in a string");
    if (pos_ + extra >= text_.size()) fail("truncated UTF-8 sequence in a string");
    for (int i = 1; i <= extra; ++i) {
      unsigned char c = static_cast<unsigned char>(text_[pos_ + i]);
      if ((c & 0xc0) != 0x80) fail("invalid UTF-8 continuation byte in a string");
      cp = (cp << 6) | (c & 0x3f);
    }
    // Overlong forms, surrogates and code points past U+10FFFF are not valid UTF-8.
    static const uint32_t min_for_length[4] = {0, 0x80, 0x800, 0x10000};
    if (cp < min_for_length[extra] || (cp >= 0xd800 && cp <= 0xdfff) || cp > 0x10ffff)
      fail("invalid UTF-8 sequence in a string");
    out.append(text_.data() + pos_, extra + 1);
    pos_ += extra + 1;
  }

  std::string parse_string() {
    ++pos_;  // opening quote
    std::string out;
    for (;;) {
      if (at_end()) fail("unterminated string");
      char c = text_[pos_];
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (static_cast<unsigned char>(c) < 0x20)
        fail("unescaped control character " + describe_byte(c) + " in a string");
      if (static_cast<unsigned char>(c) >= 0x80) {
        copy_utf8_sequence(out);
        continue;
      }
      if (c != '\\') {
        out += c;
        ++pos_;
        continue;
      }
      ++pos_;
      if (at_end()) fail("unterminated escape in a string");
      char e = text_[pos_];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          size_t escape_offset = pos_ - 1;
          ++pos_;
          uint32_t cp = parse_hex4();
          if (cp >= 0xdc00 && cp <= 0xdfff) {
            pos_ = escape_offset;
            fail("lone low surrogate in \\u escape");
          }
          if (cp >= 0xd800 && cp <= 0xdbff) {
            if (text_.substr(pos_, 2) != "\\u") {
              pos_ = escape_offset;
              fail("high surrogate not followed by a low surrogate escape");
            }
            pos_ += 2;
            uint32_t low = parse_hex4();
            if (low < 0xdc00 || low > 0xdfff) {
              pos_ = escape_offset;
              fail("high surrogate not followed by a low surrogate escape");
            }
            cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
          }
          append_utf8(out, cp);
          continue;  // pos_ already past the escape
        }
        default: fail("invalid escape \\" + std::string(1, e));
      }
      ++pos_;
    }
  }

  Json parse_number() {
    size_t start = pos_;
    bool is_integer_literal = true;
    if (text_[pos_] == '-') ++pos_;
    if (at_end()) fail("truncated number");
    if (text_[pos_] == '0') {
      ++pos_;
    } else if (text_[pos_] >= '1' && text_[pos_] <= '9') {
      while (!at_end() && text_[pos_] >= '0' && text_[pos_] <= '9') ++pos_;
    } else {
      fail("invalid number");
    }
    if (!at_end() && text_[pos_] == '.') {
      is_integer_literal = false;
      ++pos_;
      if (at_end() || text_[pos_] < '0' || text_[pos_] > '9') fail("expected a digit after '.'");
      while (!at_end() && text_[pos_] >= '0' && text_[pos_] <= '9') ++pos_;
    }
    if (!at_end() && (text_[pos_] == 'e' || text_[pos_] == 'E')) {
      is_integer_literal = false;
      ++pos_;
      if (!at_end() && (text_[pos_] == '+' || text_[pos_] == '-')) ++pos_;
      if (at_end() || text_[pos_] < '0' || text_[pos_] > '9') fail("expected a digit in the exponent");
      while (!at_end() && text_[pos_] >= '0' && text_[pos_] <= '9') ++pos_;
    }
    const char* first = text_.data() + start;
    const char* last = text_.data() + pos_;
    Json value;
    value.type_ = Json::Type::Number;
    if (is_integer_literal) {
      int64_t i = 0;
      auto r = std::from_chars(first, last, i);
      if (r.ec == std::errc() && r.ptr == last) {
        value.exact_integer_ = true;
        value.int_ = i;
        value.number_ = static_cast<double>(i);
        return value;
      }
    }
    double d = 0;
    auto r = std::from_chars(first, last, d);
    if (r.ec == std::errc::result_out_of_range) {
      // Overflow to infinity or underflow to zero, as other JSON readers do.
      d = (*first == '-') ? -HUGE_VAL : HUGE_VAL;
      bool tiny = false;
      for (const char* p = first; p < last; ++p)
        if (*p == 'e' || *p == 'E') tiny = p[1] == '-';
      if (tiny) d = (*first == '-') ? -0.0 : 0.0;
    } else if (r.ec != std::errc() || r.ptr != last) {
      pos_ = start;
      fail("invalid number");
    }
    value.number_ = d;
    return value;
  }

  std::string_view text_;
  size_t pos_ = 0;
};

Json Json::parse(std::string_view text) { return JsonParser(text).parse_document(); }

const char* Json::type_name(Type type) {
  switch (type) {
    case Type::Null: return "null";
    case Type::Bool: return "boolean";
    case Type::Number: return "number";
    case Type::String: return "string";
    case Type::Array: return "array";
    case Type::Object: return "object";
  }
  return "?";
}

namespace {
[[noreturn]] void type_mismatch(const char* wanted, Json::Type got) {
  throw JsonError(std::string("expected ") + wanted + ", got " + Json::type_name(got));
}
}  // namespace

bool Json::is_integer() const {
  if (type_ != Type::Number) return false;
  if (exact_integer_) return true;
  // 2^63 is exactly representable; anything at or past it does not fit int64.
  return std::isfinite(number_) && number_ == std::floor(number_) && number_ >= -9223372036854775808.0 &&
         number_ < 9223372036854775808.0;
}

bool Json::as_bool() const {
  if (type_ != Type::Bool) type_mismatch("a boolean", type_);
  return bool_;
}

double Json::as_number() const {
  if (type_ != Type::Number) type_mismatch("a number", type_);
  return number_;
}

int64_t Json::as_int64() const {
  if (type_ != Type::Number) type_mismatch("an integer", type_);
  if (exact_integer_) return int_;
  if (!is_integer()) throw JsonError("expected an integer, got " + std::to_string(number_));
  return static_cast<int64_t>(number_);
}

const std::string& Json::as_string() const {
  if (type_ != Type::String) type_mismatch("a string", type_);
  return string_;
}

size_t Json::size() const {
  if (type_ != Type::Array && type_ != Type::Object) type_mismatch("an array or object", type_);
  return items_.size();
}

const Json& Json::operator[](size_t index) const {
  if (type_ != Type::Array) type_mismatch("an array", type_);
  if (index >= items_.size())
    throw JsonError("index " + std::to_string(index) + " out of range (size " + std::to_string(items_.size()) + ")");
  return items_[index];
}

const std::vector<Json>& Json::items() const {
  if (type_ != Type::Array && type_ != Type::Object) type_mismatch("an array or object", type_);
  return items_;
}

const std::vector<std::string>& Json::keys() const {
  if (type_ != Type::Object) type_mismatch("an object", type_);
  return keys_;
}

const Json* Json::find(std::string_view key) const {
  if (type_ != Type::Object) type_mismatch("an object", type_);
  for (size_t i = 0; i < keys_.size(); ++i)
    if (keys_[i] == key) return &items_[i];
  return nullptr;
}

}  // namespace vdiff
