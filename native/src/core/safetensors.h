// Memory-mapped safetensors files: an 8-byte little-endian header length, a JSON header naming every
// tensor's dtype, shape and [begin, end) byte range in the data section, then the data. Everything is
// validated against the file size before a tensor is handed out; tensor data is never copied.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace vdiff {

// Every dtype the safetensors format defines (so that headers of real checkpoints parse); the model
// itself accepts only F32, BF16 and F16.
enum class DType { F32, BF16, F16, F64, I64, I32, I16, I8, U64, U32, U16, U8, Bool, F8_E4M3, F8_E5M2 };

const char* dtype_name(DType dtype);  // "F32", "BF16", ... as spelled in safetensors headers
size_t dtype_size(DType dtype);       // bytes per element

struct TensorView {
  std::string name;
  std::string file;  // the file it lives in (for error messages)
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const void* data = nullptr;  // points into the mapping; alignment is whatever the file gives
  uint64_t nbytes = 0;

  int64_t numel() const;
};

// One mapped file. The mapping lives as long as the object.
class SafetensorsFile {
 public:
  // Throws Error(InvalidModel) naming the path and the problem (missing, truncated, bad header,
  // unknown dtype, shape/size mismatch, out-of-range or overlapping data).
  static std::shared_ptr<SafetensorsFile> open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  const TensorView* find(const std::string& name) const;
  uint64_t file_size() const { return size_; }
  // The header's "__metadata__" (string values only; others are left out).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  uint64_t size_ = 0;
  std::map<std::string, TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
};

// The tensors of a model directory: <dir>/model.safetensors, or the shards named by the "weight_map" of
// <dir>/model.safetensors.index.json (which wins when both exist).
class TensorSet {
 public:
  static TensorSet load_dir(const std::string& dir);
  static TensorSet load_file(const std::string& path);

  const TensorView* find(const std::string& name) const;
  // Throws Error(InvalidModel) naming the tensor when it is absent.
  const TensorView& get(const std::string& name) const;
  const std::map<std::string, const TensorView*>& all() const { return tensors_; }
  const std::vector<std::shared_ptr<SafetensorsFile>>& files() const { return files_; }
  // The metadata value `key` of the file holding `tensor` ("" when absent).
  std::string metadata_of(const TensorView& tensor, const std::string& key) const;

 private:
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorView*> tensors_;  // points into files_
  std::string description_;                           // "<dir>/model.safetensors" or the index path, for messages
};

}  // namespace vdiff
