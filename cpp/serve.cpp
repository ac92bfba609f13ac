// sparseadapter_serve --model MODEL.pt [--adapters DIR] [--threads N] [--batch-size B]
//
// Serves a model exported by `sparseadapter export` over JSON lines, without Python: one request
// per stdin line, one answer per non-blank line on stdout, in input order, flushed at once.
//
// The model: a TorchScript module with the extra file sparseadapter.json (format
// "sparseadapter-serving", version 1) whose forward(input_ids, attention_mask, token_type_ids), all
// int64 [B, L], returns float logits [B, num_labels]. A model exported with several adapters
// (`sparseadapter export --adapter a --adapter b`; its metadata lists them as "adapters") takes a
// fourth input, adapter_index int64 [B]: the index of each row's adapter in that list.
//
// Requests: {"id": any (optional, echoed), "input_ids": [ids], "attention_mask": [0|1, ...]
// (default all 1), "token_type_ids": [ids] (default all 0)}, or the same keys holding arrays of
// rows for a batch; for a model with several adapters, "adapter": "name" (required) says which one
// answers the request. Requests for different adapters run in one forward, each row through its own
// adapter. Answers: {"id", "logits", "label"[, "label_name"]} for classification,
// {"id", "logits", "score"} for regression; a batch gets "labels"/"label_names"/"scores" lists.
// A bad request gets {"id", "line", "error"} and serving goes on.
//
// Adapters loaded at run time: a model exported with `sparseadapter export --runtime-adapters` (its
// metadata has "adapter_tables") holds empty tables of CSR adapters (runtime_adapters.h), filled from
// adapter folders (what save_adapter writes) without Python: --adapters DIR loads every folder in
// DIR at start (named by the folder; plain files and hidden folders there are skipped), and admin
// lines load and unload while serving:
//   {"admin": "load", "name": "x", "path": "DIR/x"}  (name: default the folder's name)
//   {"admin": "unload", "name": "x"}
//   {"admin": "list"}
// answered {"id", "admin", "ok": true, "adapters": [loaded names], "bytes": what the tables hold,
// "adapter_bytes": what the loaded adapter takes (load)}, or an error line. An admin line ends the
// round it is read in: the requests before it are answered by the adapters loaded when they were
// read, those after it by the new set.
//
// Consecutive requests are run together, up to B sentences per forward, but only those already
// waiting on stdin: a client that sends one line and waits for its answer gets it at once. When a
// forward fails, its requests are run again one by one, so only the requests that fail alone get
// the error.
//
// Memory: a line is at most 16 MiB; parsing one may take at most 32 MiB (the parser charges what it
// allocates, token-id arrays at 8 bytes an id); a request holds at most 65,536 sentences and 2^20
// tokens; and a round stops taking waiting lines once what it holds passes 48 MiB. So memory is
// bounded whatever the lines hold, and does not grow with the number of lines waiting.
//
// Token ids are checked per request against the vocabulary: the smaller of the metadata's
// vocab_size and the rows of the model's token embedding, when the model has one it can be told by
// (an Embedding module named word_embeddings, embed_tokens, wte, tokens, ..., else the largest).
// Exit codes: 0 at end of input, 1 when the model (or an adapter of --adapters) cannot be loaded or
// the output is gone, 2 bad usage.
#include <torch/script.h>

#include <ATen/Parallel.h>

#include <dirent.h>
#include <algorithm>
#include <charconv>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <exception>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "json_lines.h"
#include "line_reader.h"
#include "runtime_adapters.h"

namespace {

constexpr size_t kMaxLineBytes = 16 << 20;
constexpr size_t kMaxParsedBytes = 32 << 20;  // what parsing one line may hold
constexpr size_t kMaxRoundBytes = 48 << 20;   // a round takes no more waiting lines past this
constexpr size_t kMaxRequestRows = 65536;
constexpr size_t kMaxRequestTokens = 1 << 20;
constexpr int kMaxJsonDepth = 64;
constexpr int64_t kDefaultBatchSize = 32;

const char* const kUsage =
    "usage: sparseadapter_serve --model MODEL.pt [--adapters DIR] [--threads N] [--batch-size B]\n"
    "Answers JSON-lines requests on stdin with one JSON line each on stdout.\n"
    "  --model PATH     TorchScript model written by `sparseadapter export`\n"
    "  --adapters DIR   load every adapter folder in DIR (a model exported with --runtime-adapters)\n"
    "  --threads N      CPU threads per forward (default: torch's default)\n"
    "  --batch-size B   most sentences per forward (default 32)\n"
    "  --help           show this text\n"
    "request: {\"id\": any, \"input_ids\": [int, ...], \"attention_mask\": [0|1, ...],"
    " \"token_type_ids\": [int, ...]}\n"
    "         (id, attention_mask and token_type_ids optional; arrays of rows for a batch;\n"
    "         \"adapter\": \"name\" for a model exported with several adapters)\n"
    "admin:   {\"admin\": \"load\", \"name\": \"x\", \"path\": \"DIR/x\"}, {\"admin\": \"unload\", \"name\": \"x\"},"
    " {\"admin\": \"list\"}\n"
    "         (a model exported with --runtime-adapters)\n";

struct Failure {  // fatal: exit 1
  std::string message;
};

struct UsageError {  // exit 2
  std::string message;
};

struct BadRequest {  // answered with an error line
  std::string message;
};

// c10::Error::what() carries a C++ backtrace; the first line is the message a user needs.
std::string brief(const std::exception& e) {
  if (const auto* err = dynamic_cast<const c10::Error*>(&e)) {
    return err->what_without_backtrace();
  }
  return e.what();
}

// The last non-empty line of text (npos + 1 wraps to 0: no newline means all of it).
std::string last_line(std::string text) {
  text.erase(text.find_last_not_of('\n') + 1);
  return text.substr(text.rfind('\n') + 1);
}

// ---- options

struct Options {
  std::string model;
  std::string adapters;  // a folder of adapter folders
  int threads = 0;       // 0: torch's default
  int64_t batch_size = kDefaultBatchSize;
  bool help = false;
};

int64_t positive_int(const std::string& text, const std::string& option, int64_t max) {
  int64_t value = 0;
  const auto end = text.data() + text.size();
  const auto result = std::from_chars(text.data(), end, value);
  if (result.ec != std::errc() || result.ptr != end || value < 1 || value > max) {
    throw UsageError{option + " must be an integer from 1 to " + std::to_string(max) + ", got '" + text + "'"};
  }
  return value;
}

Options parse_options(int argc, char** argv) {
  Options opt;
  for (int i = 1; i < argc; ++i) {
    std::string name = argv[i];
    if (name == "--help" || name == "-h") {
      opt.help = true;
      continue;
    }
    std::string value;
    const auto eq = name.find('=');
    const bool inline_value = name.rfind("--", 0) == 0 && eq != std::string::npos;
    if (inline_value) {  // --name=value
      value = name.substr(eq + 1);
      name.resize(eq);
    }
    if (name != "--model" && name != "--adapters" && name != "--threads" && name != "--batch-size") {
      throw UsageError{"unknown argument '" + std::string(argv[i]) + "'"};
    }
    if (!inline_value) {
      if (i + 1 >= argc) {
        throw UsageError{name + " needs a value"};
      }
      value = argv[++i];
    }
    if (name == "--model") {
      opt.model = value;
    } else if (name == "--adapters") {
      opt.adapters = value;
    } else if (name == "--threads") {
      opt.threads = static_cast<int>(positive_int(value, name, 1024));
    } else {
      opt.batch_size = positive_int(value, name, 65536);
    }
  }
  if (opt.model.empty() && !opt.help) {
    throw UsageError{"--model is required"};
  }
  return opt;
}

// ---- the model and its metadata

struct Metadata {
  bool classification = true;
  int64_t num_labels = 0;
  std::vector<std::string> labels;  // empty when the model names none
  int64_t vocab_size = 0;
  int64_t max_length = 0;
  int64_t pad_token_id = 0;
  int64_t type_vocab_size = 0;        // 0: the model takes no token types (all must be 0)
  std::vector<std::string> adapters;  // several adapters: forward takes an adapter index per row
  bool runtime_adapters = false;      // adapter tables: `adapters` are the ones loaded now
  std::string adapter_tables;         // their description (JSON), for runtime_adapters::parse_spec

  // Whether forward takes an adapter index per row (and requests name their adapter).
  bool indexed() const { return !adapters.empty() || runtime_adapters; }
};

int64_t meta_int(const jsonl::Value& doc, const char* key, int64_t min) {
  const auto* v = doc.find(key);
  if (v == nullptr) {
    throw std::runtime_error(std::string("missing \"") + key + "\"");
  }
  const auto* integer = v->get<int64_t>();
  if (integer == nullptr || *integer < min) {
    throw std::runtime_error(std::string("\"") + key + "\" must be an integer >= " + std::to_string(min));
  }
  return *integer;
}

// The string member key, or "" when it is missing or no string.
std::string meta_string(const jsonl::Value& doc, const char* key) {
  const auto* v = doc.find(key);
  const auto* string = v ? v->get<std::string>() : nullptr;
  return string ? *string : std::string();
}

Metadata parse_metadata(const std::string& text) {
  const auto doc = jsonl::parse(text, kMaxJsonDepth);
  if (doc.get<jsonl::Object>() == nullptr) {
    throw std::runtime_error("not a JSON object");
  }
  if (meta_string(doc, "format") != "sparseadapter-serving") {
    throw std::runtime_error("\"format\" is not \"sparseadapter-serving\"");
  }
  const int64_t version = meta_int(doc, "version", 1);
  if (version != 1) {
    throw std::runtime_error("version " + std::to_string(version) + " is not supported (this program reads version 1)");
  }
  Metadata meta;
  const std::string task = meta_string(doc, "task");
  if (task != "classification" && task != "regression") {
    throw std::runtime_error("\"task\" must be \"classification\" or \"regression\"");
  }
  meta.classification = task == "classification";
  meta.num_labels = meta_int(doc, "num_labels", 1);
  if (!meta.classification && meta.num_labels != 1) {
    throw std::runtime_error("a regression model must have num_labels 1, not " + std::to_string(meta.num_labels));
  }
  const auto* labels = doc.find("labels");
  if (labels == nullptr) {
    throw std::runtime_error("missing \"labels\" (a list of names, or null)");
  }
  if (!labels->is_null()) {
    const auto* names = labels->get<jsonl::Array>();
    if (names != nullptr) {
      for (const auto& name : *names) {
        if (const auto* string = name.get<std::string>()) {
          meta.labels.push_back(*string);
        }
      }
    }
    if (names == nullptr || meta.labels.size() != names->size() ||
        static_cast<int64_t>(meta.labels.size()) != meta.num_labels) {
      throw std::runtime_error(
          "\"labels\" must be null or a list of num_labels (" + std::to_string(meta.num_labels) + ") strings");
    }
  }
  meta.vocab_size = meta_int(doc, "vocab_size", 1);
  meta.max_length = meta_int(doc, "max_length", 1);
  meta.pad_token_id = meta_int(doc, "pad_token_id", 0);
  if (meta.pad_token_id >= meta.vocab_size) {
    throw std::runtime_error(
        "pad_token_id " + std::to_string(meta.pad_token_id) + " is not below vocab_size " +
        std::to_string(meta.vocab_size));
  }
  meta.type_vocab_size = meta_int(doc, "type_vocab_size", 0);
  if (const auto* tables = doc.find("adapter_tables"); tables != nullptr && !tables->is_null()) {
    meta.runtime_adapters = true;
    jsonl::write(meta.adapter_tables, *tables);
  }
  if (const auto* adapters = doc.find("adapters"); adapters != nullptr && !adapters->is_null()) {
    const auto* names = adapters->get<jsonl::Array>();
    for (size_t i = 0; names != nullptr && i < names->size(); ++i) {
      const auto* name = (*names)[i].get<std::string>();
      if (name == nullptr || name->empty() ||
          std::find(meta.adapters.begin(), meta.adapters.end(), *name) != meta.adapters.end()) {
        throw std::runtime_error(
            "\"adapters\"[" + std::to_string(i) + "] must be a name of its own (a non-empty string)");
      }
      meta.adapters.push_back(*name);
    }
    if (names == nullptr || names->empty()) {
      throw std::runtime_error("\"adapters\" must be null or a non-empty list of adapter names");
    }
  }
  return meta;
}

// The rows of the model's token embedding, when it has one that can be told by its name (or else the
// largest Embedding module): ids past them would fail the forward, and with it every request run in
// the same batch. The smaller of that and the metadata's vocab_size is used.
int64_t checked_vocab_size(const torch::jit::Module& model, int64_t declared) {
  static const char* const kTokenNames[] = {"word_embeddings", "embed_tokens",     "wte",
                                            "tokens",          "token_embeddings", "word_embedding",
                                            "embed_in",        "shared",           "embeddings"};
  int64_t named_rows = -1, largest_rows = -1;
  std::string named, largest;
  int named_rank = static_cast<int>(std::size(kTokenNames));
  for (const auto& item : model.named_modules()) {
    const auto type = item.value.type();
    if (!type->name() || type->name()->name().find("Embedding") == std::string::npos || !item.value.hasattr("weight")) {
      continue;
    }
    const auto weight = item.value.attr("weight");
    if (!weight.isTensor() || weight.toTensor().dim() != 2) {
      continue;
    }
    const int64_t rows = weight.toTensor().size(0);
    const std::string leaf = item.name.substr(item.name.rfind('.') + 1);
    for (int rank = 0; rank < named_rank; ++rank) {
      if (leaf == kTokenNames[rank]) {
        named_rank = rank;
        named_rows = rows;
        named = item.name;
      }
    }
    if (rows > largest_rows) {
      largest_rows = rows;
      largest = item.name;
    }
  }
  const int64_t rows = named_rows >= 0 ? named_rows : largest_rows;
  if (rows < 0 || rows >= declared) {
    return declared;
  }
  std::cerr << "sparseadapter_serve: warning: the metadata's vocab_size " << declared << " is more than the " << rows
            << " rows of the model's token embedding '" << (named_rows >= 0 ? named : largest) << "'; ids from " << rows
            << " on are refused" << std::endl;
  return rows;
}

torch::jit::Module load_model(const std::string& path, Metadata& meta) {
  if (!std::ifstream(path, std::ios::binary)) {
    throw Failure{"cannot open model '" + path + "' (missing or unreadable)"};
  }
  torch::jit::ExtraFilesMap extra{{"sparseadapter.json", ""}};
  torch::jit::Module model;
  try {
    model = torch::jit::load(path, torch::kCPU, extra);
  } catch (const std::exception& e) {
    throw Failure{"'" + path + "' is not a loadable TorchScript model: " + brief(e)};
  }
  const std::string& text = extra["sparseadapter.json"];
  if (text.empty()) {
    throw Failure{"'" + path + "' has no sparseadapter.json: export the model with `sparseadapter export`"};
  }
  try {
    meta = parse_metadata(text);
  } catch (const std::exception& e) {
    throw Failure{"'" + path + "': invalid sparseadapter.json: " + e.what()};
  }
  const auto forward = model.find_method("forward");
  if (!forward) {
    throw Failure{"'" + path + "' has no forward method"};
  }
  const size_t inputs = forward->function().getSchema().arguments().size() - 1;  // less self
  const size_t expected = meta.indexed() ? 4 : 3;
  if (inputs != expected) {
    throw Failure{
        "'" + path + "': forward takes " + std::to_string(inputs) + " inputs, expected " + std::to_string(expected) +
        (!meta.indexed() ? " (input_ids, attention_mask, token_type_ids)"
                         : " (input_ids, attention_mask, token_type_ids, adapter_index: the "
                           "metadata lists adapters)")};
  }
  model.eval();
  meta.vocab_size = checked_vocab_size(model, meta.vocab_size);
  if (meta.pad_token_id >= meta.vocab_size) {
    throw Failure{
        "'" + path + "': pad_token_id " + std::to_string(meta.pad_token_id) +
        " is not below the rows of the model's token embedding (" + std::to_string(meta.vocab_size) + ")"};
  }
  return model;
}

// ---- requests

struct Row {
  std::vector<int64_t> ids, mask, types;
  std::vector<float> logits;
};

struct Request {
  size_t line = 0;
  bool has_id = false;
  jsonl::Value id;
  bool batch = false;
  int64_t adapter = -1;  // the index of the request's adapter in Metadata::adapters (several adapters)
  std::vector<Row> rows;
  std::string error;  // set: answered with this error
  size_t bytes = 0;   // what it holds, from above: its parse (the id) and its rows
  std::string admin;  // an admin line: "load", "unload" or "list" (no rows)
  std::string admin_name, admin_path;
  std::string admin_answer;  // its answer's members after the id, once done
};

// The folder's own name ("DIR/x/" -> "x"): an adapter's default name, as in a multi-adapter export.
std::string folder_name(std::string path) {
  path.erase(path.find_last_not_of('/') + 1);
  return path.substr(path.rfind('/') + 1);
}

void read_admin(const jsonl::Object& doc, const Metadata& meta, Request& req) {
  for (const auto& [key, value] : doc) {
    const auto* text = value.get<std::string>();
    if (key == "admin" || key == "name" || key == "path") {
      if (text == nullptr) {
        throw BadRequest{"\"" + key + "\" must be a string"};
      }
      (key == "admin" ? req.admin : key == "name" ? req.admin_name : req.admin_path) = *text;
    } else if (key != "id") {
      throw BadRequest{"unknown key \"" + key + "\" in an admin line (expected id, admin, name, path)"};
    }
  }
  if (!meta.runtime_adapters) {
    throw BadRequest{
        "admin lines load and unload adapters of a model exported with --runtime-adapters; this one is not"};
  }
  if (req.admin == "load") {
    if (req.admin_path.empty()) {
      throw BadRequest{"\"admin\": \"load\" needs \"path\", the adapter's folder"};
    }
    if (req.admin_name.empty()) {
      req.admin_name = folder_name(req.admin_path);
    }
  } else if (req.admin == "unload") {
    if (req.admin_name.empty() || !req.admin_path.empty()) {
      throw BadRequest{"\"admin\": \"unload\" takes \"name\" (and no path)"};
    }
  } else if (req.admin == "list") {
    if (!req.admin_name.empty() || !req.admin_path.empty()) {
      throw BadRequest{"\"admin\": \"list\" takes no name or path"};
    }
  } else {
    throw BadRequest{"\"admin\" must be \"load\", \"unload\" or \"list\""};
  }
}

bool is_array(const jsonl::Value& v) {
  return v.get<jsonl::Array>() != nullptr || v.get<jsonl::IntArray>() != nullptr;
}

size_t array_size(const jsonl::Value& v) {
  if (const auto* ints = v.get<jsonl::IntArray>()) return ints->size();
  if (const auto* items = v.get<jsonl::Array>()) return items->size();
  return 0;
}

std::vector<int64_t> int_array(const jsonl::Value& v, const std::string& name) {
  if (const auto* ints = v.get<jsonl::IntArray>()) {
    return *ints;
  }
  const auto* items = v.get<jsonl::Array>();
  if (items == nullptr) {
    throw BadRequest{name + " must be an array of integers"};
  }
  std::vector<int64_t> out;
  out.reserve(items->size());
  for (size_t j = 0; j < items->size(); ++j) {
    const auto* integer = (*items)[j].get<int64_t>();
    if (integer == nullptr) {
      throw BadRequest{name + "[" + std::to_string(j) + "] is not an integer"};
    }
    out.push_back(*integer);
  }
  return out;
}

// One sentence. `at` names it in messages: "" for a single request, "[i]" in a batch.
Row make_row(
    const jsonl::Value& ids,
    const jsonl::Value* mask,
    const jsonl::Value* types,
    const std::string& at,
    const Metadata& meta) {
  Row row;
  const std::string ids_name = "input_ids" + at;
  row.ids = int_array(ids, ids_name);
  const auto n = static_cast<int64_t>(row.ids.size());
  if (n == 0) {
    throw BadRequest{ids_name + " is empty"};
  }
  if (n > meta.max_length) {
    throw BadRequest{
        ids_name + " has " + std::to_string(n) + " tokens, more than the model's max_length " +
        std::to_string(meta.max_length)};
  }
  for (int64_t j = 0; j < n; ++j) {
    if (row.ids[j] < 0 || row.ids[j] >= meta.vocab_size) {
      throw BadRequest{
          ids_name + "[" + std::to_string(j) + "] = " + std::to_string(row.ids[j]) + " is out of the vocabulary [0, " +
          std::to_string(meta.vocab_size) + ")"};
    }
  }
  // attention_mask and token_type_ids: each as long as input_ids, or absent for the default.
  auto companion = [&](const jsonl::Value* v, const char* key, int64_t fill) {
    const std::string name = key + at;
    if (v == nullptr) {
      return std::vector<int64_t>(row.ids.size(), fill);
    }
    auto values = int_array(*v, name);
    if (values.size() != row.ids.size()) {
      throw BadRequest{
          name + " has " + std::to_string(values.size()) + " entries but " + ids_name + " has " + std::to_string(n)};
    }
    return values;
  };
  row.mask = companion(mask, "attention_mask", 1);
  for (size_t j = 0; j < row.mask.size(); ++j) {
    if (row.mask[j] != 0 && row.mask[j] != 1) {
      throw BadRequest{
          "attention_mask" + at + "[" + std::to_string(j) + "] = " + std::to_string(row.mask[j]) + ", expected 0 or 1"};
    }
  }
  if (std::find(row.mask.begin(), row.mask.end(), 1) == row.mask.end()) {
    throw BadRequest{"attention_mask" + at + " is all zeros: no token to attend to"};
  }
  row.types = companion(types, "token_type_ids", 0);
  const int64_t type_limit = std::max<int64_t>(meta.type_vocab_size, 1);
  for (size_t j = 0; j < row.types.size(); ++j) {
    if (row.types[j] < 0 || row.types[j] >= type_limit) {
      throw BadRequest{
          "token_type_ids" + at + "[" + std::to_string(j) + "] = " + std::to_string(row.types[j]) +
          (meta.type_vocab_size == 0 ? std::string(", but the model takes no token types (only 0)")
                                     : " is out of range [0, " + std::to_string(meta.type_vocab_size) + ")")};
    }
  }
  return row;
}

// "this model serves a, b" (or that none is loaded yet).
std::string adapter_list(const Metadata& meta) {
  std::string names;
  for (const auto& name : meta.adapters) {
    names += (names.empty() ? "" : ", ") + name;
  }
  return names.empty() ? "no adapter is loaded" : "this model serves " + names;
}

// The index of the adapter a request names; a model without several adapters takes no "adapter".
int64_t adapter_index(const jsonl::Value& value, const Metadata& meta) {
  if (!meta.indexed()) {
    throw BadRequest{
        "unknown key \"adapter\": this model was exported with one adapter (export with several "
        "--adapter to serve several)"};
  }
  const auto* name = value.get<std::string>();
  if (name == nullptr) {
    throw BadRequest{"\"adapter\" must be an adapter's name (a string)"};
  }
  const auto at = std::find(meta.adapters.begin(), meta.adapters.end(), *name);
  if (at == meta.adapters.end()) {
    std::string shown = name->substr(0, 64);
    throw BadRequest{
        "unknown adapter \"" + shown + (name->size() > 64 ? "...\"" : "\"") + " (" + adapter_list(meta) + ")"};
  }
  return static_cast<int64_t>(at - meta.adapters.begin());
}

void read_rows(const jsonl::Object& doc, const Metadata& meta, Request& req) {
  const jsonl::Value* ids = nullptr;
  const jsonl::Value* mask = nullptr;
  const jsonl::Value* types = nullptr;
  for (const auto& [key, value] : doc) {
    const bool given = !value.is_null();  // null: the default
    if (key == "input_ids") {
      ids = &value;
    } else if (key == "attention_mask") {
      mask = given ? &value : nullptr;
    } else if (key == "token_type_ids") {
      types = given ? &value : nullptr;
    } else if (key == "adapter") {
      req.adapter = adapter_index(value, meta);
    } else if (key != "id") {
      throw BadRequest{
          "unknown key \"" + key + "\" (expected id, input_ids, attention_mask, token_type_ids" +
          (meta.indexed() ? ", adapter)" : ")")};
    }
  }
  if (meta.indexed() && req.adapter < 0) {
    throw BadRequest{"missing \"adapter\": name the adapter that answers the request (" + adapter_list(meta) + ")"};
  }
  if (ids == nullptr) {
    throw BadRequest{"missing input_ids"};
  }
  if (!is_array(*ids)) {
    throw BadRequest{"input_ids must be an array of integers, or of arrays of integers for a batch"};
  }
  if (array_size(*ids) == 0) {
    throw BadRequest{"input_ids is empty"};
  }
  const auto* rows = ids->get<jsonl::Array>();  // null: an array of integers, one sentence
  req.batch = rows != nullptr && is_array(rows->front());
  if (!req.batch) {
    req.rows.push_back(make_row(*ids, mask, types, "", meta));
    return;
  }
  const size_t n = rows->size();
  if (n > kMaxRequestRows) {
    throw BadRequest{
        "input_ids holds " + std::to_string(n) + " sentences, more than " + std::to_string(kMaxRequestRows) +
        " per request; split the batch"};
  }
  auto rows_of = [n](const jsonl::Value* v, const char* key) -> const jsonl::Array* {
    if (v == nullptr) {
      return nullptr;
    }
    if (!is_array(*v) || array_size(*v) != n) {
      throw BadRequest{std::string(key) + " must be an array of " + std::to_string(n) + " rows, like input_ids"};
    }
    const auto* array = v->get<jsonl::Array>();
    if (array == nullptr) {  // integers where rows belong
      throw BadRequest{std::string(key) + "[0] must be an array of integers"};
    }
    return array;
  };
  const auto* mask_rows = rows_of(mask, "attention_mask");
  const auto* type_rows = rows_of(types, "token_type_ids");
  size_t tokens = 0;
  for (size_t i = 0; i < n; ++i) {
    tokens += array_size((*rows)[i]);
    if (tokens > kMaxRequestTokens) {
      throw BadRequest{
          "input_ids holds more than " + std::to_string(kMaxRequestTokens) + " tokens in one request; split the batch"};
    }
  }
  req.rows.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    req.rows.push_back(make_row(
        (*rows)[i], mask_rows ? &(*mask_rows)[i] : nullptr, type_rows ? &(*type_rows)[i] : nullptr,
        "[" + std::to_string(i) + "]", meta));
  }
}

Request parse_request(const std::string& line, size_t line_no, const Metadata& meta) {
  Request req;
  req.line = line_no;
  jsonl::Value doc;
  jsonl::Budget budget{kMaxParsedBytes};
  try {
    doc = jsonl::parse(line, kMaxJsonDepth, &budget);
  } catch (const jsonl::ParseError& e) {
    req.error = e.what();
    return req;
  }
  req.bytes = budget.used;  // the id it keeps is part of it
  auto* object = std::get_if<jsonl::Object>(&doc.data);
  if (object == nullptr) {
    req.error = "a request must be a JSON object";
    return req;
  }
  const bool admin = std::any_of(object->begin(), object->end(), [](const auto& m) { return m.first == "admin"; });
  try {
    if (admin) {
      read_admin(*object, meta, req);
    } else {
      read_rows(*object, meta, req);
    }
  } catch (const BadRequest& e) {
    req.error = e.message;
    std::vector<Row>().swap(req.rows);
  }
  for (const auto& row : req.rows) {
    req.bytes += sizeof(Row) + 3 * (row.ids.size() * sizeof(int64_t) + 32) + 4 * meta.num_labels + 32;
  }
  for (auto& [key, value] : *object) {
    if (key == "id") {
      req.has_id = true;
      req.id = std::move(value);  // not copied: an id may be large
    }
  }
  return req;
}

// ---- running and answering

bool is_admin(const Request& req) {
  return !req.admin.empty() && req.error.empty();
}

class Server {
 public:
  Server(torch::jit::Module model, Metadata meta, size_t batch_size)
      : model_(std::move(model)), meta_(std::move(meta)), batch_size_(batch_size) {
    if (meta_.runtime_adapters) {
      try {
        tables_ = std::make_unique<runtime_adapters::Tables>(
            model_, runtime_adapters::parse_spec(nlohmann::json::parse(meta_.adapter_tables)));
      } catch (const std::exception& e) {
        throw Failure{"the model's adapter tables: " + runtime_adapters::brief(e)};
      }
    }
  }

  // Every adapter folder in dir (sorted by name; plain files and hidden folders skipped).
  void load_folder_of_adapters(const std::string& dir) {
    if (!tables_) {
      throw Failure{"--adapters: the model was not exported with --runtime-adapters (it has no adapter tables)"};
    }
    DIR* handle = ::opendir(dir.c_str());
    if (handle == nullptr) {
      throw Failure{"--adapters: cannot read the folder '" + dir + "'"};
    }
    std::vector<std::string> names;
    while (const dirent* item = ::readdir(handle)) {
      const std::string name = item->d_name;
      DIR* sub = name.empty() || name[0] == '.' ? nullptr : ::opendir((dir + "/" + name).c_str());
      if (sub != nullptr) {
        ::closedir(sub);
        names.push_back(name);
      }
    }
    ::closedir(handle);
    std::sort(names.begin(), names.end());
    for (const auto& name : names) {
      try {
        const auto loaded = tables_->load(dir + "/" + name, name);
        std::cerr << "sparseadapter_serve: loaded adapter " << name << " (" << loaded.bytes << " bytes)" << std::endl;
      } catch (const std::exception& e) {
        throw Failure{"--adapters: " + runtime_adapters::brief(e)};
      }
    }
    meta_.adapters = tables_->names();
  }

  void serve(int in_fd, int out_fd) {
    jsonl::LineReader reader(in_fd, kMaxLineBytes);
    std::vector<Request> round;
    std::string line;
    size_t line_no = 0;
    size_t sentences = 0;  // in the round being gathered
    size_t held = 0;       // bytes the round's requests hold
    auto take = [&](jsonl::LineReader::Got got) {
      ++line_no;
      if (got == jsonl::LineReader::Got::TooLong) {
        Request req;
        req.line = line_no;
        req.error = "line longer than " + std::to_string(kMaxLineBytes) + " bytes";
        round.push_back(std::move(req));
      } else if (line.find_first_not_of(" \t\r") != std::string::npos) {
        round.push_back(parse_request(line, line_no, meta_));
        sentences += round.back().rows.size();
        held += round.back().bytes;
      }
      if (line.capacity() > (1 << 20)) {
        std::string().swap(line);  // a long line's buffer is not kept for the short ones
      }
    };
    for (;;) {
      const auto got = reader.next(line, /*wait=*/true);
      if (got == jsonl::LineReader::Got::End) {
        return;
      }
      take(got);
      // Coalesce what is already waiting, never more: a live client is not kept waiting. An admin
      // line ends the round: the requests before it run with the adapters loaded before it.
      while (sentences < batch_size_ && round.size() < batch_size_ && held < kMaxRoundBytes &&
             (round.empty() || !is_admin(round.back()))) {
        const auto more = reader.next(line, /*wait=*/false);
        if (more == jsonl::LineReader::Got::NotReady || more == jsonl::LineReader::Got::End) {
          break;
        }
        take(more);
      }
      run(round);
      for (auto& req : round) {
        if (is_admin(req)) {
          administer(req);
        }
        jsonl::write_all(out_fd, answer(req));
      }
      round.clear();
      sentences = 0;
      held = 0;
    }
  }

 private:
  // Loads, unloads or lists; the outcome is the request's admin_answer or its error.
  void administer(Request& req) {
    std::string answer = ",\"admin\":";
    jsonl::write_string(answer, req.admin);
    try {
      if (req.admin == "load") {
        const auto loaded = tables_->load(req.admin_path, req.admin_name);
        answer += ",\"name\":";
        jsonl::write_string(answer, req.admin_name);
        answer += ",\"adapter_bytes\":" + std::to_string(loaded.bytes);
        std::cerr << "sparseadapter_serve: loaded adapter " << req.admin_name << " from " << req.admin_path << " ("
                  << loaded.bytes << " bytes)" << std::endl;
      } else if (req.admin == "unload") {
        tables_->unload(req.admin_name);
        answer += ",\"name\":";
        jsonl::write_string(answer, req.admin_name);
        std::cerr << "sparseadapter_serve: unloaded adapter " << req.admin_name << std::endl;
      }
      meta_.adapters = tables_->names();
      answer += ",\"ok\":true,\"adapters\":[";
      for (size_t i = 0; i < meta_.adapters.size(); ++i) {
        if (i > 0) answer += ',';
        jsonl::write_string(answer, meta_.adapters[i]);
      }
      answer += "],\"bytes\":" + std::to_string(tables_->held_bytes());
      req.admin_answer = std::move(answer);
    } catch (const std::exception& e) {
      req.error = runtime_adapters::brief(e);
    }
  }

  // Every valid sentence of the round, in chunks of at most batch_size_ per forward. When a forward
  // fails, the requests of its chunk run again one by one: a request fails only when it fails alone,
  // and one bad request does not fail the good ones batched with it.
  void run(std::vector<Request>& round) {
    std::vector<std::pair<Request*, Row*>> rows;
    for (auto& req : round) {
      for (auto& row : req.rows) {
        rows.emplace_back(&req, &row);
      }
    }
    for (size_t start = 0; start < rows.size(); start += batch_size_) {
      const size_t end = std::min(rows.size(), start + batch_size_);
      if (try_forward(rows, start, end, nullptr) || rows[start].first == rows[end - 1].first) {
        continue;  // done, or one request, whose error is set
      }
      // Again, each request on its own (its rows in this chunk; a request's other rows are in the
      // neighbouring chunks, and fail or pass with them).
      for (size_t i = start; i < end;) {
        size_t j = i;
        while (j < end && rows[j].first == rows[i].first) ++j;
        try_forward(rows, i, j, rows[i].first);
        i = j;
      }
    }
  }

  // forward() of rows [start, end), which hold one request when `only` is set. A failure is logged;
  // when the rows are one request's, it becomes that request's error. Returns success.
  bool try_forward(const std::vector<std::pair<Request*, Row*>>& rows, size_t start, size_t end, Request* only) {
    try {
      forward(rows, start, end);
      return true;
    } catch (const std::exception& e) {
      // TorchScript wraps what the model raised in a traceback ending with the exception itself:
      // the clients get that line, the operator's log (stderr) the whole text.
      const std::string text = brief(e);
      const bool single = only != nullptr || rows[start].first == rows[end - 1].first;
      if (!single) {
        std::cerr << "sparseadapter_serve: running the model failed on lines " << rows[start].first->line << "-"
                  << rows[end - 1].first->line << "; running them one by one:\n"
                  << text << std::endl;
        return false;
      }
      std::cerr << "sparseadapter_serve: running the model failed on line " << rows[start].first->line << ":\n"
                << text << std::endl;
      rows[start].first->error = "running the model failed: " + last_line(text);
      return false;
    }
  }

  void forward(const std::vector<std::pair<Request*, Row*>>& rows, size_t start, size_t end) {
    const auto n = static_cast<int64_t>(end - start);
    size_t longest = 0;
    for (size_t i = start; i < end; ++i) {
      longest = std::max(longest, rows[i].second->ids.size());
    }
    const auto length = static_cast<int64_t>(longest);
    torch::InferenceMode guard;
    const auto options = torch::TensorOptions().dtype(torch::kLong);
    auto ids = torch::full({n, length}, meta_.pad_token_id, options);
    auto mask = torch::zeros({n, length}, options);
    auto types = torch::zeros({n, length}, options);
    // Row by row into the padded [n, length] tensors.
    int64_t* ids_data = ids.data_ptr<int64_t>();
    int64_t* mask_data = mask.data_ptr<int64_t>();
    int64_t* types_data = types.data_ptr<int64_t>();
    auto adapters = torch::empty({meta_.indexed() ? n : 0}, options);  // each row's adapter
    int64_t* adapters_data = adapters.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
      const Row& row = *rows[start + static_cast<size_t>(i)].second;
      std::copy(row.ids.begin(), row.ids.end(), ids_data + i * length);
      std::copy(row.mask.begin(), row.mask.end(), mask_data + i * length);
      std::copy(row.types.begin(), row.types.end(), types_data + i * length);
      if (meta_.indexed()) {
        adapters_data[i] = rows[start + static_cast<size_t>(i)].first->adapter;
      }
    }
    const auto out =
        meta_.indexed() ? model_.forward({ids, mask, types, adapters}) : model_.forward({ids, mask, types});
    if (!out.isTensor()) {
      throw std::runtime_error("the model returned a " + out.tagKind() + ", expected a tensor of logits");
    }
    auto logits = out.toTensor();
    if (logits.dim() != 2 || logits.size(0) != n || logits.size(1) != meta_.num_labels || !logits.is_floating_point()) {
      throw std::runtime_error(
          "the model returned " + std::string(c10::toString(logits.scalar_type())) + " logits of shape " +
          c10::str(logits.sizes()) + ", expected floats of shape [" + std::to_string(n) + ", " +
          std::to_string(meta_.num_labels) + "]");
    }
    logits = logits.to(torch::kCPU, torch::kFloat).contiguous();
    const float* data = logits.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) {
      rows[start + static_cast<size_t>(i)].second->logits.assign(
          data + i * meta_.num_labels, data + (i + 1) * meta_.num_labels);
    }
  }

  std::string answer(const Request& req) const {
    std::string error = req.error;
    for (size_t i = 0; i < req.rows.size() && error.empty(); ++i) {
      const auto& logits = req.rows[i].logits;
      const auto bad = std::find_if(logits.begin(), logits.end(), [](float x) { return !std::isfinite(x); });
      if (bad != logits.end()) {
        error = std::string("the model produced a non-finite logit (") + (std::isnan(*bad) ? "nan" : "inf") + ")" +
                (req.batch ? " for input_ids[" + std::to_string(i) + "]" : "");
      }
    }
    std::string out = "{";
    if (req.has_id) {
      out += "\"id\":";
      jsonl::write(out, req.id);
      out += ',';
    }
    if (!error.empty()) {
      out += "\"line\":" + std::to_string(req.line) + ",\"error\":";
      jsonl::write_string(out, error);
      out += "}\n";
      return out;
    }
    if (!req.admin.empty()) {
      out += req.admin_answer.substr(1) + "}\n";  // less its leading comma
      return out;
    }
    // A key with one value for a single request, or the list of one value per sentence for a batch.
    auto per_sentence = [&](const char* single_key, const char* batch_key, auto&& write_one) {
      jsonl::write_string(out, req.batch ? batch_key : single_key);
      out += ':';
      if (req.batch) out += '[';
      for (size_t i = 0; i < req.rows.size(); ++i) {
        if (i > 0) out += ',';
        write_one(req.rows[i]);
      }
      if (req.batch) out += ']';
    };
    per_sentence("logits", "logits", [&](const Row& row) {
      out += '[';
      for (size_t k = 0; k < row.logits.size(); ++k) {
        if (k > 0) out += ',';
        write_float(out, row.logits[k]);
      }
      out += ']';
    });
    auto argmax = [](const Row& row) {
      return static_cast<size_t>(std::max_element(row.logits.begin(), row.logits.end()) - row.logits.begin());
    };
    out += ',';
    if (!meta_.classification) {
      per_sentence("score", "scores", [&](const Row& row) { write_float(out, row.logits[0]); });
    } else {
      per_sentence("label", "labels", [&](const Row& row) { out += std::to_string(argmax(row)); });
      if (!meta_.labels.empty()) {
        out += ',';
        per_sentence(
            "label_name", "label_names", [&](const Row& row) { jsonl::write_string(out, meta_.labels[argmax(row)]); });
      }
    }
    out += "}\n";
    return out;
  }

  // 9 significant digits: enough for every float32 to read back exactly.
  static void write_float(std::string& out, float x) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.9g", static_cast<double>(x));
    out += buf;
  }

  torch::jit::Module model_;
  Metadata meta_;
  size_t batch_size_;
  std::unique_ptr<runtime_adapters::Tables> tables_;  // a model exported with --runtime-adapters
};

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  try {
    opt = parse_options(argc, argv);
  } catch (const UsageError& e) {
    std::cerr << "sparseadapter_serve: error: " << e.message << "\n" << kUsage;
    return 2;
  }
  if (opt.help) {
    std::cout << kUsage;
    return 0;
  }
  std::signal(SIGPIPE, SIG_IGN);  // a client gone away is a write error, not a silent death
  try {
    if (opt.threads > 0) {
      at::set_num_threads(opt.threads);
    }
    Metadata meta;
    auto model = load_model(opt.model, meta);
    Server server(std::move(model), std::move(meta), static_cast<size_t>(opt.batch_size));
    if (!opt.adapters.empty()) {
      server.load_folder_of_adapters(opt.adapters);
    }
    server.serve(STDIN_FILENO, STDOUT_FILENO);
    return 0;
  } catch (const Failure& f) {
    std::cerr << "sparseadapter_serve: error: " << f.message << "\n";
  } catch (const std::exception& e) {
    std::cerr << "sparseadapter_serve: error: " << brief(e) << "\n";
  }
  return 1;
}
