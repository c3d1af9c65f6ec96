#include "cuda/cublas_loader.h"

#include <dlfcn.h>

#include <cstdlib>
#include <mutex>
#include <vector>

namespace vdiff::cuda {

namespace {

template <class F>
bool bind(void* lib, const char* name, F& f) {
  f = reinterpret_cast<F>(dlsym(lib, name));
  return f != nullptr;
}

Cublas g_cublas;
std::string g_reason;

void open_once() {
  const char* off = std::getenv("VDIFF_CUBLAS");
  if (off && std::string(off) == "0") {
    g_reason = "VDIFF_CUBLAS=0";
    return;
  }
  std::vector<std::string> candidates;
  if (const char* dir = std::getenv("VDIFF_CUBLAS_DIR"); dir && *dir)
    for (const char* v : {"13", "12"}) candidates.push_back(std::string(dir) + "/libcublas.so." + v);
  candidates.push_back("libcublas.so.13");
  candidates.push_back("libcublas.so.12");
  std::string tried;
  for (const std::string& path : candidates) {
    // cuBLAS needs cuBLASLt from the same folder: open it first, globally, when a folder is named.
    const size_t slash = path.rfind('/');
    if (slash != std::string::npos) {
      const std::string lt = path.substr(0, slash) + "/libcublasLt.so." + path.substr(path.rfind('.') + 1);
      dlopen(lt.c_str(), RTLD_NOW | RTLD_GLOBAL);
    }
    void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      const char* e = dlerror();
      tried += (tried.empty() ? "" : "; ") + (e ? std::string(e) : path);
      continue;
    }
    Cublas c;
    bool ok = bind(lib, "cublasCreate_v2", c.create) && bind(lib, "cublasDestroy_v2", c.destroy) &&
              bind(lib, "cublasSetStream_v2", c.set_stream) && bind(lib, "cublasGemmEx", c.gemm_ex);
    bind(lib, "cublasSetWorkspace_v2", c.set_workspace);
    if (!ok) {
      tried += (tried.empty() ? "" : "; ") + path + ": missing symbols";
      dlclose(lib);
      continue;
    }
    c.library = path;
    g_cublas = c;
    return;
  }
  g_reason = "cuBLAS not found (" + tried + ")";
}

}  // namespace

const Cublas* load_cublas(std::string* reason) {
  static std::once_flag once;
  std::call_once(once, open_once);
  if (g_cublas.loaded()) return &g_cublas;
  if (reason) *reason = g_reason;
  return nullptr;
}

}  // namespace vdiff::cuda
