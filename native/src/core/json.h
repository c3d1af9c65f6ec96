// A small JSON reader for config.json, safetensors headers and index files. Parses the whole text into
// an immutable tree; errors carry the byte offset where parsing stopped.
#pragma once
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace vdiff {

// A parse error (with the byte offset) or a type mismatch when reading a value.
class JsonError : public std::runtime_error {
 public:
  JsonError(const std::string& message, size_t offset = npos) : std::runtime_error(message), offset_(offset) {}
  static constexpr size_t npos = static_cast<size_t>(-1);
  size_t offset() const { return offset_; }  // npos for type mismatches

 private:
  size_t offset_;
};

class Json {
 public:
  enum class Type { Null, Bool, Number, String, Array, Object };

  // Parses one JSON value; only whitespace may follow it. Strings must be valid UTF-8 after unescaping
  // (lone surrogates in \u escapes are rejected). Nesting deeper than 512 levels is rejected.
  static Json parse(std::string_view text);
  static const char* type_name(Type type);

  Json() = default;  // null

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::Null; }
  bool is_bool() const { return type_ == Type::Bool; }
  bool is_number() const { return type_ == Type::Number; }
  bool is_string() const { return type_ == Type::String; }
  bool is_array() const { return type_ == Type::Array; }
  bool is_object() const { return type_ == Type::Object; }
  // A number with an integral value that fits int64 (1, -3, 2.0, 1e3; not 1.5, not 1e30).
  bool is_integer() const;

  // Typed reads; throw JsonError when the value has another type.
  bool as_bool() const;
  double as_number() const;
  int64_t as_int64() const;  // also throws when !is_integer()
  const std::string& as_string() const;

  // Arrays: elements. Objects: values, in the order of keys().
  size_t size() const;  // elements or members; throws for scalars
  const Json& operator[](size_t index) const;
  const std::vector<Json>& items() const;
  const std::vector<std::string>& keys() const;  // objects only; keys are unique

  // Objects only: the member named `key`, or nullptr.
  const Json* find(std::string_view key) const;

 private:
  friend class JsonParser;
  Type type_ = Type::Null;
  bool bool_ = false;
  bool exact_integer_ = false;  // number parsed from an integer literal that fits int64 exactly
  int64_t int_ = 0;
  double number_ = 0.0;
  std::string string_;
  std::vector<std::string> keys_;
  std::vector<Json> items_;
};

}  // namespace vdiff
