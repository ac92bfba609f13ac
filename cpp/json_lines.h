// JSON lines for sparseadapter_serve: a strict JSON parser and writer (RFC 8259: no comments, no
// trailing commas, no NaN, UTF-8 only), and a line reader over a file descriptor that can tell
// whether another line is already waiting without blocking.
#pragma once

#include <poll.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
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

// What parsing may hold in memory, and what it did: the parser charges every allocation it makes
// (strings, vectors with their growth slack, and allocator overhead, estimated from above) and fails
// once the charge passes max_bytes, before allocating much more. So the memory a line can cost is
// bounded by max_bytes, not by its length times the up to ~20x that a generic tree of tiny values
// ("[1],[1],...") would take.
struct Budget {
  size_t max_bytes = SIZE_MAX;
  size_t used = 0;
};

class Parser {
 public:
  Parser(std::string_view text, int max_depth, Budget* budget = nullptr)
      : s_(text), max_depth_(max_depth), budget_(budget) {}

  // The text must hold exactly one value, with optional whitespace around it.
  Value document() {
    Value v = value(0);
    skip_space();
    if (pos_ != s_.size()) {
      fail("unexpected " + describe() + " after the JSON value");
    }
    return v;
  }

 private:
  static constexpr size_t kAllocation = 32;  // an allocation's overhead (malloc header, rounding)

  void charge(size_t bytes) {
    if (budget_ == nullptr) {
      return;
    }
    budget_->used += bytes;
    if (budget_->used > budget_->max_bytes) {
      throw ParseError(
          "the request would take more than " + std::to_string(budget_->max_bytes >> 20) +
          " MiB of memory once parsed (at column " + std::to_string(pos_ + 1) +
          "); send fewer or smaller values per line");
    }
  }

  // Columns count bytes from 1, as editors do for ASCII.
  [[noreturn]] void fail(const std::string& what) const {
    throw ParseError("invalid JSON at column " + std::to_string(pos_ + 1) + ": " + what);
  }

  // The character at pos_, printable in an error message whatever it is.
  std::string describe() const {
    if (pos_ >= s_.size()) {
      return "end of line";
    }
    const auto c = static_cast<unsigned char>(s_[pos_]);
    if (c >= 0x20 && c < 0x7f) {
      return std::string("'") + static_cast<char>(c) + "'";
    }
    char hex[16];
    std::snprintf(hex, sizeof hex, "byte 0x%02x", c);
    return hex;
  }

  bool at(char c) const { return pos_ < s_.size() && s_[pos_] == c; }
  bool at_digit() const { return pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9'; }

  void skip_space() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) {
      ++pos_;
    }
  }

  void expect(char c) {
    skip_space();
    if (!at(c)) {
      fail(std::string("expected '") + c + "', found " + describe());
    }
    ++pos_;
  }

  Value value(int depth) {
    skip_space();
    if (pos_ >= s_.size()) {
      fail("expected a value, found end of line");
    }
    Value v;
    switch (s_[pos_]) {
      case '{': v.data = object(depth + 1); return v;
      case '[': return array(depth + 1);
      case '"':
        v.data = string();
        charge(std::get<std::string>(v.data).size() + kAllocation);
        return v;
      case 't':
        literal("true");
        v.data.emplace<bool>(true);
        return v;
      case 'f':
        literal("false");
        v.data.emplace<bool>(false);
        return v;
      case 'n': literal("null"); return v;
      default:
        if (at('-') || at_digit()) {
          return number();
        }
        fail("expected a value, found " + describe());
    }
  }

  void check_depth(int depth) const {
    if (depth > max_depth_) {
      fail("nested deeper than " + std::to_string(max_depth_) + " levels");
    }
  }

  Object object(int depth) {
    check_depth(depth);
    ++pos_;  // '{'
    Object members;
    skip_space();
    if (at('}')) {
      ++pos_;
      return members;
    }
    std::unordered_set<std::string> keys;  // a set: a long line may hold many keys
    for (;;) {
      skip_space();
      if (!at('"')) {
        fail("expected a string key, found " + describe());
      }
      const size_t key_pos = pos_;
      std::string key = string();
      // the member (vector slot, twice for growth), its key, and the key's copy in the set
      charge(2 * sizeof(Object::value_type) + 2 * (key.size() + kAllocation) + kAllocation);
      if (!keys.insert(key).second) {
        pos_ = key_pos;
        fail("duplicate key \"" + key + "\"");
      }
      expect(':');
      members.emplace_back(std::move(key), value(depth));
      skip_space();
      if (at('}')) {
        ++pos_;
        return members;
      }
      if (!at(',')) {
        fail("expected ',' or '}', found " + describe());
      }
      ++pos_;
    }
  }

  // An IntArray while every item is an integer, an Array from the first item that is not.
  Value array(int depth) {
    check_depth(depth);
    ++pos_;  // '['
    charge(kAllocation);
    Value result;
    skip_space();
    if (at(']')) {
      ++pos_;
      result.data = Array();
      return result;
    }
    IntArray ints;
    Array items;
    bool generic = false;
    for (;;) {
      skip_space();
      Value item = !generic && (at('-') || at_digit()) ? number() : value(depth);
      const auto* integer = item.get<int64_t>();
      if (!generic && integer != nullptr) {
        charge(2 * sizeof(int64_t));  // twice: the vector's growth slack
        ints.push_back(*integer);
      } else {
        if (!generic) {  // the integers so far become Values
          generic = true;
          charge((ints.size() + 1) * 2 * sizeof(Value));
          items.reserve(ints.size() + 1);
          for (const int64_t i : ints) {
            items.emplace_back().data = i;
          }
          IntArray().swap(ints);
        } else {
          charge(2 * sizeof(Value));
        }
        items.push_back(std::move(item));
      }
      skip_space();
      if (at(']')) {
        ++pos_;
        if (generic) {
          result.data = std::move(items);
        } else {
          result.data = std::move(ints);
        }
        return result;
      }
      if (!at(',')) {
        fail("expected ',' or ']', found " + describe());
      }
      ++pos_;
    }
  }

  void literal(std::string_view word) {
    if (s_.substr(pos_, word.size()) != word) {
      fail("expected a value, found " + describe());
    }
    pos_ += word.size();
  }

  Value number() {
    const size_t start = pos_;
    if (at('-')) {
      ++pos_;
    }
    if (at('0')) {
      ++pos_;  // no leading zeros: "01" stops after the 0
    } else if (at_digit()) {
      while (at_digit()) ++pos_;
    } else {
      fail("expected a digit after '-', found " + describe());
    }
    bool integral = true;
    if (at('.')) {
      ++pos_;
      integral = false;
      if (!at_digit()) fail("expected a digit after the decimal point, found " + describe());
      while (at_digit()) ++pos_;
    }
    if (at('e') || at('E')) {
      ++pos_;
      integral = false;
      if (at('+') || at('-')) ++pos_;
      if (!at_digit()) fail("expected a digit in the exponent, found " + describe());
      while (at_digit()) ++pos_;
    }
    const char* first = s_.data() + start;
    const char* last = s_.data() + pos_;
    Value v;
    if (integral) {
      int64_t integer = 0;
      if (std::from_chars(first, last, integer).ec != std::errc()) {
        pos_ = start;
        fail("integer " + std::string(first, last) + " is out of the 64-bit range");
      }
      v.data = integer;
    } else {
      double number = 0;
      if (std::from_chars(first, last, number).ec != std::errc()) {
        pos_ = start;
        fail("number " + std::string(first, last) + " is out of the double range");
      }
      v.data = number;
    }
    return v;
  }

  std::string string() {
    ++pos_;  // opening quote
    std::string out;
    for (;;) {
      if (pos_ >= s_.size()) {
        fail("unterminated string");
      }
      const auto c = static_cast<unsigned char>(s_[pos_]);
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (c < 0x20) {
        fail("unescaped control character (" + describe() + ") in a string");
      }
      if (c == '\\') {
        escape(out);
      } else if (c < 0x80) {
        out += static_cast<char>(c);
        ++pos_;
      } else {
        utf8_sequence(out);
      }
    }
  }

  void escape(std::string& out) {
    ++pos_;  // backslash
    const char e = pos_ < s_.size() ? s_[pos_] : '\0';
    const char* simple = nullptr;
    switch (e) {
      case '"': simple = "\""; break;
      case '\\': simple = "\\"; break;
      case '/': simple = "/"; break;
      case 'b': simple = "\b"; break;
      case 'f': simple = "\f"; break;
      case 'n': simple = "\n"; break;
      case 'r': simple = "\r"; break;
      case 't': simple = "\t"; break;
      case 'u': break;
      default: fail("invalid escape: " + describe() + " after a backslash");
    }
    ++pos_;
    if (simple != nullptr) {
      out += simple;
      return;
    }
    uint32_t code = hex4();
    if (code >= 0xDC00 && code <= 0xDFFF) {
      pos_ -= 6;
      fail("lone low surrogate in \\u escape");
    }
    if (code >= 0xD800 && code <= 0xDBFF) {  // UTF-16 pair: a low surrogate escape must follow
      if (s_.substr(pos_, 2) != "\\u") {
        pos_ -= 6;
        fail("high surrogate \\u escape without its low surrogate");
      }
      pos_ += 2;
      const uint32_t low = hex4();
      if (low < 0xDC00 || low > 0xDFFF) {
        pos_ -= 6;
        fail("high surrogate \\u escape followed by a non-low surrogate");
      }
      code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
    }
    append_utf8(out, code);
  }

  uint32_t hex4() {
    uint32_t code = 0;
    for (int i = 0; i < 4; ++i, ++pos_) {
      const char c = pos_ < s_.size() ? s_[pos_] : '\0';
      int digit;
      if (c >= '0' && c <= '9')
        digit = c - '0';
      else if (c >= 'a' && c <= 'f')
        digit = c - 'a' + 10;
      else if (c >= 'A' && c <= 'F')
        digit = c - 'A' + 10;
      else
        fail("expected 4 hex digits after \\u, found " + describe());
      code = code * 16 + static_cast<uint32_t>(digit);
    }
    return code;
  }

  static void append_utf8(std::string& out, uint32_t code) {
    if (code < 0x80) {
      out += static_cast<char>(code);
    } else if (code < 0x800) {
      out += static_cast<char>(0xC0 | (code >> 6));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else if (code < 0x10000) {
      out += static_cast<char>(0xE0 | (code >> 12));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (code >> 18));
      out += static_cast<char>(0x80 | ((code >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    }
  }

  // One well-formed UTF-8 sequence (no overlongs, no surrogates, at most U+10FFFF), copied as is:
  // the writer passes strings through, so its output stays valid UTF-8.
  void utf8_sequence(std::string& out) {
    const auto lead = static_cast<unsigned char>(s_[pos_]);
    size_t continuation;
    unsigned char low = 0x80, high = 0xBF;  // the allowed range of the first continuation byte
    if (lead >= 0xC2 && lead <= 0xDF) {
      continuation = 1;
    } else if (lead >= 0xE0 && lead <= 0xEF) {
      continuation = 2;
      if (lead == 0xE0) low = 0xA0;
      if (lead == 0xED) high = 0x9F;
    } else if (lead >= 0xF0 && lead <= 0xF4) {
      continuation = 3;
      if (lead == 0xF0) low = 0x90;
      if (lead == 0xF4) high = 0x8F;
    } else {
      fail("invalid UTF-8 (" + describe() + ") in a string");
    }
    for (size_t i = 1; i <= continuation; ++i) {
      const auto b = pos_ + i < s_.size() ? static_cast<unsigned char>(s_[pos_ + i]) : 0;
      if (b < (i == 1 ? low : 0x80) || b > (i == 1 ? high : 0xBF)) {
        fail("invalid UTF-8 sequence in a string");
      }
    }
    out.append(s_.substr(pos_, continuation + 1));
    pos_ += continuation + 1;
  }

  std::string_view s_;
  int max_depth_;
  Budget* budget_;
  size_t pos_ = 0;
};

// budget (may be null: no limit) says how many bytes the parse may hold, and gets what it took.
inline Value parse(std::string_view text, int max_depth, Budget* budget = nullptr) {
  return Parser(text, max_depth, budget).document();
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

// Lines from a file descriptor through our own buffer, so that "is another line waiting?" can be
// answered without blocking: a complete line already buffered, or poll() with a zero timeout.
// A line longer than max_line bytes is dropped as it streams in, never held whole.
class LineReader {
 public:
  enum class Got { Line, TooLong, NotReady, End };

  LineReader(int fd, size_t max_line) : fd_(fd), max_line_(max_line) {}

  // The next line, without its '\n'. With wait false, NotReady when no whole line is buffered and
  // nothing more is waiting to be read. A last line without '\n' counts as a line.
  Got next(std::string& line, bool wait) {
    for (;;) {
      const size_t newline = buf_.find('\n', scanned_);
      if (newline != std::string::npos) {
        const bool too_long = skipping_ || newline - start_ > max_line_;
        if (!too_long) {
          line.assign(buf_, start_, newline - start_);
        }
        skipping_ = false;
        start_ = scanned_ = newline + 1;
        return too_long ? Got::TooLong : Got::Line;
      }
      scanned_ = buf_.size();
      if (skipping_ || buf_.size() - start_ > max_line_) {
        skipping_ = true;  // drop what we have of the line; its end is all we still look for
        buf_.clear();
        start_ = scanned_ = 0;
      }
      if (ended_) {
        if (skipping_) {
          skipping_ = false;
          return Got::TooLong;
        }
        if (start_ < buf_.size()) {
          line.assign(buf_, start_, std::string::npos);
          buf_.clear();
          start_ = scanned_ = 0;
          return Got::Line;
        }
        return Got::End;
      }
      if (!wait && !readable()) {
        return Got::NotReady;
      }
      fill();
    }
  }

 private:
  bool readable() const {
    pollfd p{fd_, POLLIN, 0};
    int n;
    do {
      n = ::poll(&p, 1, 0);
    } while (n < 0 && errno == EINTR);
    return n > 0;  // POLLIN, or POLLHUP/POLLERR, for which read() returns at once too
  }

  void fill() {
    if (start_ > 0 && start_ * 2 >= buf_.size()) {  // drop consumed lines before growing
      buf_.erase(0, start_);
      scanned_ -= start_;
      start_ = 0;
    }
    const size_t old_size = buf_.size();
    buf_.resize(old_size + kChunk);
    ssize_t n;
    do {
      n = ::read(fd_, &buf_[old_size], kChunk);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
      const int err = errno;
      buf_.resize(old_size);
      throw std::runtime_error(std::string("reading the input failed: ") + std::strerror(err));
    }
    buf_.resize(old_size + static_cast<size_t>(n));
    ended_ = n == 0;
  }

  static constexpr size_t kChunk = 64 * 1024;
  int fd_;
  size_t max_line_;
  std::string buf_;
  size_t start_ = 0;    // where the current line begins in buf_
  size_t scanned_ = 0;  // buf_ holds no '\n' between start_ and here
  bool skipping_ = false;
  bool ended_ = false;
};

// Writes all of text to fd, or throws.
inline void write_all(int fd, std::string_view text) {
  while (!text.empty()) {
    const ssize_t n = ::write(fd, text.data(), text.size());
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n < 0) {
      throw std::runtime_error(std::string("writing the output failed: ") + std::strerror(errno));
    }
    text.remove_prefix(static_cast<size_t>(n));
  }
}

}  // namespace jsonl
