// What tcc-run and tcc-generate share: the default bundle (the one the binary lives in) and how an
// error is reported (stderr "error (TCC_ERROR_...): message", exit 2 for bad input, 1 otherwise).
#pragma once
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "tcc.h"

namespace tcc_tool {

inline std::string DefaultBundle(const char* argv0) {
  std::string self = argv0;
  char buf[PATH_MAX];
  if (realpath(argv0, buf)) self = buf;
  const size_t slash = self.rfind('/');
  std::string bin = slash == std::string::npos ? "." : self.substr(0, slash);
  return bin + "/..";
}

inline const char* StatusName(tcc_status s) {
  switch (s) {
    case TCC_OK: return "TCC_OK";
    case TCC_ERROR_IO: return "TCC_ERROR_IO";
    case TCC_ERROR_CORRUPT: return "TCC_ERROR_CORRUPT";
    case TCC_ERROR_INVALID_ARGUMENT: return "TCC_ERROR_INVALID_ARGUMENT";
    case TCC_ERROR_UNSUPPORTED: return "TCC_ERROR_UNSUPPORTED";
    default: return "TCC_ERROR_RUNTIME";
  }
}

inline int Report(tcc_status s) {
  std::fprintf(stderr, "error (%s): %s\n", StatusName(s), tcc_last_error());
  return s == TCC_ERROR_RUNTIME ? 1 : 2;
}

inline int Usage(const char* argv0, const std::string& why, const char* usage) {
  std::fprintf(stderr, "error: %s\nusage: %s %s\n", why.c_str(), argv0, usage);
  return 2;
}

}  // namespace tcc_tool
