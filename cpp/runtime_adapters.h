// Adapters loaded at run time into a model exported with `sparseadapter export --runtime-adapters`
// (python/sparseadapter/serving/adapter_tables.py): the model holds, at every adapted site, a table
// of CSR adapters and, in place of its head, a table of linear heads; each has TorchScript methods
// add_adapter / remove_adapter / held_bytes. An adapter folder (what save_adapter writes:
// adapter_config.json and its safetensors file) is read and checked here as load_adapter checks it
// (format, kind, model type, sites, which tensors, their dtypes, sizes, and each CSR pattern through
// the validate_csr op: index ranges, sorted unique columns per row) before a table changes; a load
// that fails anywhere leaves every table as it was. The config's and the tensor file's SHA-256
// checksums are verified first (config_sha256 of the config's canonical JSON, weights_sha256).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/script.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <regex>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "safetensors.h"
#include "sha256.h"

namespace runtime_adapters {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

constexpr const char* kConfigFile = "adapter_config.json";
constexpr size_t kConfigLimit = 16 << 20;

// One site's table, as the export's metadata ("adapter_tables") describes it.
struct Table {
  std::string module;  // its path in the model
  std::string host;    // the adapted module: the adapter file names its tensors after it
  int64_t in_features = 0, out_features = 0;
};

// What adapters of one kind on one set of sites load into (an exported template adapter).
struct Layout {
  std::string kind;
  nlohmann::json sites;
  std::vector<size_t> tables;  // indices into Spec::tables
  std::string down, up;        // the adapter's two layers ("down", "up"; LoRA: "lora_A", "lora_B")
  bool bias = true;            // whether its layers carry biases
};

struct Spec {
  std::string model_type;
  std::vector<Layout> layouts;
  std::vector<Table> tables;
  std::string head_module, head_name;
};

inline std::string text_of(const nlohmann::json& doc, const char* key, const std::string& where) {
  if (!doc.contains(key) || !doc[key].is_string()) {
    throw Error(where + ": \"" + key + "\" must be a string");
  }
  return doc[key].get<std::string>();
}

inline const nlohmann::json& list_of(const nlohmann::json& doc, const char* key, const std::string& where) {
  if (!doc.contains(key) || !doc[key].is_array() || doc[key].empty()) {
    throw Error(where + ": \"" + key + "\" must be a non-empty list");
  }
  return doc[key];
}

// The metadata's "adapter_tables" (written by install_tables).
inline Spec parse_spec(const nlohmann::json& doc) {
  const std::string where = "\"adapter_tables\"";
  if (!doc.is_object()) {
    throw Error(where + " must be an object");
  }
  Spec spec;
  spec.model_type = text_of(doc, "model_type", where);
  for (const auto& t : list_of(doc, "tables", where)) {
    Table table;
    table.module = text_of(t, "module", where + ".tables");
    table.host = text_of(t, "host", where + ".tables");
    if (!t.contains("in_features") || !t["in_features"].is_number_unsigned() || !t.contains("out_features") ||
        !t["out_features"].is_number_unsigned()) {
      throw Error(where + ".tables: in_features and out_features must be sizes");
    }
    table.in_features = t["in_features"].get<int64_t>();
    table.out_features = t["out_features"].get<int64_t>();
    spec.tables.push_back(std::move(table));
  }
  for (const auto& l : list_of(doc, "layouts", where)) {
    const std::string at = where + ".layouts";
    Layout layout;
    layout.kind = text_of(l, "kind", at);
    layout.down = text_of(l, "down", at);
    layout.up = text_of(l, "up", at);
    if (!l.contains("sites") || !l["sites"].is_object() || !l.contains("bias") || !l["bias"].is_boolean()) {
      throw Error(at + ": \"sites\" must be an object and \"bias\" true or false");
    }
    layout.sites = l["sites"];
    layout.bias = l["bias"].get<bool>();
    for (const auto& i : list_of(l, "tables", at)) {
      if (!i.is_number_unsigned() || i.get<size_t>() >= spec.tables.size()) {
        throw Error(at + ".tables: " + i.dump() + " is not the index of a table");
      }
      layout.tables.push_back(i.get<size_t>());
    }
    spec.layouts.push_back(std::move(layout));
  }
  if (!doc.contains("head") || !doc["head"].is_object()) {
    throw Error(where + ": \"head\" must be an object");
  }
  spec.head_module = text_of(doc["head"], "module", where + ".head");
  spec.head_name = text_of(doc["head"], "name", where + ".head");
  return spec;
}

inline torch::jit::Module submodule(const torch::jit::Module& model, const std::string& path) {
  torch::jit::Module m = model;
  std::stringstream parts(path);
  std::string part;
  while (std::getline(parts, part, '.')) {
    if (!m.hasattr(part) || !m.attr(part).isModule()) {
      throw Error(
          "the model has no module " + path +
          " (its adapter tables): export it again with `sparseadapter export "
          "--runtime-adapters`");
    }
    m = m.attr(part).toModule();
  }
  return m;
}

// The last line of an error: TorchScript puts the exception raised in a method under its traceback.
inline std::string last_line(std::string text) {
  text.erase(text.find_last_not_of("\n ") + 1);
  return text.substr(text.rfind('\n') + 1);
}

inline std::string brief(const std::exception& e) {
  if (const auto* err = dynamic_cast<const c10::Error*>(&e)) {
    return last_line(err->what_without_backtrace());
  }
  return last_line(e.what());
}

struct Loaded {
  std::string name;
  int64_t bytes = 0;  // what the adapter takes in the tables
};

class Tables {
 public:
  Tables(const torch::jit::Module& model, Spec spec) : spec_(std::move(spec)) {
    for (const auto& t : spec_.tables) {
      sites_.push_back(submodule(model, t.module));
    }
    head_ = submodule(model, spec_.head_module);
    for (auto* m : all()) {
      for (const char* method : {"add_adapter", "remove_adapter", "held_bytes"}) {
        if (!m->find_method(method) || (m != &head_ && !m->find_method("skip_adapter"))) {
          throw Error("the model's adapter table has no method " + std::string(method) + ": export it again");
        }
      }
    }
  }

  const std::vector<std::string>& names() const { return names_; }

  // What the tables hold, in bytes (all adapters).
  int64_t held_bytes() {
    int64_t total = 0;
    for (auto* m : all()) {
      total += m->run_method("held_bytes").toInt();
    }
    return total;
  }

  // Adds the adapter in folder dir under `name`; Error naming the file and what is wrong.
  Loaded load(const std::string& dir, const std::string& name) {
    if (name.empty()) {
      throw Error("an adapter's name must not be empty");
    }
    if (std::find(names_.begin(), names_.end(), name) != names_.end()) {
      throw Error("an adapter named \"" + name + "\" is loaded already (unload it first)");
    }
    const std::string config_path = dir + "/" + kConfigFile;
    const nlohmann::json meta = read_config(config_path);
    const nlohmann::json& config = meta["config"];
    const Layout& layout = layout_of(meta, config, config_path);
    const int64_t rank = positive(config, "bottleneck", config_path) * positive(config, "large_sparse", config_path);
    const std::string weights_path = dir + "/" + weights_file(meta, config_path);
    const uint64_t limit = size_limit(layout, rank);
    check_weights_digest(weights_path, meta, limit);
    auto tensors = safetensors::read(weights_path, limit);
    const std::string saved = meta["name"].get<std::string>();
    std::string activation = "identity";
    double scale = 0;
    if (layout.kind == "lora") {
      scale = number(config, "lora_alpha", config_path) / static_cast<double>(rank);
    } else {
      activation = text_of(config, "activation", config_path);
      scale = number(config, "scale", config_path);
    }
    // Every tensor, found and typed, before any table changes.
    std::set<std::string> used;
    // per table: the adapter's two layers there, or none where the layout has no site
    std::vector<std::optional<std::pair<c10::List<at::Tensor>, c10::List<at::Tensor>>>> layers(spec_.tables.size());
    for (const size_t i : layout.tables) {
      const Table& t = spec_.tables[i];
      const std::string prefix = t.host + ".sparseadapter.adapters." + saved;
      auto down = layer(tensors, prefix + "." + layout.down, layout.bias, used, weights_path);
      auto up = layer(tensors, prefix + "." + layout.up, layout.bias, used, weights_path);
      check_pattern(down, rank, t.in_features, prefix + "." + layout.down, weights_path, config_path);
      check_pattern(up, t.out_features, rank, prefix + "." + layout.up, weights_path, config_path);
      layers[i].emplace(std::move(down), std::move(up));
    }
    const std::string head = "head." + spec_.head_name + ".";
    const auto head_weight = take(tensors, head + "weight", used, weights_path, true);
    const auto head_bias = take(tensors, head + "bias", used, weights_path, true);
    for (const auto& [key, _] : tensors) {
      if (used.count(key)) {
        continue;
      }
      if (key.rfind(head, 0) == 0) {  // e.g. a regression head's target normalization
        throw Error(
            weights_path + ": its head holds " + key + "; the tables take a linear head (weight and bias) only");
      }
      if (key.rfind("head.", 0) != 0) {  // other heads' tensors: not this model's task, as load_adapter
        throw Error(weights_path + ": holds tensor " + key + ", which no table of this model takes");
      }
    }
    Loaded loaded{name, 0};
    size_t added = 0;
    try {
      for (; added < sites_.size(); ++added) {
        if (!layers[added]) {
          loaded.bytes += sites_[added].run_method("skip_adapter").toInt();
          continue;
        }
        const auto& [down, up] = *layers[added];
        try {
          loaded.bytes += sites_[added].run_method("add_adapter", down, up, activation, scale).toInt();
        } catch (const std::exception& e) {
          throw Error(
              weights_path + ": " + spec_.tables[added].host + ".sparseadapter.adapters." + saved + ": " + brief(e));
        }
      }
      try {
        loaded.bytes += head_.run_method("add_adapter", head_weight, head_bias).toInt();
      } catch (const std::exception& e) {
        throw Error(weights_path + ": " + head + "weight / bias: " + brief(e));
      }
    } catch (...) {
      const auto k = static_cast<int64_t>(names_.size());
      for (size_t i = 0; i < added; ++i) {
        sites_[i].run_method("remove_adapter", k);
      }
      throw;
    }
    names_.push_back(name);
    return loaded;
  }

  void unload(const std::string& name) {
    const auto at = std::find(names_.begin(), names_.end(), name);
    if (at == names_.end()) {
      throw Error("no adapter named \"" + name + "\" is loaded");
    }
    const auto k = static_cast<int64_t>(at - names_.begin());
    for (auto* m : all()) {
      m->run_method("remove_adapter", k);
    }
    names_.erase(at);
  }

 private:
  std::vector<torch::jit::Module*> all() {
    std::vector<torch::jit::Module*> out;
    for (auto& m : sites_) out.push_back(&m);
    out.push_back(&head_);
    return out;
  }

  static nlohmann::json read_config(const std::string& path) {
    std::ifstream in(path, std::ios::binary | std::ios::ate);
    if (!in) {
      throw Error(path + " does not exist or cannot be read (not an adapter folder?)");
    }
    const auto size = static_cast<size_t>(in.tellg());
    if (size > kConfigLimit) {
      throw Error(path + " is " + std::to_string(size) + " bytes; an adapter config is a few kilobytes");
    }
    std::string text(size, '\0');
    in.seekg(0);
    in.read(text.data(), static_cast<std::streamsize>(size));
    nlohmann::json meta;
    try {
      meta = nlohmann::json::parse(text);
    } catch (const nlohmann::json::parse_error& e) {
      throw Error(path + " is not valid JSON (corrupted or truncated): " + e.what());
    }
    if (!meta.is_object() || !meta.contains("format") || meta["format"] != "sparseadapter") {
      throw Error(path + " is not a sparseadapter adapter config");
    }
    if (!meta.contains("format_version") || meta["format_version"] != 1) {
      throw Error(
          path + ": format version " + (meta.contains("format_version") ? meta["format_version"].dump() : "null") +
          " is not supported (this program reads version 1)");
    }
    for (const char* key : {"name", "config", "sites", "weights_sha256"}) {
      if (!meta.contains(key)) {
        throw Error(path + " lacks the field \"" + key + "\"");
      }
    }
    if (!meta["name"].is_string() || !meta["config"].is_object() || !meta["weights_sha256"].is_string()) {
      throw Error(path + ": \"name\" and \"weights_sha256\" must be strings and \"config\" an object");
    }
    if (!meta.contains("config_sha256")) {
      std::cerr << "sparseadapter_serve: warning: " << path
                << " has no config_sha256 (saved by sparseadapter before 0.5): its settings are not covered by a "
                   "checksum; save the adapter again to add one"
                << std::endl;
    } else {
      // The SHA-256 of the canonical JSON (sorted keys, no spaces, ASCII) without the field itself.
      nlohmann::json body = meta;
      body.erase("config_sha256");
      if (!meta["config_sha256"].is_string() || meta["config_sha256"] != sha256::of_text(body.dump(-1, ' ', true))) {
        throw Error(
            path +
            " does not match its own checksum (config_sha256): a setting was edited or the file is "
            "corrupted; save the adapter again rather than editing it");
      }
    }
    return meta;
  }

  static void check_weights_digest(const std::string& path, const nlohmann::json& meta, uint64_t limit) {
    std::ifstream in(path, std::ios::binary | std::ios::ate);
    if (!in) {
      throw Error(path + " does not exist or cannot be read");
    }
    const auto size = static_cast<uint64_t>(in.tellg());
    if (size > limit) {
      throw Error(
          path + " is " + std::to_string(size) + " bytes, more than this adapter's config can take (" +
          std::to_string(limit) + "): not this adapter's tensors");
    }
    if (sha256::of_file(path) != meta["weights_sha256"].get<std::string>()) {
      throw Error(
          path +
          " does not match its config's checksum (weights_sha256): the file is corrupted, truncated, or "
          "from another save");
    }
  }

  // The layout an adapter folder loads into: its kind's, with its sites; Error naming what differs.
  const Layout& layout_of(const nlohmann::json& meta, const nlohmann::json& config, const std::string& path) const {
    const std::string kind = text_of(config, "kind", path);
    if (meta.contains("model_type") && meta["model_type"].is_string() && meta["model_type"] != spec_.model_type) {
      throw Error(
          path + ": the adapter was saved for a " + meta["model_type"].dump() + " model, this one is \"" +
          spec_.model_type + "\"");
    }
    if (config.contains("layer_norm") && config["layer_norm"] == true) {
      throw Error(path + ": an adapter with a layer norm cannot run in the tables' one op per site");
    }
    if (!meta.contains("head") || !meta["head"].is_object()) {
      throw Error(path + ": saved without its task head (save_adapter(..., include_head=True)); the tables need one");
    }
    std::vector<const Layout*> of_kind;
    std::string kinds;
    for (const auto& layout : spec_.layouts) {
      kinds += (kinds.empty() ? "" : ", ") + layout.kind;
      if (layout.kind == kind) {
        of_kind.push_back(&layout);
      }
    }
    if (of_kind.empty()) {
      throw Error(
          path + ": a " + kind + " adapter; this model's tables take " + kinds +
          " adapters (their kinds and sites are fixed at export)");
    }
    std::string mismatch;
    for (const Layout* layout : of_kind) {
      mismatch = sites_mismatch(meta["sites"], layout->sites);
      if (mismatch.empty()) {
        return *layout;
      }
    }
    if (of_kind.size() > 1) {
      throw Error(
          path + ": its sites " + meta["sites"].dump() + " are those of none of this model's " + kind + " layouts");
    }
    throw Error(path + ": " + mismatch);
  }

  // What differs between an adapter's sites and a layout's ("" when nothing).
  static std::string sites_mismatch(const nlohmann::json& sites, const nlohmann::json& model) {
    if (!sites.is_object() || sites.size() != model.size()) {
      return "its adapter parts " + sites.dump() + " do not match the model's";
    }
    for (const auto& [part, mine] : model.items()) {
      if (!sites.contains(part) || !sites[part].is_array()) {
        return "it has no \"" + part + "\" sites; the model has";
      }
      const auto& theirs = sites[part];
      for (size_t i = 0; i < std::min(mine.size(), theirs.size()); ++i) {
        if (theirs[i] != mine[i]) {
          return "the adapter was saved for " + theirs[i].dump() + " but this model has " + mine[i].dump() +
                 " (another model or architecture?)";
        }
      }
      if (theirs.size() != mine.size()) {
        return "the adapter has " + std::to_string(theirs.size()) + " " + part + " sites, the model " +
               std::to_string(mine.size());
      }
    }
    return "";
  }

  // The tensor file the config names: a plain file name of ours, never a path.
  static std::string weights_file(const nlohmann::json& meta, const std::string& path) {
    std::string name = "adapter.safetensors";
    if (meta.contains("weights_file")) {
      if (!meta["weights_file"].is_string()) {
        throw Error(path + " names an unexpected weights file " + meta["weights_file"].dump());
      }
      name = meta["weights_file"].get<std::string>();
    }
    static const std::regex kName("adapter(-[0-9a-f]{16})?\\.safetensors");
    if (!std::regex_match(name, kName)) {
      throw Error(path + " names an unexpected weights file \"" + name + "\"");
    }
    return name;
  }

  static int64_t positive(const nlohmann::json& config, const char* key, const std::string& path) {
    if (!config.contains(key) || !config[key].is_number_unsigned() || config[key].get<int64_t>() < 1) {
      throw Error(path + ": config \"" + key + "\" must be a positive integer");
    }
    return config[key].get<int64_t>();
  }

  static double number(const nlohmann::json& config, const char* key, const std::string& path) {
    if (!config.contains(key) || !config[key].is_number()) {
      throw Error(path + ": config \"" + key + "\" must be a number");
    }
    return config[key].get<double>();
  }

  // The most bytes this adapter's tensor file can hold: every matrix dense in float64 with int64
  // indices, the head, and room for the header (as load_adapter's limit).
  uint64_t size_limit(const Layout& layout, int64_t rank) const {
    uint64_t entries = 0;
    for (const size_t i : layout.tables) {
      const Table& t = spec_.tables[i];
      entries += static_cast<uint64_t>(rank) * (t.in_features + t.out_features + 2) + t.out_features + 2;
    }
    const auto head = head_.attr("weight").toTensor();  // [adapters, outputs, inputs]
    entries += static_cast<uint64_t>(head.size(1) * (head.size(2) + 1));
    return 24 * entries + (1 << 20);
  }

  static at::Tensor take(
      std::map<std::string, at::Tensor>& tensors,
      const std::string& key,
      std::set<std::string>& used,
      const std::string& path,
      bool required) {
    const auto it = tensors.find(key);
    if (it == tensors.end()) {
      if (required) {
        throw Error(path + ": lacks tensor " + key);
      }
      return at::Tensor();
    }
    used.insert(key);
    return it->second;
  }

  // The pattern of a rows x cols matrix (rows and cols as the config and the site say): its size,
  // then its structure (validate_csr, the op layer's check: index ranges, sorted unique columns).
  static void check_pattern(
      const c10::List<at::Tensor>& layer,
      int64_t rows,
      int64_t cols,
      const std::string& key,
      const std::string& path,
      const std::string& config_path) {
    const at::Tensor crow = layer.get(1);
    if (crow.numel() != rows + 1) {
      throw Error(
          config_path + " declares sizes that do not match its tensor file: " + key + " is a sparse matrix of " +
          std::to_string(crow.numel() - 1) + " rows, the config and the model make it " + std::to_string(rows));
    }
    static const auto validate = c10::Dispatcher::singleton()
                                     .findSchemaOrThrow("sparseadapter::validate_csr", "")
                                     .typed<void(const at::Tensor&, const at::Tensor&, c10::SymInt, c10::SymInt)>();
    try {
      validate.call(crow.to(torch::kLong), layer.get(2).to(torch::kLong), c10::SymInt(rows), c10::SymInt(cols));
    } catch (const std::exception& e) {
      throw Error(path + ": " + key + " holds an invalid sparse matrix: " + brief(e));
    }
  }

  // [values, crow_indices, col_indices, bias] of the CSR layer stored under key.
  c10::List<at::Tensor> layer(
      std::map<std::string, at::Tensor>& tensors,
      const std::string& key,
      bool wants_bias,
      std::set<std::string>& used,
      const std::string& path) const {
    if (!tensors.count(key + ".values") && tensors.count(key + ".weight")) {
      throw Error(
          path + ": " + key + " is dense (not pruned); the tables take sparse adapters (CSR values and indices)");
    }
    const auto values = take(tensors, key + ".values", used, path, true);
    const auto crow = take(tensors, key + ".crow_indices", used, path, true);
    const auto col = take(tensors, key + ".col_indices", used, path, true);
    auto bias = take(tensors, key + ".bias", used, path, false);
    if (bias.defined() != wants_bias) {
      throw Error(path + ": " + key + ".bias is " + (wants_bias ? "missing" : "unexpected"));
    }
    if (!values.is_floating_point()) {
      throw Error(path + ": " + key + ".values has dtype " + std::string(c10::toString(values.scalar_type())));
    }
    for (const auto& [what, t] : {std::pair{"crow_indices", crow}, std::pair{"col_indices", col}}) {
      const auto type = t.scalar_type();
      if (type != torch::kUInt8 && type != torch::kInt16 && type != torch::kInt32 && type != torch::kInt64) {
        throw Error(
            path + ": " + key + "." + what + " has dtype " + std::string(c10::toString(type)) + " (need integers)");
      }
      if (t.dim() != 1) {
        throw Error(path + ": " + key + "." + what + " is not 1-D");
      }
    }
    if (bias.defined() && !bias.is_floating_point()) {
      throw Error(path + ": " + key + ".bias has dtype " + std::string(c10::toString(bias.scalar_type())));
    }
    return c10::List<at::Tensor>({values, crow, col, bias.defined() ? bias : torch::empty({0})});
  }

  Spec spec_;
  std::vector<torch::jit::Module> sites_;
  torch::jit::Module head_;
  std::vector<std::string> names_;
};

}  // namespace runtime_adapters
