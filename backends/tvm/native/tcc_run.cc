// tcc-run: run a tcc bundle on inputs from .npy files, write its outputs as .npy files.
//
//   tcc-run [--bundle DIR] NAME=FILE.npy ... [-o OUTDIR]     (OUTDIR/<output name>.npy; default .)
//   tcc-run [--bundle DIR] --describe                         (the inputs and outputs it takes)
// DIR defaults to the bundle this binary lives in (its bin/..). Exit 0 on success, 2 on a usage error
// or bad input, 1 when the model fails; the message names the tcc_status code.
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "tcc.h"
#include "tcc_tool.h"

namespace {

const std::map<std::string, std::string> kDescr = {
    {"<f4", "float32"}, {"<f8", "float64"}, {"<f2", "float16"}, {"<i8", "int64"}, {"<i4", "int32"},
    {"<i2", "int16"}, {"|i1", "int8"}, {"|u1", "uint8"}, {"|b1", "bool"}, {"<u4", "uint32"}, {"<u8", "uint64"}};

struct Npy {
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<char> data;
};

std::string Field(const std::string& header, const std::string& key) {
  size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) throw std::runtime_error("no '" + key + "' in the .npy header");
  at = header.find(':', at) + 1;
  while (header[at] == ' ') ++at;
  size_t end = header[at] == '(' ? header.find(')', at) + 1 : header.find_first_of(",}", at);
  return header.substr(at, end - at);
}

Npy ReadNpy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  char magic[8];
  if (!f.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw std::runtime_error(path + " is not an .npy file");
  uint32_t hlen = 0;
  unsigned char b[4] = {0, 0, 0, 0};
  if (magic[6] == 1) {
    f.read(reinterpret_cast<char*>(b), 2);
    hlen = b[0] | b[1] << 8;
  } else {
    f.read(reinterpret_cast<char*>(b), 4);
    hlen = b[0] | b[1] << 8 | b[2] << 16 | uint32_t(b[3]) << 24;
  }
  std::string header(hlen, '\0');
  if (!f.read(&header[0], hlen)) throw std::runtime_error(path + ": short .npy header");
  std::string descr = Field(header, "descr");
  descr = descr.substr(1, descr.size() - 2);
  auto it = kDescr.find(descr);
  if (it == kDescr.end()) throw std::runtime_error(path + ": unsupported .npy dtype " + descr);
  if (Field(header, "fortran_order").find("False") == std::string::npos)
    throw std::runtime_error(path + " is in Fortran order: save it C-contiguous (numpy.ascontiguousarray)");
  Npy n;
  n.dtype = it->second;
  std::string shape = Field(header, "shape");
  std::istringstream ss(shape.substr(1, shape.size() - 2));
  std::string item;
  while (std::getline(ss, item, ','))
    if (item.find_first_not_of(' ') != std::string::npos) n.shape.push_back(std::stoll(item));
  f.seekg(0, std::ios::end);
  const std::streamoff end = f.tellg();
  const std::streamoff begin = (magic[6] == 1 ? 10 : 12) + hlen;
  n.data.resize(static_cast<size_t>(end - begin));
  f.seekg(begin);
  f.read(n.data.data(), n.data.size());
  return n;
}

const char* NpyDescr(const std::string& dtype) {
  for (const auto& [d, name] : kDescr)
    if (name == dtype) return d.c_str();
  return nullptr;
}

void WriteNpy(const std::string& path, const tcc_tensor& t, const void* data) {
  const char* descr = NpyDescr(t.dtype);
  if (!descr) throw std::runtime_error("cannot write dtype " + std::string(t.dtype) + " as .npy");
  std::string shape = "(";
  for (int i = 0; i < t.ndim; ++i) shape += std::to_string(t.shape[i]) + (t.ndim == 1 || i + 1 < t.ndim ? "," : "");
  shape += ")";
  std::string header = "{'descr': '" + std::string(descr) + "', 'fortran_order': False, 'shape': " + shape + ", }";
  header.append(64 - (10 + header.size() + 1) % 64, ' ');
  header += '\n';
  std::ofstream f(path, std::ios::binary);
  const uint16_t n = static_cast<uint16_t>(header.size());
  const char pre[10] = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0, static_cast<char>(n & 0xff), static_cast<char>(n >> 8)};
  f.write(pre, 10);
  f.write(header.data(), header.size());
  f.write(static_cast<const char*>(data), t.nbytes);
  if (!f) throw std::runtime_error("cannot write " + path);
}

}  // namespace

int main(int argc, char** argv) {
  std::string bundle = tcc_tool::DefaultBundle(argv[0]), outdir = ".";
  std::vector<std::pair<std::string, std::string>> feeds;
  bool describe = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--bundle" && i + 1 < argc) bundle = argv[++i];
    else if ((a == "-o" || a == "--output-dir") && i + 1 < argc) outdir = argv[++i];
    else if (a == "--describe") describe = true;
    else if (a == "-h" || a == "--help") {
      std::printf("usage: %s [--bundle DIR] NAME=FILE.npy ... [-o OUTDIR] | --describe\n", argv[0]);
      return 0;
    } else if (a.find('=') != std::string::npos) feeds.emplace_back(a.substr(0, a.find('=')), a.substr(a.find('=') + 1));
    else return tcc_tool::Usage(argv[0], "unexpected argument " + a, "[--bundle DIR] NAME=FILE.npy ... [-o OUTDIR]");
  }
  tcc_model* model = nullptr;
  if (tcc_status s = tcc_open(bundle.c_str(), &model)) return tcc_tool::Report(s);
  int rc = 0;
  if (describe) {
    for (int k = 0; k < 2; ++k) {
      const int n = k ? tcc_num_outputs(model) : tcc_num_inputs(model);
      for (int i = 0; i < n; ++i) {
        tcc_tensor t;
        (k ? tcc_output_info : tcc_input_info)(model, i, &t);
        std::printf("%s %s %s [", k ? "output" : "input", t.name, t.dtype);
        for (int d = 0; d < t.ndim; ++d) std::printf("%s%lld", d ? ", " : "", static_cast<long long>(t.shape[d]));
        std::printf("]\n");
      }
    }
    tcc_close(model);
    return 0;
  }
  try {
    std::vector<Npy> arrays;
    arrays.reserve(feeds.size());
    std::vector<tcc_tensor> inputs;
    for (const auto& [name, path] : feeds) {
      arrays.push_back(ReadNpy(path));
      const Npy& n = arrays.back();
      inputs.push_back(tcc_tensor{name.c_str(), n.dtype.c_str(), static_cast<int32_t>(n.shape.size()),
                                  n.shape.data(), const_cast<char*>(n.data.data()), n.data.size()});
      if (n.shape.empty()) inputs.back().shape = nullptr;
    }
    std::vector<tcc_tensor> outputs(tcc_num_outputs(model));
    std::vector<std::vector<char>> buffers(outputs.size());
    for (size_t i = 0; i < outputs.size(); ++i) {
      tcc_output_info(model, static_cast<int32_t>(i), &outputs[i]);
      buffers[i].resize(outputs[i].nbytes);
      outputs[i].data = buffers[i].data();
    }
    tcc_status s = tcc_run(model, inputs.data(), static_cast<int32_t>(inputs.size()), outputs.data(),
                           static_cast<int32_t>(outputs.size()));
    if (s) {
      rc = tcc_tool::Report(s);
    } else {
      for (const tcc_tensor& t : outputs) {
        WriteNpy(outdir + "/" + t.name + ".npy", t, t.data);
        std::printf("%s: %s [", t.name, t.dtype);
        for (int d = 0; d < t.ndim; ++d) std::printf("%s%lld", d ? ", " : "", static_cast<long long>(t.shape[d]));
        std::printf("] -> %s/%s.npy\n", outdir.c_str(), t.name);
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    rc = 2;
  }
  tcc_close(model);
  return rc;
}
