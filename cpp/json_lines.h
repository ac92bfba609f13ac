// The JSON of sparseadapter_serve's request lines: nlohmann/json reads them (strict RFC 8259: no
// comments, no trailing commas, no NaN, UTF-8 only) through a SAX handler that builds a compact Value
// (token-id arrays as int64 vectors) under a memory budget, a depth limit and unique keys; its errors
// are told as "invalid JSON at column N: what was expected, and found". The writer turns Values back
// into JSON (an echoed id) and writes the answers' strings and numbers.
#pragma once

#include <nlohmann/json.hpp>

#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_set>
#include <utility>
#include <variant>
#include <vector>

namespace jsonl {

struct Value;
using Array = std::vector<Value>;
using Object = std::vector<std::pair<std::string, Value>>;  // in input order, keys unique
// An array whose items are all integers, held as 8 bytes each, not a 40-byte Value each: token ids
// are most of what a request holds.
using IntArray = std::vector<int64_t>;

// A variant (40 bytes), as a 16 MiB request line may hold millions of values.
struct Value {
  // Numbers without fraction or exponent are int64_t, the others double. A non-empty array of
  // integers only is an IntArray, any other array (and []) an Array.
  std::variant<std::nullptr_t, bool, int64_t, double, std::string, Array, Object, IntArray> data;

  template <class T>
  const T* get() const {
    return std::get_if<T>(&data);
  }
  bool is_null() const { return std::holds_alternative<std::nullptr_t>(data); }

  // The member named key, or null when there is none (or this is no object).
  const Value* find(std::string_view key) const {
    if (const auto* object = get<Object>()) {
      for (const auto& member : *object) {
        if (member.first == key) {
          return &member.second;
        }
      }
    }
    return nullptr;
  }
};

struct ParseError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// What parsing may hold in memory, and what it did: the builder charges every allocation it makes
// (strings, vectors with their growth slack, and allocator overhead, estimated from above) and fails
// once the charge passes max_bytes, before allocating much more. So the memory a line can cost is
// bounded by max_bytes, not by its length times the up to ~20x that a generic tree of tiny values
// ("[1],[1],...") would take.
struct Budget {
  size_t max_bytes = SIZE_MAX;
  size_t used = 0;
};

namespace detail {

// The byte at pos, printable in an error message whatever it is.
inline std::string describe(std::string_view s, size_t pos) {
  if (pos >= s.size()) {
    return "end of line";
  }
  const auto c = static_cast<unsigned char>(s[pos]);
  if (c >= 0x20 && c < 0x7f) {
    return std::string("'") + static_cast<char>(c) + "'";
  }
  char hex[16];
  std::snprintf(hex, sizeof hex, "byte 0x%02x", c);
  return hex;
}

// Where the token that ends just before `end` begins: nlohmann reports a misplaced number or string
// after reading it whole, and the message names its first character.
inline size_t token_start(std::string_view s, size_t end) {
  if (end == 0 || end > s.size()) {
    return end;
  }
  size_t pos = end - 1;
  if (s[pos] == '"') {  // a string: back to its opening quote (one not escaped)
    while (pos > 0) {
      --pos;
      size_t backslashes = 0;
      while (pos >= backslashes + 1 && s[pos - backslashes - 1] == '\\') ++backslashes;
      if (s[pos] == '"' && backslashes % 2 == 0) {
        return pos;
      }
    }
    return pos;
  }
  auto in_number = [](char c) {
    return (c >= '0' && c <= '9') || c == '-' || c == '+' || c == '.' || c == 'e' || c == 'E';
  };
  if (!in_number(s[pos])) {
    return pos;
  }
  while (pos > 0 && in_number(s[pos - 1])) --pos;
  // "01" is two tokens: a number cannot go on after a leading zero
  const size_t digits = s[pos] == '-' ? pos + 1 : pos;
  if (digits + 1 < end && s[digits] == '0' && s[digits + 1] >= '0' && s[digits + 1] <= '9') {
    return digits + 1;
  }
  return pos;
}

// The first letter of the word that the byte at `at` ends: nlohmann reports an invalid literal
// ("tru ", "NaN") at the byte where it stopped being one.
inline size_t word_start(std::string_view s, size_t at) {
  auto letter = [](char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); };
  while (at > 0 && at <= s.size() && letter(s[at - 1])) --at;
  return at;
}

// nlohmann's parse error (its message and the count of bytes it read) told our way.
inline std::string explain(std::string_view s, size_t read, const std::string& message) {
  const size_t at = read > 0 ? read - 1 : 0;  // the byte nlohmann stopped at
  auto has = [&](const char* text) { return message.find(text) != std::string::npos; };
  auto located = [](size_t pos, const std::string& what) {
    return "invalid JSON at column " + std::to_string(pos + 1) + ": " + what;
  };
  const bool at_end = has("unexpected end of input") || has("missing closing quote") || at >= s.size();
  if (has("missing closing quote")) return located(s.size(), "unterminated string");
  if (has("control character")) return located(at, "unescaped control character (" + describe(s, at) + ") in a string");
  if (has("forbidden character after backslash")) {
    return located(at, "invalid escape: " + describe(s, at) + " after a backslash");
  }
  if (has("must be followed by 4 hex digits"))
    return located(at, "expected 4 hex digits after \\u, found " + describe(s, at));
  if (has("must be followed by U+DC00")) return located(at, "high surrogate \\u escape without its low surrogate");
  if (has("must follow U+D800")) return located(at, "lone low surrogate in \\u escape");
  if (has("ill-formed UTF-8")) {
    // a byte that begins no sequence, or one that breaks the sequence its predecessors began
    const bool inside = at > 0 && static_cast<unsigned char>(s[at - 1]) >= 0x80;
    return located(
        at, inside ? "invalid UTF-8 sequence in a string" : "invalid UTF-8 (" + describe(s, at) + ") in a string");
  }
  if (has("expected digit after '-'")) return located(at, "expected a digit after '-', found " + describe(s, at));
  if (has("expected digit after '.'")) {
    return located(at, "expected a digit after the decimal point, found " + describe(s, at));
  }
  if (has("after exponent")) return located(at, "expected a digit in the exponent, found " + describe(s, at));
  const size_t start = at_end ? s.size() : has("invalid literal") ? word_start(s, at) : token_start(s, read);
  if (has("; expected end of input"))
    return located(start, "unexpected " + describe(s, start) + " after the JSON value");
  if (has("empty input")) return located(0, "expected a value, found end of line");
  // a token where another was expected: "while parsing <context> - unexpected <token>; expected <what>"
  const std::string found = describe(s, start);
  if (has("number overflow")) {
    const size_t first = token_start(s, read);
    return located(first, "number " + std::string(s.substr(first, read - first)) + " is out of the double range");
  }
  if (has("; expected string literal")) return located(start, "expected a string key, found " + found);
  if (has("; expected ':'")) return located(start, "expected ':', found " + found);
  if (has("parsing object - ")) return located(start, "expected ',' or '}', found " + found);
  if (has("parsing array - ")) return located(start, "expected ',' or ']', found " + found);
  return located(start, "expected a value, found " + found);
}

// nlohmann's SAX interface, building a Value.
class Builder {
 public:
  using number_integer_t = int64_t;
  using number_unsigned_t = uint64_t;
  using number_float_t = double;
  using string_t = std::string;
  using binary_t = nlohmann::json::binary_t;

  Builder(std::string_view text, int max_depth, Budget* budget) : s_(text), max_depth_(max_depth), budget_(budget) {}

  Value take() { return std::move(root_); }

  bool null() { return put(Value{}); }
  bool boolean(bool b) {
    Value v;
    v.data.emplace<bool>(b);
    return put(std::move(v));
  }
  bool number_integer(int64_t i) { return put_int(i); }
  bool number_unsigned(uint64_t u) {
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      fail("integer " + std::to_string(u) + " is out of the 64-bit range");
    }
    return put_int(static_cast<int64_t>(u));
  }
  bool number_float(double d, const std::string& text) {
    if (text.find_first_of(".eE") == std::string::npos) {  // integral, past even uint64
      fail("integer " + text + " is out of the 64-bit range");
    }
    if (!std::isfinite(d)) {
      fail("number " + text + " is out of the double range");
    }
    Value v;
    v.data = d;
    return put(std::move(v));
  }
  bool string(std::string& s) {
    charge(s.size() + kAllocation);
    Value v;
    v.data = std::move(s);
    return put(std::move(v));
  }
  bool binary(binary_t&) { return false; }  // JSON text has none

  bool start_object(size_t) {
    open();
    stack_.back().value.data = Object();
    return true;
  }
  bool key(std::string& k) {
    Frame& f = stack_.back();
    // the member (vector slot, twice for growth), its key, and the key's copy in the set
    charge(2 * sizeof(Object::value_type) + 2 * (k.size() + kAllocation) + kAllocation);
    if (!f.keys.insert(k).second) {
      fail("duplicate key \"" + k + "\"");
    }
    f.key = std::move(k);
    return true;
  }
  bool end_object() { return close(); }

  bool start_array(size_t) {
    open();
    charge(kAllocation);
    stack_.back().value.data = Array();
    stack_.back().array = true;
    return true;
  }
  bool end_array() {
    Frame& f = stack_.back();
    if (!f.generic && !f.ints.empty()) {
      f.value.data = std::move(f.ints);
    }
    return close();
  }

  bool parse_error(size_t position, const std::string&, const nlohmann::detail::exception& e) {
    throw ParseError(explain(s_, position, e.what()));
  }

 private:
  static constexpr size_t kAllocation = 32;  // an allocation's overhead (malloc header, rounding)

  struct Frame {
    Value value;  // an Object, or an Array while not all integers
    bool array = false;
    bool generic = false;  // an array holding something else than integers
    IntArray ints;
    std::string key;
    std::unordered_set<std::string> keys;  // a set: a long line may hold many keys
  };

  [[noreturn]] static void fail(const std::string& what) { throw ParseError("invalid JSON: " + what); }

  void charge(size_t bytes) {
    if (budget_ == nullptr) {
      return;
    }
    budget_->used += bytes;
    if (budget_->used > budget_->max_bytes) {
      throw ParseError(
          "the request would take more than " + std::to_string(budget_->max_bytes >> 20) +
          " MiB of memory once parsed; send fewer or smaller values per line");
    }
  }

  void open() {
    if (static_cast<int>(stack_.size()) >= max_depth_) {
      fail("nested deeper than " + std::to_string(max_depth_) + " levels");
    }
    stack_.emplace_back();
  }

  bool close() {
    Value v = std::move(stack_.back().value);
    stack_.pop_back();
    return put(std::move(v));
  }

  bool put_int(int64_t i) {
    if (!stack_.empty() && stack_.back().array && !stack_.back().generic) {
      charge(2 * sizeof(int64_t));  // twice: the vector's growth slack
      stack_.back().ints.push_back(i);
      return true;
    }
    Value v;
    v.data = i;
    return put(std::move(v));
  }

  bool put(Value v) {
    if (stack_.empty()) {
      root_ = std::move(v);
      return true;
    }
    Frame& f = stack_.back();
    if (!f.array) {
      std::get<Object>(f.value.data).emplace_back(std::move(f.key), std::move(v));
      return true;
    }
    auto& items = std::get<Array>(f.value.data);
    if (!f.generic) {  // the integers so far become Values
      f.generic = true;
      charge((f.ints.size() + 1) * 2 * sizeof(Value));
      items.reserve(f.ints.size() + 1);
      for (const int64_t i : f.ints) {
        items.emplace_back().data = i;
      }
      IntArray().swap(f.ints);
    } else {
      charge(2 * sizeof(Value));
    }
    items.push_back(std::move(v));
    return true;
  }

  std::string_view s_;
  int max_depth_;
  Budget* budget_;
  std::vector<Frame> stack_;
  Value root_;
};

}  // namespace detail

// The one JSON value text holds (whitespace around it allowed). budget (may be null: no limit) says
// how many bytes the parse may hold, and gets what it took. ParseError says what is wrong.
inline Value parse(std::string_view text, int max_depth, Budget* budget = nullptr) {
  detail::Builder builder(text, max_depth, budget);
  nlohmann::json::sax_parse(text.begin(), text.end(), &builder);
  return builder.take();
}

inline void write_string(std::string& out, std::string_view s) {
  out += '"';
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char esc[8];
          std::snprintf(esc, sizeof esc, "\\u%04x", c);
          out += esc;
        } else {
          out += ch;
        }
    }
  }
  out += '"';
}

// Shortest text that reads back as the same double, kept a float ("1.0", not "1").
inline void write_double(std::string& out, double d) {
  char buf[64];
  const auto end = std::to_chars(buf, buf + sizeof buf, d).ptr;
  const std::string_view text(buf, static_cast<size_t>(end - buf));
  out += text;
  if (text.find_first_of(".e") == std::string_view::npos) {
    out += ".0";
  }
}

inline void write(std::string& out, const Value& v) {
  if (v.is_null()) {
    out += "null";
  } else if (const auto* boolean = v.get<bool>()) {
    out += *boolean ? "true" : "false";
  } else if (const auto* integer = v.get<int64_t>()) {
    out += std::to_string(*integer);
  } else if (const auto* number = v.get<double>()) {
    write_double(out, *number);
  } else if (const auto* string = v.get<std::string>()) {
    write_string(out, *string);
  } else if (const auto* array = v.get<Array>()) {
    out += '[';
    for (size_t i = 0; i < array->size(); ++i) {
      if (i > 0) out += ',';
      write(out, (*array)[i]);
    }
    out += ']';
  } else if (const auto* ints = v.get<IntArray>()) {
    out += '[';
    for (size_t i = 0; i < ints->size(); ++i) {
      if (i > 0) out += ',';
      out += std::to_string((*ints)[i]);
    }
    out += ']';
  } else if (const auto* object = v.get<Object>()) {
    out += '{';
    for (size_t i = 0; i < object->size(); ++i) {
      if (i > 0) out += ',';
      write_string(out, (*object)[i].first);
      out += ':';
      write(out, (*object)[i].second);
    }
    out += '}';
  }
}

}  // namespace jsonl
