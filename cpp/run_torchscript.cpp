// sparseadapter_run MODEL.pt INPUT.pt OUTPUT.pt
//
// Runs a TorchScript model that uses torch.ops.sparseadapter.* without Python: the ops come from
// linking libsparseadapter (its static initializers register them).
//
// Tensor files, chosen so neither side unpickles arbitrary objects:
//   INPUT.pt   either a TorchScript module whose attribute or buffer `x` is the input tensor
//              (torch.jit.script(holder).save(path) in Python), or a tensor written by
//              torch.save(tensor, path).
//   OUTPUT.pt  the output tensor in torch.save's format (torch::pickle_save); read it in Python with
//              torch.load(path, weights_only=True).
// The model runs on CPU. Exit codes: 0 ok, 1 failure (message on stderr), 2 bad usage.
#include <torch/script.h>
#include <torch/serialize.h>

#include <cstdio>
#include <exception>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

namespace {

struct Failure {
  std::string message;
};

// c10::Error::what() carries a C++ backtrace; the first line is the message a user needs.
std::string brief(const std::exception& e) {
  if (const auto* err = dynamic_cast<const c10::Error*>(&e)) {
    return err->what_without_backtrace();
  }
  return e.what();
}

std::vector<char> read_file(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw Failure{std::string("cannot open ") + what + " '" + path + "'"};
  }
  return std::vector<char>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void require_readable(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw Failure{std::string("cannot open ") + what + " '" + path + "' (missing or unreadable)"};
  }
}

torch::jit::Module load_model(const std::string& path) {
  require_readable(path, "model");
  try {
    auto model = torch::jit::load(path, torch::kCPU);
    model.eval();
    return model;
  } catch (const std::exception& e) {
    throw Failure{"'" + path + "' is not a loadable TorchScript model: " + brief(e)};
  }
}

at::Tensor load_input(const std::string& path) {
  require_readable(path, "input");
  std::string module_error;
  try {
    // A TorchScript holder module: the preferred format.
    auto holder = torch::jit::load(path, torch::kCPU);
    if (!holder.hasattr("x")) {
      throw Failure{"input '" + path + "' is a TorchScript module without an attribute 'x'"};
    }
    const auto x = holder.attr("x");
    if (!x.isTensor()) {
      throw Failure{"input '" + path + "': attribute 'x' is a " + x.tagKind() + ", not a tensor"};
    }
    return x.toTensor();
  } catch (const Failure&) {
    throw;
  } catch (const std::exception& e) {
    module_error = brief(e);
  }
  try {
    // Not a module: a tensor saved with torch.save. The C++ unpickler only builds tensors and
    // plain containers, never arbitrary Python objects.
    const auto bytes = read_file(path, "input");
    const auto value = torch::pickle_load(bytes);
    if (!value.isTensor()) {
      throw Failure{"input '" + path + "' holds a " + value.tagKind() + ", not a tensor"};
    }
    return value.toTensor();
  } catch (const Failure&) {
    throw;
  } catch (const std::exception& e) {
    throw Failure{
        "cannot read input '" + path + "' as a TorchScript module with attribute 'x' (" + module_error +
        ") nor as a tensor saved with torch.save (" + brief(e) + ")"};
  }
}

void write_output(const std::string& path, const at::Tensor& y) {
  // pickle_save writes torch.save's zip format; contiguous() drops views of larger storages.
  const auto bytes = torch::pickle_save(c10::IValue(y.contiguous()));
  // Write to a temporary name and rename, so a failed run never leaves a truncated output.
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) {
      throw Failure{"cannot write output '" + path + "'"};
    }
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.close();
    if (!out) {
      std::remove(tmp.c_str());
      throw Failure{"writing output '" + path + "' failed"};
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw Failure{"cannot move output into place at '" + path + "'"};
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: " << (argc > 0 ? argv[0] : "sparseadapter_run") << " MODEL.pt INPUT.pt OUTPUT.pt\n"
              << "  MODEL.pt   TorchScript model (torch.jit.script / torch.jit.trace, then .save)\n"
              << "  INPUT.pt   TorchScript module with tensor attribute 'x', or torch.save(tensor)\n"
              << "  OUTPUT.pt  written with the output tensor; read with "
                 "torch.load(path, weights_only=True)\n";
    return 2;
  }
  try {
    auto model = load_model(argv[1]);
    const auto x = load_input(argv[2]);
    at::Tensor y;
    try {
      torch::InferenceMode guard;
      const auto out = model.forward({x});
      if (!out.isTensor()) {
        throw Failure{"the model returned a " + out.tagKind() + ", expected one tensor"};
      }
      y = out.toTensor();
    } catch (const Failure&) {
      throw;
    } catch (const std::exception& e) {
      throw Failure{"running the model failed: " + brief(e)};
    }
    write_output(argv[3], y);
    return 0;
  } catch (const Failure& f) {
    std::cerr << "sparseadapter_run: error: " << f.message << "\n";
  } catch (const std::exception& e) {
    std::cerr << "sparseadapter_run: error: " << brief(e) << "\n";
  } catch (...) {
    std::cerr << "sparseadapter_run: error: unknown exception\n";
  }
  return 1;
}
