// libtcc: the C API of tcc.h over the TVM Relax VM of a bundle's model.so.
//
// The bundle's tcc-bundle.spec (written by backends/tvm/bundle.py) holds one item per line:
//   sha256 RELPATH HEX                 a file checked at tcc_open
//   vocab V / context MAX_CONTEXT PREFILL_LEN / eos ID      (causal LMs)
//   param  NAME DTYPE OFFSET NBYTES NDIM D0 D1 ...   a parameter of main (bytes at OFFSET of the weights)
//   input  NAME ... / output NAME ...                main's inputs and outputs, in call order
//   tensor NAME ...     a stored tensor main does not take
//   state  NAME ...     a tensor kept between calls, zero at the start and after reset (KV caches)
//   use    FN/NAME x 0 0 0   the next parameter of FN (prefill, decode, verify, verify4): the param or tensor NAME
//   input  FN/NAME ... / output FN/NAME ...          FN's inputs and outputs
// main is called as main(inputs..., params...); FN as FN(inputs..., states..., its parameters...).
// (backends/tvm/driver/tcc_driver.cc, the qemu driver of tcc.load, reads the same line format.)
#include "tcc.h"

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <numeric>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

constexpr DLDevice kCPU{kDLCPU, 0};
thread_local std::string g_error;

struct Error : std::runtime_error {
  tcc_status code;
  Error(tcc_status c, const std::string& m) : std::runtime_error(m), code(c) {}
};

// ---- sha256 (FIPS 180-4) ---------------------------------------------------------------------------
class Sha256 {
 public:
  void Update(const unsigned char* p, size_t n) {
    total_ += n;
    while (n) {
      size_t take = std::min(n, size_t(64) - fill_);
      std::memcpy(buf_ + fill_, p, take);
      fill_ += take, p += take, n -= take;
      if (fill_ == 64) Block(buf_), fill_ = 0;
    }
  }
  std::string Hex() {
    uint64_t bits = total_ * 8;
    unsigned char pad = 0x80;
    Update(&pad, 1);
    unsigned char zero = 0;
    while (fill_ != 56) Update(&zero, 1);
    unsigned char len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(bits >> (56 - 8 * i));
    Update(len, 8);
    char out[65];
    for (int i = 0; i < 8; ++i) std::snprintf(out + 8 * i, 9, "%08x", h_[i]);
    return std::string(out, 64);
  }

 private:
  static uint32_t R(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }
  void Block(const unsigned char* p) {
    static const uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
    uint32_t w[64];
    for (int i = 0; i < 16; ++i)
      w[i] = uint32_t(p[4 * i]) << 24 | uint32_t(p[4 * i + 1]) << 16 | uint32_t(p[4 * i + 2]) << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = R(w[i - 15], 7) ^ R(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = R(w[i - 2], 17) ^ R(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6], h = h_[7];
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = h + (R(e, 6) ^ R(e, 11) ^ R(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
      uint32_t t2 = (R(a, 2) ^ R(a, 13) ^ R(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    h_[0] += a, h_[1] += b, h_[2] += c, h_[3] += d, h_[4] += e, h_[5] += f, h_[6] += g, h_[7] += h;
  }
  uint32_t h_[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  unsigned char buf_[64];
  size_t fill_ = 0;
  uint64_t total_ = 0;
};

std::string FileSha256(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw Error(TCC_ERROR_IO, "cannot open " + path);
  Sha256 h;
  std::vector<unsigned char> buf(1 << 20);
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), f)) > 0) h.Update(buf.data(), n);
  std::fclose(f);
  return h.Hex();
}

// ---- tensors -----------------------------------------------------------------------------------------
struct Spec {
  std::string kind, name, dtype;
  long offset = 0;
  size_t nbytes = 0;
  std::vector<int64_t> shape;
};

struct AlignedAlloc {  // 64-byte aligned host memory, the alignment TVM-generated kernels assume
  void AllocData(DLTensor* t) {
    size_t n = (ffi::GetDataSize(*t) + 63) / 64 * 64;
    t->data = std::aligned_alloc(64, n ? n : 64);
    if (!t->data) throw Error(TCC_ERROR_IO, "out of memory");
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

size_t Padded(size_t n) { return (n + 63) / 64 * 64; }

// Tensors carved from one private anonymous mapping, 64-byte aligned, with transparent huge pages asked
// for (madvise; the mapping is used from a 2 MiB boundary): a decode step streams every weight once, and
// with 4 KiB pages each page costs a TLB walk and stops the hardware prefetcher (tcc.load does the same:
// backends/tvm/session.py HostMemory). Zero until written; freed with the last tensor in it.
struct Mapping {
  static constexpr size_t kHuge = size_t(2) << 20;
  char* base = nullptr;
  size_t size = 0, next = 0;
  explicit Mapping(size_t n) : size(n + kHuge) {
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw Error(TCC_ERROR_IO, "out of memory");
#ifdef MADV_HUGEPAGE
    madvise(p, size, MADV_HUGEPAGE);  // a hint: where huge pages are off, ordinary pages
#endif
    base = static_cast<char*>(p);
    next = (kHuge - reinterpret_cast<uintptr_t>(p) % kHuge) % kHuge;
  }
  ~Mapping() { munmap(base, size); }
};

struct MappedAlloc {
  std::shared_ptr<Mapping> mapping;
  void AllocData(DLTensor* t) {
    const size_t n = Padded(ffi::GetDataSize(*t));
    if (mapping->next + n > mapping->size) throw Error(TCC_ERROR_IO, "tensor mapping too small");  // a bug, not input
    t->data = mapping->base + mapping->next;
    mapping->next += n;
  }
  void FreeData(DLTensor*) {}
};

ffi::Tensor Checked(ffi::Tensor t, const Spec& s) {
  if (ffi::GetDataSize(t.numel(), t.dtype()) != s.nbytes)
    throw Error(TCC_ERROR_CORRUPT, s.name + ": " + std::to_string(s.nbytes) + " bytes do not fit its dtype and shape");
  return t;
}

ffi::Tensor Empty(const Spec& s) {
  return Checked(ffi::Tensor::FromNDAlloc(AlignedAlloc(), ffi::ShapeView(s.shape.data(), s.shape.size()),
                                          ffi::StringToDLDataType(s.dtype), kCPU), s);
}

// The tensors of `specs` in one Mapping (zero until written).
std::vector<ffi::Tensor> Mapped(const std::vector<Spec>& specs) {
  size_t n = 0;
  for (const Spec& s : specs) n += Padded(s.nbytes);
  auto mapping = std::make_shared<Mapping>(n);
  std::vector<ffi::Tensor> out;
  for (const Spec& s : specs)
    out.push_back(Checked(ffi::Tensor::FromNDAlloc(MappedAlloc{mapping}, ffi::ShapeView(s.shape.data(), s.shape.size()),
                                                   ffi::StringToDLDataType(s.dtype), kCPU), s));
  return out;
}

std::string ShapeStr(const int64_t* shape, size_t ndim) {
  std::string s = "[";
  for (size_t i = 0; i < ndim; ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string Describe(const std::exception& e) {
  if (auto* fe = dynamic_cast<const ffi::Error*>(&e)) return fe->kind() + ": " + fe->message();
  return e.what();
}

struct Entry {  // one Relax function: its per-call inputs (bound tensors, refilled per call) and outputs
  ffi::Function fn;
  std::vector<Spec> inputs, outputs;
  std::vector<ffi::Tensor> input_tensors, params;
  bool takes_state = false;
};

}  // namespace

struct tcc_model {
  std::string dir;
  std::optional<ffi::Module> vm;
  std::map<std::string, Entry> entries;
  std::vector<Spec> states;
  std::vector<ffi::Tensor> state;
  std::vector<tcc_tensor> in_info, out_info;
  int64_t vocab = 0, max_context = 0, chunk = 0;
  std::map<std::string, std::pair<int64_t, int64_t>> ranges;  // integer inputs' valid values [lo, hi)
  std::vector<int64_t> eos, tokens;  // tokens: the sequence in the cache (a prefill near the end re-reads some)
  std::vector<float> scratch;
  std::vector<std::pair<int64_t, std::string>> verifies;  // (rows, entry): "verify" and "verify<N>", by rows

  Entry& Get(const std::string& fn) {
    auto it = entries.find(fn);
    if (it == entries.end()) throw Error(TCC_ERROR_UNSUPPORTED, "the model has no function " + fn);
    return it->second;
  }

  // Call `fn` on its bound inputs; outputs as tensors.
  std::vector<ffi::Tensor> Call(const std::string& name, Entry& e) {
    ffi::Any result;
    try {
      result = e.fn();
    } catch (const std::exception& ex) {
      throw Error(TCC_ERROR_RUNTIME, name + " failed: " + Describe(ex));
    }
    std::vector<ffi::Tensor> outs;
    if (auto t = result.as<ffi::Tensor>()) {
      outs.push_back(*t);
    } else if (auto tup = result.as<ffi::Array<ffi::Any>>()) {
      for (const ffi::Any& item : *tup) {
        auto t = item.as<ffi::Tensor>();
        if (!t) throw Error(TCC_ERROR_RUNTIME, name + " returned a non-tensor " + item.GetTypeKey());
        outs.push_back(*t);
      }
    } else {
      throw Error(TCC_ERROR_RUNTIME, name + " returned " + result.GetTypeKey() + ", not a tensor or a tuple");
    }
    if (outs.size() != e.outputs.size())
      throw Error(TCC_ERROR_RUNTIME, name + " returned " + std::to_string(outs.size()) + " outputs, the manifest lists " +
                                         std::to_string(e.outputs.size()));
    for (size_t i = 0; i < outs.size(); ++i) {
      const Spec& s = e.outputs[i];
      const ffi::Tensor& t = outs[i];
      std::string got = std::string(ffi::DLDataTypeToString(t.dtype())) + ShapeStr(t.shape().data(), t.ndim());
      std::string want = s.dtype + ShapeStr(s.shape.data(), s.shape.size());
      if (got != want) throw Error(TCC_ERROR_RUNTIME, "output " + s.name + " is " + got + ", the manifest says " + want);
      if (t.device().device_type != kDLCPU || !t.IsContiguous())
        throw Error(TCC_ERROR_RUNTIME, "output " + s.name + " is not a contiguous CPU tensor");
    }
    return outs;
  }

  // One generation step: ids [chunk or 1] at pos, logits of row `last` into `logits`.
  void Step(const std::string& fn, const int64_t* ids, int64_t n, int64_t pos, int64_t last, float* logits) {
    Entry& e = Get(fn);
    int64_t* dst = static_cast<int64_t*>(e.input_tensors[0].data_ptr());
    std::fill(dst, dst + e.input_tensors[0].numel(), 0);
    std::copy(ids, ids + n, dst);
    *static_cast<int64_t*>(e.input_tensors[1].data_ptr()) = pos;
    *static_cast<int64_t*>(e.input_tensors[2].data_ptr()) = last;
    std::vector<ffi::Tensor> outs = Call(fn, e);
    if (logits) {
      const char* data = static_cast<const char*>(outs[0].data_ptr()) + outs[0].byte_offset();
      std::memcpy(logits, data, sizeof(float) * vocab);
    }
  }

  void CheckTokens(const int64_t* ids, int64_t n) const {
    for (int64_t i = 0; i < n; ++i)
      if (ids[i] < 0 || ids[i] >= vocab)
        throw Error(TCC_ERROR_INVALID_ARGUMENT, "token id " + std::to_string(ids[i]) + " (at " + std::to_string(i) +
                                                    ") is outside the vocabulary of " + std::to_string(vocab));
  }
};

namespace {

std::vector<Spec> ReadSpecs(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw Error(TCC_ERROR_IO, "cannot open " + path + " (is this a tcc bundle?)");
  std::vector<Spec> specs;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    Spec s;
    if (!(ls >> s.kind)) continue;
    if (s.kind == "sha256" || s.kind == "vocab" || s.kind == "context" || s.kind == "eos" || s.kind == "cpu" ||
        s.kind == "range") {
      ls >> s.name >> s.dtype;
      int64_t hi = 0;
      if (s.kind == "range" && (ls >> hi)) s.shape = {std::stoll(s.dtype), hi};
      specs.push_back(s);
      continue;
    }
    int ndim = 0;
    if (!(ls >> s.name >> s.dtype >> s.offset >> s.nbytes >> ndim) || ndim < 0)
      throw Error(TCC_ERROR_CORRUPT, path + ": bad line: " + line);
    s.shape.resize(ndim);
    for (auto& d : s.shape)
      if (!(ls >> d)) throw Error(TCC_ERROR_CORRUPT, path + ": bad line: " + line);
    specs.push_back(s);
  }
  return specs;
}

// Whether /proc/cpuinfo lists `feature` ("flags" on x86); true where the file says nothing.
bool HostHas(const std::string& feature) {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("flags", 0) != 0) continue;
    std::istringstream ls(line.substr(line.find(':') + 1));
    std::string f;
    while (ls >> f)
      if (f == feature) return true;
    return false;
  }
  return true;
}

ffi::Module LoadVM(const std::string& model_so) {
  std::optional<ffi::Module> loaded;
  try {
    loaded = ffi::Module::LoadFromFile(model_so);
  } catch (const std::exception& e) {
    throw Error(TCC_ERROR_IO, "cannot load " + model_so + ": " + Describe(e));
  }
  ffi::Module exec = *loaded;
  auto load = exec->GetFunction("vm_load_executable", true);
  if (!load) throw Error(TCC_ERROR_CORRUPT, model_so + " is not a Relax VM library (no vm_load_executable)");
  ffi::Module vm = (*load)().cast<ffi::Module>();
  vm->GetFunction("vm_initialization", true).value()(static_cast<int>(kDLCPU), 0, /*pooled allocator*/ 2);
  return vm;
}

void Load(tcc_model* m) {
  // TVM sizes its thread pool at first use to half the cores (it assumes hyper-threading); use them all
  // as `tcc.load` does, unless the application set TVM_NUM_THREADS.
  if (!std::getenv("TVM_NUM_THREADS") && !std::getenv("OMP_NUM_THREADS")) {
    const long n = sysconf(_SC_NPROCESSORS_ONLN);
    setenv("TVM_NUM_THREADS", std::to_string(n > 0 ? n : 1).c_str(), 0);
  }
  std::vector<Spec> specs = ReadSpecs(m->dir + "/tcc-bundle.spec");
  std::string missing;
  for (const Spec& s : specs)
    if (s.kind == "cpu" && !HostHas(s.name)) missing += (missing.empty() ? "" : ", ") + s.name;
  if (!missing.empty())
    throw Error(TCC_ERROR_UNSUPPORTED, "the model was compiled for CPU features this CPU lacks: " + missing +
                                           " (compile it for a lower --target, e.g. x86-64-v2)");
  for (const Spec& s : specs) {
    if (s.kind != "sha256") continue;
    std::string got = FileSha256(m->dir + "/" + s.name);
    if (got != s.dtype)
      throw Error(TCC_ERROR_CORRUPT, m->dir + "/" + s.name + " does not match its sha256 in the manifest (corrupt or "
                                     "modified): export the bundle again");
  }
  m->vm = LoadVM(m->dir + "/lib/model.so");
  std::vector<Spec> stored, uses;
  for (Spec s : specs) {
    if (s.kind == "sha256" || s.kind == "cpu") continue;
    if (s.kind == "range") { m->ranges[s.name] = {s.shape[0], s.shape[1]}; continue; }
    if (s.kind == "vocab") { m->vocab = std::stoll(s.name); continue; }
    if (s.kind == "context") { m->max_context = std::stoll(s.name), m->chunk = std::stoll(s.dtype); continue; }
    if (s.kind == "eos") { m->eos.push_back(std::stoll(s.name)); continue; }
    const size_t slash = s.name.find('/');
    const std::string fn = slash == std::string::npos ? "main" : s.name.substr(0, slash);
    if (slash != std::string::npos) s.name = s.name.substr(slash + 1);
    if (s.kind == "param" || s.kind == "tensor") stored.push_back(s);
    else if (s.kind == "state") m->states.push_back(s);
    else if (s.kind == "use") uses.push_back(Spec{fn, s.name});
    else if (s.kind == "input") m->entries[fn].inputs.push_back(s);
    else if (s.kind == "output") m->entries[fn].outputs.push_back(s);
    else throw Error(TCC_ERROR_CORRUPT, "tcc-bundle.spec: unknown line kind " + s.kind);
  }
  const std::string weights = m->dir + "/weights.safetensors";
  std::FILE* w = std::fopen(weights.c_str(), "rb");
  if (!w) throw Error(TCC_ERROR_IO, "cannot open " + weights);
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> closer(w, std::fclose);
  std::map<std::string, ffi::Tensor> by_name;
  std::vector<ffi::Tensor> tensors = Mapped(stored);
  for (size_t i = 0; i < stored.size(); ++i) {
    const Spec& s = stored[i];
    ffi::Tensor t = tensors[i];
    if (std::fseek(w, s.offset, SEEK_SET) != 0 || std::fread(t.data_ptr(), 1, s.nbytes, w) != s.nbytes)
      throw Error(TCC_ERROR_CORRUPT, weights + ": short read of " + s.name);
    by_name[s.name] = t;
    if (s.kind == "param") m->entries["main"].params.push_back(t);
  }
  for (const Spec& u : uses) {  // u.kind holds the function's name
    auto it = by_name.find(u.name);
    if (it == by_name.end()) throw Error(TCC_ERROR_CORRUPT, "function " + u.kind + " uses unknown tensor " + u.name);
    m->entries[u.kind].params.push_back(it->second);
    m->entries[u.kind].takes_state = true;
  }
  for (const Spec& s : m->states) m->state.push_back(Empty(s));
  for (const ffi::Tensor& t : m->state) std::memset(t.data_ptr(), 0, ffi::GetDataSize(t.numel(), t.dtype()));
  // Each function is bound once to its argument tensors (the VM's save_function, as tcc.load does): a call
  // refills the input tensors in place and passes nothing.
  ffi::Function save = (*m->vm)->GetFunction("save_function", true).value();
  for (auto& [name, e] : m->entries) {
    if (!(*m->vm)->GetFunction(name, true))
      throw Error(TCC_ERROR_CORRUPT, "the model library has no Relax function '" + name + "'");
    for (const Spec& s : e.inputs) e.input_tensors.push_back(Empty(s));
    std::vector<ffi::AnyView> args;
    ffi::String fn_name(name), bound(name + "_bound");
    args.push_back(fn_name);
    args.push_back(bound);
    args.push_back(1);  // include_return
    for (const ffi::Tensor& t : e.input_tensors) args.push_back(t);
    if (e.takes_state)
      for (const ffi::Tensor& t : m->state) args.push_back(t);
    for (const ffi::Tensor& t : e.params) args.push_back(t);
    ffi::Any ignored;
    save.CallPacked(args.data(), static_cast<int32_t>(args.size()), &ignored);
    e.fn = (*m->vm)->GetFunction(name + "_bound", true).value();
  }
  auto info = [](const Spec& s) {
    return tcc_tensor{s.name.c_str(), s.dtype.c_str(), static_cast<int32_t>(s.shape.size()), s.shape.data(), nullptr,
                      s.nbytes};
  };
  Entry& main = m->Get("main");
  for (const Spec& s : main.inputs) m->in_info.push_back(info(s));
  for (const Spec& s : main.outputs) m->out_info.push_back(info(s));
  if (m->vocab) {
    for (const char* fn : {"prefill", "decode"}) {
      Entry& e = m->Get(fn);
      if (e.inputs.size() != 3 || e.outputs.size() != 1 || e.outputs[0].shape.back() != m->vocab ||
          e.inputs[0].shape.size() != 2 || e.inputs[0].shape[0] != 1)
        throw Error(TCC_ERROR_CORRUPT, std::string("tcc-bundle.spec: ") + fn + " is not (ids [1, L], pos, last) -> logits");
    }
    if (m->Get("prefill").inputs[0].shape[1] != m->chunk)
      throw Error(TCC_ERROR_CORRUPT, "tcc-bundle.spec: the prefill chunk does not match its input");
    for (auto& [name, e] : m->entries) {
      if (name.rfind("verify", 0) != 0) continue;
      const int64_t rows = e.inputs.empty() || e.inputs[0].shape.size() != 2 ? 0 : e.inputs[0].shape[1];
      if (e.inputs.size() != 3 || e.outputs.size() != 1 || rows < 1 || e.inputs[2].shape != std::vector<int64_t>{rows} ||
          e.outputs[0].shape != std::vector<int64_t>{1, rows, m->vocab})
        throw Error(TCC_ERROR_CORRUPT, "tcc-bundle.spec: " + name + " is not (ids [1, L], pos, last [L]) -> logits [1, L, V]");
      m->verifies.emplace_back(rows, name);
    }
    std::sort(m->verifies.begin(), m->verifies.end());
  }
}

tcc_status Fail(tcc_status code, const std::string& msg) {
  g_error = msg;
  for (char& c : g_error)
    if (c == '\n' || c == '\r') c = ' ';
  return code;
}

template <typename F>
tcc_status Guard(F&& f) {
  try {
    f();
    g_error.clear();
    return TCC_OK;
  } catch (const Error& e) {
    return Fail(e.code, e.what());
  } catch (const std::exception& e) {
    return Fail(TCC_ERROR_RUNTIME, Describe(e));
  } catch (...) {
    return Fail(TCC_ERROR_RUNTIME, "unknown error");
  }
}

void Need(bool ok, const std::string& msg) {
  if (!ok) throw Error(TCC_ERROR_INVALID_ARGUMENT, msg);
}

void NeedLM(const tcc_model* m) {
  Need(m != nullptr, "model is NULL");
  if (!m->vocab) throw Error(TCC_ERROR_UNSUPPORTED, "the model was compiled without generation (no prefill/decode)");
}

uint64_t Rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t Next(uint64_t* s) {  // xoshiro256**
  uint64_t result = Rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
  s[2] ^= s[0], s[3] ^= s[1], s[1] ^= s[2], s[0] ^= s[3], s[2] ^= t, s[3] = Rotl(s[3], 45);
  return result;
}

}  // namespace

extern "C" {

const char* tcc_last_error(void) { return g_error.c_str(); }
int32_t tcc_api_version(void) { return TCC_API_VERSION; }

tcc_status tcc_open(const char* bundle_dir, tcc_model** model) {
  if (model) *model = nullptr;
  return Guard([&] {
    Need(bundle_dir != nullptr && model != nullptr, "bundle_dir and model must not be NULL");
    auto m = std::make_unique<tcc_model>();
    m->dir = bundle_dir;
    Load(m.get());
    *model = m.release();
  });
}

void tcc_close(tcc_model* model) { delete model; }

int32_t tcc_num_inputs(const tcc_model* m) { return m ? static_cast<int32_t>(m->in_info.size()) : 0; }
int32_t tcc_num_outputs(const tcc_model* m) { return m ? static_cast<int32_t>(m->out_info.size()) : 0; }

tcc_status tcc_input_info(const tcc_model* m, int32_t i, tcc_tensor* info) {
  return Guard([&] {
    Need(m && info, "model and info must not be NULL");
    Need(i >= 0 && i < static_cast<int32_t>(m->in_info.size()), "input index " + std::to_string(i) + " out of range");
    *info = m->in_info[i];
  });
}

tcc_status tcc_output_info(const tcc_model* m, int32_t i, tcc_tensor* info) {
  return Guard([&] {
    Need(m && info, "model and info must not be NULL");
    Need(i >= 0 && i < static_cast<int32_t>(m->out_info.size()), "output index " + std::to_string(i) + " out of range");
    *info = m->out_info[i];
  });
}

tcc_status tcc_run(tcc_model* m, const tcc_tensor* inputs, int32_t n_inputs, tcc_tensor* outputs, int32_t n_outputs) {
  return Guard([&] {
    Need(m != nullptr, "model is NULL");
    Need(n_inputs >= 0 && n_outputs >= 0 && (inputs || !n_inputs) && (outputs || !n_outputs), "bad tensor arrays");
    Entry& e = m->Get("main");
    std::vector<bool> given(e.inputs.size(), false);
    for (int32_t k = 0; k < n_inputs; ++k) {
      const tcc_tensor& t = inputs[k];
      Need(t.name != nullptr, "input " + std::to_string(k) + " has no name");
      size_t i = 0;
      while (i < e.inputs.size() && e.inputs[i].name != t.name) ++i;
      std::string names;
      for (const Spec& s : e.inputs) names += (names.empty() ? "" : ", ") + s.name;
      Need(i < e.inputs.size(), std::string("unknown input '") + t.name + "' (the model takes " + names + ")");
      Need(!given[i], std::string("input '") + t.name + "' given twice");
      const Spec& s = e.inputs[i];
      std::string want = s.dtype + ShapeStr(s.shape.data(), s.shape.size());
      if (t.dtype) Need(s.dtype == t.dtype, std::string("input '") + t.name + "' is " + t.dtype + ", the model takes " + want);
      if (t.shape || t.ndim)
        Need(t.shape && ShapeStr(t.shape, t.ndim) == ShapeStr(s.shape.data(), s.shape.size()),
             std::string("input '") + t.name + "' has shape " + (t.shape ? ShapeStr(t.shape, t.ndim) : "NULL") +
                 ", the model takes " + want);
      Need(t.data != nullptr && t.nbytes == s.nbytes, std::string("input '") + t.name + "' has " +
                                                          std::to_string(t.nbytes) + " bytes, the model takes " +
                                                          std::to_string(s.nbytes) + " (" + want + ")");
      auto range = m->ranges.find(s.name);
      if (range != m->ranges.end() && (s.dtype == "int64" || s.dtype == "int32")) {
        const auto [lo, hi] = range->second;
        for (size_t j = 0; j < s.nbytes / (s.dtype == "int64" ? 8 : 4); ++j) {
          const int64_t v = s.dtype == "int64" ? static_cast<const int64_t*>(t.data)[j] : static_cast<const int32_t*>(t.data)[j];
          Need(v >= lo && v < hi, "input '" + s.name + "' holds " + std::to_string(v) + " at " + std::to_string(j) +
                                      ", outside [" + std::to_string(lo) + ", " + std::to_string(hi) + ")");
        }
      }
      given[i] = true;
    }
    for (size_t i = 0; i < given.size(); ++i) Need(given[i], "input '" + e.inputs[i].name + "' is missing");
    std::vector<int> where(n_outputs);
    for (int32_t k = 0; k < n_outputs; ++k) {
      Need(outputs[k].name != nullptr, "output " + std::to_string(k) + " has no name");
      size_t i = 0;
      while (i < e.outputs.size() && e.outputs[i].name != outputs[k].name) ++i;
      Need(i < e.outputs.size(), std::string("unknown output '") + outputs[k].name + "'");
      Need(outputs[k].data && outputs[k].nbytes >= e.outputs[i].nbytes,
           std::string("output '") + outputs[k].name + "' needs a buffer of " + std::to_string(e.outputs[i].nbytes) + " bytes");
      where[k] = static_cast<int>(i);
    }
    for (int32_t k = 0; k < n_inputs; ++k) {
      size_t i = 0;
      while (e.inputs[i].name != inputs[k].name) ++i;
      std::memcpy(e.input_tensors[i].data_ptr(), inputs[k].data, e.inputs[i].nbytes);
    }
    std::vector<ffi::Tensor> outs = m->Call("main", e);
    for (int32_t k = 0; k < n_outputs; ++k) {
      const ffi::Tensor& t = outs[where[k]];
      std::memcpy(outputs[k].data, static_cast<const char*>(t.data_ptr()) + t.byte_offset(), e.outputs[where[k]].nbytes);
      outputs[k].nbytes = e.outputs[where[k]].nbytes;
    }
  });
}

int32_t tcc_is_causal_lm(const tcc_model* m) { return m && m->vocab ? 1 : 0; }
int64_t tcc_vocab_size(const tcc_model* m) { return m ? m->vocab : 0; }
int64_t tcc_max_context(const tcc_model* m) { return m ? m->max_context : 0; }
int64_t tcc_position(const tcc_model* m) { return m ? static_cast<int64_t>(m->tokens.size()) : 0; }
int32_t tcc_num_eos(const tcc_model* m) { return m ? static_cast<int32_t>(m->eos.size()) : 0; }
int64_t tcc_eos(const tcc_model* m, int32_t i) {
  return m && i >= 0 && i < static_cast<int32_t>(m->eos.size()) ? m->eos[i] : -1;
}

tcc_status tcc_reset(tcc_model* m) {
  return Guard([&] {
    NeedLM(m);
    for (const ffi::Tensor& t : m->state) std::memset(t.data_ptr(), 0, ffi::GetDataSize(t.numel(), t.dtype()));
    m->tokens.clear();
  });
}

// Chunks as tcc.generation.prefill_chunks: from the first new position, `chunk` tokens at a time (the
// last one padded); a chunk that would run past the context starts earlier, re-reading cached tokens.
tcc_status tcc_prefill(tcc_model* m, const int64_t* ids, int64_t n, float* logits) {
  return Guard([&] {
    NeedLM(m);
    Need(ids != nullptr && n >= 1, "prefill takes at least one token");
    const int64_t have = static_cast<int64_t>(m->tokens.size());
    Need(have + n <= m->max_context, "the sequence would be " + std::to_string(have + n) +
                                         " tokens; the context holds " + std::to_string(m->max_context));
    m->CheckTokens(ids, n);
    std::vector<int64_t> all(m->tokens);
    all.insert(all.end(), ids, ids + n);
    const int64_t total = have + n;
    m->scratch.resize(m->vocab);
    for (int64_t begin = have; begin < total; begin += m->chunk) {
      const int64_t stop = std::min(begin + m->chunk, total);
      int64_t start = begin;
      if (start + m->chunk > m->max_context) start = std::max<int64_t>(0, std::min(start, m->max_context - m->chunk));
      m->Step("prefill", all.data() + start, stop - start, start, stop - start - 1, m->scratch.data());
      m->tokens.assign(all.begin(), all.begin() + stop);
    }
    if (logits) std::memcpy(logits, m->scratch.data(), sizeof(float) * m->vocab);
  });
}

tcc_status tcc_decode(tcc_model* m, int64_t token, float* logits) {
  return Guard([&] {
    NeedLM(m);
    const int64_t pos = static_cast<int64_t>(m->tokens.size());
    if (pos == 0) throw Error(TCC_ERROR_INVALID_ARGUMENT, "decode before prefill: the KV cache is empty");
    Need(pos < m->max_context, "position " + std::to_string(pos) + " is past the context of " +
                                   std::to_string(m->max_context));
    m->CheckTokens(&token, 1);
    m->Step("decode", &token, 1, pos, 0, logits);
    m->tokens.push_back(token);
  });
}

int64_t tcc_verify_len(const tcc_model* m) { return m && !m->verifies.empty() ? m->verifies.back().first : 0; }

tcc_status tcc_verify(tcc_model* m, const int64_t* ids, int64_t n, float* logits) {
  return Guard([&] {
    NeedLM(m);
    if (m->verifies.empty())
      throw Error(TCC_ERROR_UNSUPPORTED, "the model has no verify entry (compiled or bundled before speculative decoding "
                                         "reached bundles): compile and bundle it again");
    const int64_t most = m->verifies.back().first, pos = static_cast<int64_t>(m->tokens.size());
    Need(ids != nullptr && n >= 1 && n <= most, "verify takes 1 to " + std::to_string(most) + " tokens, got " + std::to_string(n));
    if (pos == 0) throw Error(TCC_ERROR_INVALID_ARGUMENT, "verify before prefill: the KV cache is empty");
    const auto& [rows, name] = *std::find_if(m->verifies.begin(), m->verifies.end(), [&](const auto& v) { return v.first >= n; });
    Need(pos + rows <= m->max_context, "a verify chunk of " + std::to_string(rows) + " positions at " + std::to_string(pos) +
                                          " runs past the context of " + std::to_string(m->max_context) +
                                          ": decode one token at a time near the end");
    m->CheckTokens(ids, n);
    Entry& e = m->Get(name);
    int64_t* dst = static_cast<int64_t*>(e.input_tensors[0].data_ptr());
    std::fill(dst, dst + rows, 0);
    std::copy(ids, ids + n, dst);
    *static_cast<int64_t*>(e.input_tensors[1].data_ptr()) = pos;
    int64_t* last = static_cast<int64_t*>(e.input_tensors[2].data_ptr());
    for (int64_t i = 0; i < rows; ++i) last[i] = i;
    std::vector<ffi::Tensor> outs = m->Call(name, e);
    if (logits)
      std::memcpy(logits, static_cast<const char*>(outs[0].data_ptr()) + outs[0].byte_offset(), sizeof(float) * m->vocab * n);
    m->tokens.insert(m->tokens.end(), ids, ids + n);
  });
}

tcc_status tcc_rewind(tcc_model* m, int64_t length) {
  return Guard([&] {
    NeedLM(m);
    const int64_t have = static_cast<int64_t>(m->tokens.size());
    Need(length >= 0 && length <= have, "cannot rewind to " + std::to_string(length) + " tokens: the sequence holds " +
                                            std::to_string(have));
    m->tokens.resize(length);
  });
}

tcc_status tcc_sampler_init(tcc_sampler* s, float temperature, int32_t top_k, float top_p, uint64_t seed) {
  return Guard([&] {
    Need(s != nullptr, "sampler is NULL");
    Need(temperature >= 0, "temperature must be >= 0 (0 is greedy)");
    Need(top_k >= 0, "top_k must be >= 0 (0 keeps every token)");
    Need(top_p > 0 && top_p <= 1, "top_p must be in (0, 1]");
    s->temperature = temperature, s->top_k = top_k, s->top_p = top_p;
    uint64_t x = seed;
    for (uint64_t& w : s->state) {  // splitmix64
      uint64_t z = (x += 0x9e3779b97f4a7c15ULL);
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
      w = z ^ (z >> 31);
    }
  });
}

// As tcc.generation.probabilities + sample (float64).
tcc_status tcc_sample(tcc_sampler* s, const float* logits, int64_t vocab, int64_t* token) {
  return Guard([&] {
    Need(s && logits && token && vocab >= 1, "sampler, logits and token must not be NULL, vocab_size >= 1");
    if (!(s->temperature > 0)) {
      *token = std::max_element(logits, logits + vocab) - logits;
      return;
    }
    std::vector<double> z(logits, logits + vocab);
    for (double& v : z) v /= s->temperature;
    if (s->top_k > 0 && s->top_k < vocab) {
      std::vector<double> sorted(z);
      std::nth_element(sorted.begin(), sorted.begin() + (vocab - s->top_k), sorted.end());
      const double kth = sorted[vocab - s->top_k];
      for (double& v : z)
        if (v < kth) v = -INFINITY;
    }
    const double mx = *std::max_element(z.begin(), z.end());
    double sum = 0;
    for (double& v : z) sum += (v = std::exp(v - mx));
    for (double& v : z) v /= sum;
    if (s->top_p < 1) {
      std::vector<int64_t> order(vocab);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return z[a] > z[b]; });
      double cum = 0;
      int64_t keep = 0;
      while (keep < vocab && (cum += z[order[keep]]) < s->top_p) ++keep;
      double kept = 0;
      for (int64_t i = 0; i < vocab; ++i)
        if (i > keep) z[order[i]] = 0;
        else kept += z[order[i]];
      for (double& v : z) v /= kept;
    }
    const double u = (Next(s->state) >> 11) * 0x1.0p-53;
    double cum = 0;
    int64_t pick = vocab - 1;
    for (int64_t i = 0; i < vocab; ++i)
      if (z[i] > 0 && (cum += z[i]) > u) { pick = i; break; }
    *token = pick;
  });
}

}  // extern "C"
