// Reading a safetensors file (an adapter folder's tensor file) without Python: an 8-byte
// little-endian header length, a JSON header naming each tensor's dtype, shape and data_offsets
// (begin and end in the data section that follows), then the raw little-endian data. Everything is
// checked before a tensor is made: a truncated or inconsistent file is an error naming the file and
// the tensor, never a short read or a tensor made of the wrong bytes.
#pragma once

#include <torch/script.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace safetensors {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

constexpr uint64_t kMaxHeaderBytes = 100 << 20;  // the format's own limit

inline std::pair<torch::ScalarType, size_t> dtype_of(const std::string& name) {
  static const std::map<std::string, std::pair<torch::ScalarType, size_t>> kTypes = {
      {"F64", {torch::kFloat64, 8}},   {"F32", {torch::kFloat32, 4}}, {"F16", {torch::kFloat16, 2}},
      {"BF16", {torch::kBFloat16, 2}}, {"I64", {torch::kInt64, 8}},   {"I32", {torch::kInt32, 4}},
      {"I16", {torch::kInt16, 2}},     {"I8", {torch::kInt8, 1}},     {"U8", {torch::kUInt8, 1}},
      {"BOOL", {torch::kBool, 1}}};
  const auto it = kTypes.find(name);
  if (it == kTypes.end()) {
    throw Error("dtype \"" + name + "\" is not one this reader knows (F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL)");
  }
  return it->second;
}

// Every tensor of the file at path, by name, on the CPU. A file of more than max_bytes is refused
// unread (a larger file is not what the caller expects).
inline std::map<std::string, torch::Tensor> read(const std::string& path, uint64_t max_bytes) {
  const uint16_t probe = 1;
  if (*reinterpret_cast<const unsigned char*>(&probe) != 1) {
    throw Error(path + ": safetensors data is little-endian; this reader runs on little-endian hosts only");
  }
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) {
    throw Error(path + ": cannot open (missing or unreadable)");
  }
  const auto size = static_cast<uint64_t>(in.tellg());
  if (size > max_bytes) {
    throw Error(
        path + ": " + std::to_string(size) + " bytes, more than this adapter can hold (" + std::to_string(max_bytes) +
        "): not this adapter's tensors");
  }
  auto fail = [&](const std::string& what) -> Error { return Error(path + ": " + what); };
  if (size < 8) {
    throw fail("truncated: " + std::to_string(size) + " bytes, less than the 8-byte header length");
  }
  in.seekg(0);
  unsigned char length_bytes[8];
  in.read(reinterpret_cast<char*>(length_bytes), 8);
  uint64_t header_bytes = 0;
  for (int i = 7; i >= 0; --i) {
    header_bytes = (header_bytes << 8) | length_bytes[i];
  }
  if (header_bytes > kMaxHeaderBytes || header_bytes > size - 8) {
    throw fail(
        "truncated or not safetensors: the header length " + std::to_string(header_bytes) +
        " runs past the end of the " + std::to_string(size) + "-byte file");
  }
  std::string header_text(header_bytes, '\0');
  in.read(header_text.data(), static_cast<std::streamsize>(header_bytes));
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(header_text);
  } catch (const nlohmann::json::parse_error& e) {
    throw fail(std::string("the header is not valid JSON (corrupted?): ") + e.what());
  }
  if (!header.is_object()) {
    throw fail("the header is not a JSON object");
  }
  const uint64_t data_bytes = size - 8 - header_bytes;
  struct Entry {
    std::string name;
    torch::ScalarType dtype;
    std::vector<int64_t> shape;
    uint64_t begin, end;
  };
  std::vector<Entry> entries;
  for (const auto& [name, info] : header.items()) {
    if (name == "__metadata__") {
      if (!info.is_object()) {
        throw fail("__metadata__ is not an object of strings");
      }
      continue;
    }
    auto bad = [&](const std::string& what) -> Error { return fail("tensor " + name + ": " + what); };
    if (!info.is_object() || !info.contains("dtype") || !info.contains("shape") || !info.contains("data_offsets") ||
        info.size() != 3) {
      throw bad("its entry must hold exactly dtype, shape and data_offsets");
    }
    if (!info["dtype"].is_string()) {
      throw bad("dtype is not a string");
    }
    Entry e{name, torch::kFloat32, {}, 0, 0};
    size_t item = 0;
    try {
      std::tie(e.dtype, item) = dtype_of(info["dtype"].get<std::string>());
    } catch (const Error& err) {
      throw bad(err.what());
    }
    const auto& shape = info["shape"];
    const auto& offsets = info["data_offsets"];
    if (!shape.is_array()) {
      throw bad("shape is not a list");
    }
    uint64_t numel = 1;
    for (const auto& dim : shape) {
      if (!dim.is_number_unsigned() || dim.get<uint64_t>() > (uint64_t{1} << 40)) {
        throw bad("shape " + shape.dump() + " is not a list of sizes");
      }
      e.shape.push_back(static_cast<int64_t>(dim.get<uint64_t>()));
      numel *= dim.get<uint64_t>();
      if (numel > (uint64_t{1} << 40)) {
        throw bad("shape " + shape.dump() + " is too large");
      }
    }
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
        !offsets[1].is_number_unsigned() || offsets[0].get<uint64_t>() > offsets[1].get<uint64_t>()) {
      throw bad("data_offsets " + offsets.dump() + " is not [begin, end] with begin <= end");
    }
    e.begin = offsets[0].get<uint64_t>();
    e.end = offsets[1].get<uint64_t>();
    if (e.end - e.begin != numel * item) {
      throw bad(
          "shape " + shape.dump() + " of " + info["dtype"].get<std::string>() + " takes " +
          std::to_string(numel * item) + " bytes, its data_offsets " + offsets.dump() + " " +
          std::to_string(e.end - e.begin));
    }
    if (e.end > data_bytes) {
      throw bad(
          "its data (bytes " + std::to_string(e.begin) + " to " + std::to_string(e.end) +
          ") runs past the end of the file's " + std::to_string(data_bytes) + "-byte data section: truncated");
    }
    entries.push_back(std::move(e));
  }
  // The data section is the tensors' data, back to back: no overlap, no hole (as the format requires).
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) { return a.begin < b.begin; });
  uint64_t covered = 0;
  for (const auto& e : entries) {
    if (e.begin != covered) {
      throw fail(
          "tensor " + e.name + ": its data begins at byte " + std::to_string(e.begin) + " of the data section, " +
          (e.begin < covered ? "inside another tensor's" : "after a gap from " + std::to_string(covered)));
    }
    covered = e.end;
  }
  if (covered != data_bytes) {
    throw fail(
        "the data section has " + std::to_string(data_bytes) + " bytes, its tensors " + std::to_string(covered) +
        " (extra bytes at the end)");
  }
  std::map<std::string, torch::Tensor> tensors;
  const uint64_t data_start = 8 + header_bytes;
  for (const auto& e : entries) {
    auto t = torch::empty(e.shape, torch::TensorOptions().dtype(e.dtype));
    in.seekg(static_cast<std::streamoff>(data_start + e.begin));
    in.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(e.end - e.begin));
    if (!in) {
      throw fail("tensor " + e.name + ": reading its data failed (file changed while read?)");
    }
    tensors.emplace(e.name, std::move(t));
  }
  return tensors;
}

}  // namespace safetensors
