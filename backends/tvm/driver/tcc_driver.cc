// tcc_driver: serve a TVM Relax VM model library over stdin/stdout (built for aarch64, run under qemu).
//
// Usage: tcc_driver MODEL_SO SPEC_FILE WEIGHTS_FILE
//
// SPEC_FILE holds one tensor per line, whitespace separated, in call order:
//   param  NAME DTYPE OFFSET NBYTES NDIM D0 D1 ...   (bytes at OFFSET of WEIGHTS_FILE)
//   input  NAME DTYPE OFFSET NBYTES NDIM D0 D1 ...   (bytes at OFFSET of each request's IN file)
//   output NAME DTYPE OFFSET NBYTES NDIM D0 D1 ...   (bytes written at OFFSET of each request's OUT file)
// DTYPE is a TVM dtype string ("float32", "int64", "bool"...). The Relax function "main" is called
// as main(inputs..., params...) and returns one tensor or a tuple of tensors, one per output line.
// Further functions (generation's prefill and decode) are described by lines whose NAME is FN/NAME:
//   tensor NAME ...     a stored tensor main does not take (bytes at OFFSET of WEIGHTS_FILE)
//   state  NAME ...     a tensor kept between calls, zero at the start and after "reset" (KV caches)
//   use    FN/NAME x 0 0 0   the next parameter of FN: the param or tensor NAME
//   input  FN/NAME ... / output FN/NAME ...   FN's inputs (read per call) and outputs
// FN is called as FN(inputs..., states..., its parameters...).
//
// Protocol: after loading the model and the parameters (once) the driver prints "ready". Then each
// stdin line "run IN_FILE OUT_FILE" reads the inputs, calls main, writes the outputs and prints "ok",
// or "error <message>" on one line; "call FN IN_FILE OUT_FILE" does the same for FN, and "reset"
// zeroes the states. EOF (or "quit") ends the process. Anything the libraries print
// on stdout is redirected to stderr so the protocol stream stays clean.
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

constexpr DLDevice kCPU{kDLCPU, 0};

struct Spec {
  std::string kind, name, dtype;
  long offset = 0;
  size_t nbytes = 0;
  std::vector<int64_t> shape;
};

// 64-byte aligned host memory, the alignment TVM-generated kernels assume.
struct AlignedAlloc {
  void AllocData(DLTensor* t) {
    size_t n = (ffi::GetDataSize(*t) + 63) / 64 * 64;
    t->data = std::aligned_alloc(64, n ? n : 64);
    if (!t->data) throw std::runtime_error("out of memory");
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

std::vector<Spec> ReadSpecs(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open spec file " + path);
  std::vector<Spec> specs;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    Spec s;
    int ndim = 0;
    if (!(ls >> s.kind)) continue;
    if (!(ls >> s.name >> s.dtype >> s.offset >> s.nbytes >> ndim)) throw std::runtime_error("bad spec line: " + line);
    s.shape.resize(ndim);
    for (auto& d : s.shape)
      if (!(ls >> d)) throw std::runtime_error("bad spec line: " + line);
    specs.push_back(s);
  }
  return specs;
}

std::string ShapeStr(const int64_t* shape, size_t ndim) {
  std::string s = "[";
  for (size_t i = 0; i < ndim; ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// A new tensor filled with spec.nbytes bytes read at spec.offset of the open file f.
ffi::Tensor ReadTensor(std::FILE* f, const Spec& s) {
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(AlignedAlloc(), ffi::ShapeView(s.shape.data(), s.shape.size()),
                                           ffi::StringToDLDataType(s.dtype), kCPU);
  if (ffi::GetDataSize(t.numel(), t.dtype()) != s.nbytes)
    throw std::runtime_error(s.kind + " " + s.name + ": " + std::to_string(s.nbytes) + " bytes do not fit " + s.dtype +
                             ShapeStr(s.shape.data(), s.shape.size()));
  if (std::fseek(f, s.offset, SEEK_SET) != 0 || std::fread(t.data_ptr(), 1, s.nbytes, f) != s.nbytes)
    throw std::runtime_error(s.kind + " " + s.name + ": short read");
  return t;
}

void WriteTensor(std::FILE* f, const Spec& s, const ffi::Tensor& t) {
  std::string got = std::string(ffi::DLDataTypeToString(t.dtype())) + ShapeStr(t.shape().data(), t.ndim());
  std::string want = s.dtype + ShapeStr(s.shape.data(), s.shape.size());
  if (got != want) throw std::runtime_error("output " + s.name + " is " + got + ", the manifest says " + want);
  if (t.device().device_type != kDLCPU || !t.IsContiguous())
    throw std::runtime_error("output " + s.name + " is not a contiguous CPU tensor");
  const char* data = static_cast<const char*>(t.data_ptr()) + t.byte_offset();
  if (std::fseek(f, s.offset, SEEK_SET) != 0 || std::fwrite(data, 1, s.nbytes, f) != s.nbytes)
    throw std::runtime_error("output " + s.name + ": short write");
}

struct File {
  std::FILE* f;
  File(const std::string& path, const char* mode) : f(std::fopen(path.c_str(), mode)) {
    if (!f) throw std::runtime_error("cannot open " + path);
  }
  ~File() { std::fclose(f); }
};

// The Relax VM of a library written by export_library, initialised on the CPU.
ffi::Module LoadVM(const std::string& model_so) {
  ffi::Module exec = ffi::Module::LoadFromFile(model_so);
  auto load = exec->GetFunction("vm_load_executable", true);
  if (!load) throw std::runtime_error(model_so + " is not a Relax VM library (no vm_load_executable)");
  ffi::Module vm = (*load)().cast<ffi::Module>();
  vm->GetFunction("vm_initialization", true).value()(static_cast<int>(kDLCPU), 0, /*pooled allocator*/ 2);
  return vm;
}

// One Relax function: its per-call inputs and outputs, and the stored tensors it takes after them.
struct Entry {
  ffi::Function fn;
  std::vector<Spec> inputs, outputs;
  std::vector<ffi::Tensor> params;
  bool takes_state = false;
};

class Model {
 public:
  Model(const std::string& model_so, const std::string& spec_file, const std::string& weights)
      : vm_(LoadVM(model_so)) {
    std::vector<Spec> stored, uses;
    for (Spec& s : ReadSpecs(spec_file)) {
      const size_t slash = s.name.find('/');
      const std::string fn = slash == std::string::npos ? "main" : s.name.substr(0, slash);
      if (slash != std::string::npos) s.name = s.name.substr(slash + 1);
      if (s.kind == "param" || s.kind == "tensor") stored.push_back(s);
      else if (s.kind == "state") states_.push_back(s);
      else if (s.kind == "use") uses.push_back(Spec{fn, s.name});
      else if (s.kind == "input") entries_[fn].inputs.push_back(s);
      else if (s.kind == "output") entries_[fn].outputs.push_back(s);
      else throw std::runtime_error("unknown spec kind " + s.kind);
    }
    File w(weights, "rb");
    std::map<std::string, ffi::Tensor> by_name;
    for (const Spec& s : stored) {
      by_name[s.name] = ReadTensor(w.f, s);
      if (s.kind == "param") entries_["main"].params.push_back(by_name[s.name]);
    }
    for (const Spec& u : uses) {  // u.kind holds the function's name
      auto it = by_name.find(u.name);
      if (it == by_name.end()) throw std::runtime_error("function " + u.kind + " uses unknown tensor " + u.name);
      entries_[u.kind].params.push_back(it->second);
      entries_[u.kind].takes_state = true;
    }
    for (auto& [name, e] : entries_) {
      auto fn = vm_->GetFunction(name, true);
      if (!fn) throw std::runtime_error("the model library has no Relax function '" + name + "'");
      e.fn = *fn;
    }
    for (const Spec& s : states_) {
      state_.push_back(ffi::Tensor::FromNDAlloc(AlignedAlloc(), ffi::ShapeView(s.shape.data(), s.shape.size()),
                                                ffi::StringToDLDataType(s.dtype), kCPU));
    }
    Reset();
  }

  void Reset() {
    for (ffi::Tensor& t : state_) std::memset(t.data_ptr(), 0, ffi::GetDataSize(t.numel(), t.dtype()));
  }

  void Run(const std::string& fn, const std::string& in_file, const std::string& out_file) {
    auto it = entries_.find(fn);
    if (it == entries_.end()) throw std::runtime_error("no function " + fn + " in the spec");
    const Entry& e = it->second;
    std::vector<ffi::Any> args;
    {
      File in(in_file, "rb");
      for (const Spec& s : e.inputs) args.push_back(ReadTensor(in.f, s));
    }
    if (e.takes_state)
      for (const ffi::Tensor& t : state_) args.push_back(t);
    for (const ffi::Tensor& w : e.params) args.push_back(w);
    std::vector<ffi::AnyView> views(args.begin(), args.end());
    ffi::Any result;
    e.fn.CallPacked(views.data(), static_cast<int32_t>(views.size()), &result);
    const std::vector<Spec>& outputs_ = e.outputs;

    std::vector<ffi::Tensor> outs;
    if (auto t = result.as<ffi::Tensor>()) {
      outs.push_back(*t);
    } else if (auto tup = result.as<ffi::Array<ffi::Any>>()) {
      for (const ffi::Any& item : *tup) {
        auto t = item.as<ffi::Tensor>();
        if (!t) throw std::runtime_error(fn + " returned a tuple holding a non-tensor " + item.GetTypeKey());
        outs.push_back(*t);
      }
    } else {
      throw std::runtime_error(fn + " returned " + result.GetTypeKey() + ", not a tensor or a tuple");
    }
    if (outs.size() != outputs_.size())
      throw std::runtime_error(fn + " returned " + std::to_string(outs.size()) + " outputs, the manifest lists " +
                               std::to_string(outputs_.size()));
    File out(out_file, "wb");
    for (size_t i = 0; i < outs.size(); ++i) WriteTensor(out.f, outputs_[i], outs[i]);
  }

 private:
  ffi::Module vm_;
  std::map<std::string, Entry> entries_;
  std::vector<Spec> states_;
  std::vector<ffi::Tensor> state_;
};

std::string OneLine(std::string s) {
  for (char& c : s)
    if (c == '\n' || c == '\r') c = ' ';
  return s;
}

std::string Describe(const std::exception& e) {
  if (auto* fe = dynamic_cast<const ffi::Error*>(&e)) return fe->kind() + ": " + fe->message();
  return e.what();
}

}  // namespace

int main(int argc, char** argv) {
  // Keep the protocol on a private stream; stray prints from libraries go to stderr.
  std::FILE* proto = fdopen(dup(STDOUT_FILENO), "w");
  dup2(STDERR_FILENO, STDOUT_FILENO);
  if (argc != 4) {
    std::fprintf(proto, "error usage: %s MODEL_SO SPEC_FILE WEIGHTS_FILE\n", argv[0]);
    return 2;
  }
  Model* model = nullptr;
  try {
    model = new Model(argv[1], argv[2], argv[3]);
  } catch (const std::exception& e) {
    std::fprintf(proto, "error loading %s: %s\n", argv[1], OneLine(Describe(e)).c_str());
    return 1;
  }
  std::fprintf(proto, "ready\n");
  std::fflush(proto);

  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream ls(line);
    std::string cmd, fn = "main", in_file, out_file;
    ls >> cmd;
    if (cmd == "quit") break;
    try {
      if (cmd == "reset") {
        model->Reset();
      } else {
        if (cmd == "call" && !(ls >> fn)) throw std::runtime_error("bad request: " + line);
        if ((cmd != "run" && cmd != "call") || !(ls >> in_file >> out_file))
          throw std::runtime_error("bad request: " + line);
        model->Run(fn, in_file, out_file);
      }
      std::fprintf(proto, "ok\n");
    } catch (const std::exception& e) {
      std::fprintf(proto, "error %s\n", OneLine(Describe(e)).c_str());
    }
    std::fflush(proto);
  }
  delete model;
  return 0;
}
