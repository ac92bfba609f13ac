// Lines from a file descriptor for sparseadapter_serve, through our own buffer, so that "is another
// line waiting?" can be answered without blocking; and a write that takes all of a text or throws.
#pragma once

#include <poll.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>
#include <string_view>

namespace jsonl {

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
