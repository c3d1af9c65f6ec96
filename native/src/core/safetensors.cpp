#include "safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "error.h"
#include "json.h"

namespace vdiff {

namespace {

// The reference implementation refuses headers above 100 MB; a larger one means a corrupt length.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

struct DTypeInfo {
  const char* name;
  DType dtype;
  size_t size;
};

constexpr DTypeInfo kDTypes[] = {
    {"F32", DType::F32, 4},   {"BF16", DType::BF16, 2},       {"F16", DType::F16, 2},         {"F64", DType::F64, 8},
    {"I64", DType::I64, 8},   {"I32", DType::I32, 4},         {"I16", DType::I16, 2},         {"I8", DType::I8, 1},
    {"U64", DType::U64, 8},   {"U32", DType::U32, 4},         {"U16", DType::U16, 2},         {"U8", DType::U8, 1},
    {"BOOL", DType::Bool, 1}, {"F8_E4M3", DType::F8_E4M3, 1}, {"F8_E5M2", DType::F8_E5M2, 1},
};

[[noreturn]] void invalid(const std::string& where, const std::string& what) {
  throw Error(ErrorCode::InvalidModel, where + ": " + what);
}

bool file_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) invalid(path, std::string("cannot open: ") + std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) invalid(path, "read error");
  return ss.str();
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

}  // namespace

const char* dtype_name(DType dtype) {
  for (const auto& d : kDTypes)
    if (d.dtype == dtype) return d.name;
  return "?";
}

size_t dtype_size(DType dtype) {
  for (const auto& d : kDTypes)
    if (d.dtype == dtype) return d.size;
  return 0;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;

  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) invalid(path, std::string("cannot open: ") + std::strerror(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    invalid(path, "not a regular file");
  }
  file->size_ = static_cast<uint64_t>(st.st_size);
  if (file->size_ < 8) {
    ::close(fd);
    invalid(path, "truncated: " + std::to_string(file->size_) + " bytes, shorter than the 8-byte header length");
  }
  void* map = ::mmap(nullptr, file->size_, PROT_READ, MAP_SHARED, fd, 0);
  int map_errno = errno;
  ::close(fd);  // the mapping keeps the file referenced
  if (map == MAP_FAILED) invalid(path, std::string("mmap failed: ") + std::strerror(map_errno));
  file->map_ = map;

  const auto* bytes = static_cast<const unsigned char*>(map);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];  // little-endian
  if (header_len > kMaxHeaderBytes)
    invalid(path, "header length " + std::to_string(header_len) + " is implausibly large (corrupt file?)");
  if (header_len > file->size_ - 8)
    invalid(path, "truncated: header length " + std::to_string(header_len) + " exceeds the " +
                      std::to_string(file->size_ - 8) + " bytes after the length field");

  Json header;
  try {
    header = Json::parse(std::string_view(reinterpret_cast<const char*>(bytes + 8), header_len));
  } catch (const JsonError& e) {
    invalid(path, std::string("bad header: ") + e.what());
  }
  if (!header.is_object())
    invalid(path, std::string("bad header: expected an object, got ") + Json::type_name(header.type()));

  const uint64_t data_start = 8 + header_len;
  const uint64_t data_size = file->size_ - data_start;
  struct Range {
    uint64_t begin, end;
    const std::string* name;
  };
  std::vector<Range> ranges;

  const auto& keys = header.keys();
  const auto& values = header.items();
  for (size_t t = 0; t < keys.size(); ++t) {
    const std::string& name = keys[t];
    const Json& entry = values[t];
    if (name == "__metadata__") {
      if (!entry.is_object()) invalid(path, "\"__metadata__\" is not an object");
      for (size_t m = 0; m < entry.keys().size(); ++m)
        if (entry.items()[m].is_string()) file->metadata_[entry.keys()[m]] = entry.items()[m].as_string();
      continue;
    }
    const std::string where = "tensor \"" + name + "\"";
    if (!entry.is_object()) invalid(path, where + ": expected an object");

    const Json* dtype = entry.find("dtype");
    if (!dtype || !dtype->is_string()) invalid(path, where + ": missing or non-string \"dtype\"");
    const DTypeInfo* info = nullptr;
    for (const auto& d : kDTypes)
      if (dtype->as_string() == d.name) info = &d;
    if (!info) invalid(path, where + ": unknown dtype \"" + dtype->as_string() + "\"");

    const Json* shape = entry.find("shape");
    if (!shape || !shape->is_array()) invalid(path, where + ": missing or non-array \"shape\"");
    TensorView view;
    view.name = name;
    view.file = path;
    view.dtype = info->dtype;
    // Element count with an overflow guard: no real tensor has more than 2^48 elements.
    uint64_t numel = 1;
    for (const Json& d : shape->items()) {
      if (!d.is_integer() || d.as_int64() < 0) invalid(path, where + ": shape entries must be non-negative integers");
      uint64_t dim = static_cast<uint64_t>(d.as_int64());
      if (dim > (1ull << 48) || (dim != 0 && numel > (1ull << 48) / dim))
        invalid(path, where + ": shape is implausibly large");
      numel *= dim;
      view.shape.push_back(static_cast<int64_t>(dim));
    }

    const Json* offsets = entry.find("data_offsets");
    if (!offsets || !offsets->is_array() || offsets->size() != 2 || !(*offsets)[0].is_integer() ||
        !(*offsets)[1].is_integer() || (*offsets)[0].as_int64() < 0 || (*offsets)[1].as_int64() < 0)
      invalid(path, where + ": \"data_offsets\" must be two non-negative integers");
    uint64_t begin = static_cast<uint64_t>((*offsets)[0].as_int64());
    uint64_t end = static_cast<uint64_t>((*offsets)[1].as_int64());
    if (end < begin)
      invalid(path, where + ": data_offsets end " + std::to_string(end) + " is before begin " + std::to_string(begin));
    uint64_t expected = numel * info->size;
    if (end - begin != expected)
      invalid(path, where + ": " + info->name + " " + shape_string(view.shape) + " needs " + std::to_string(expected) +
                        " bytes but data_offsets span " + std::to_string(end - begin));
    if (end > data_size)
      invalid(path, where + ": data ends at byte " + std::to_string(end) + " but the data section has only " +
                        std::to_string(data_size) + " bytes (truncated file?)");
    view.data = bytes + data_start + begin;
    view.nbytes = end - begin;
    auto [it, inserted] = file->tensors_.emplace(name, std::move(view));
    ranges.push_back({begin, end, &it->first});
  }

  // Two tensors sharing bytes would alias each other's weights: reject.
  std::sort(ranges.begin(), ranges.end(),
            [](const Range& a, const Range& b) { return a.begin != b.begin ? a.begin < b.begin : a.end < b.end; });
  const Range* previous = nullptr;
  for (const Range& r : ranges) {
    if (r.begin == r.end) continue;
    if (previous && r.begin < previous->end)
      invalid(path, "tensors \"" + *previous->name + "\" and \"" + *r.name + "\" overlap in the data section");
    previous = &r;
  }
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(map_, size_);
}

const TensorView* SafetensorsFile::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

TensorSet TensorSet::load_file(const std::string& path) {
  TensorSet set;
  set.description_ = path;
  set.files_.push_back(SafetensorsFile::open(path));
  for (const auto& [name, view] : set.files_.back()->tensors()) set.tensors_[name] = &view;
  return set;
}

TensorSet TensorSet::load_dir(const std::string& dir) {
  const std::string index_path = dir + "/model.safetensors.index.json";
  const std::string single_path = dir + "/model.safetensors";
  if (!file_exists(index_path)) {
    if (!file_exists(single_path))
      throw Error(ErrorCode::InvalidModel, dir + ": neither model.safetensors nor model.safetensors.index.json found");
    return load_file(single_path);
  }

  Json index;
  try {
    index = Json::parse(read_text_file(index_path));
  } catch (const JsonError& e) {
    invalid(index_path, e.what());
  }
  const Json* weight_map = index.is_object() ? index.find("weight_map") : nullptr;
  if (!weight_map || !weight_map->is_object()) invalid(index_path, "missing or non-object \"weight_map\"");

  TensorSet set;
  set.description_ = index_path;
  std::map<std::string, std::shared_ptr<SafetensorsFile>> shards;
  const auto& names = weight_map->keys();
  const auto& shard_names = weight_map->items();
  for (size_t i = 0; i < names.size(); ++i) {
    if (!shard_names[i].is_string()) invalid(index_path, "weight_map[\"" + names[i] + "\"] is not a string");
    const std::string& shard = shard_names[i].as_string();
    // Shards are plain file names next to the index; anything else could point outside the model.
    if (shard.empty() || shard.find('/') != std::string::npos || shard.find('\\') != std::string::npos ||
        shard == "." || shard == "..")
      invalid(index_path, "weight_map[\"" + names[i] + "\"] names \"" + shard + "\", which is not a plain file name");
    auto it = shards.find(shard);
    if (it == shards.end()) {
      it = shards.emplace(shard, SafetensorsFile::open(dir + "/" + shard)).first;
      set.files_.push_back(it->second);
    }
    const TensorView* view = it->second->find(names[i]);
    if (!view)
      invalid(index_path,
              "tensor \"" + names[i] + "\" is listed in shard \"" + shard + "\", which does not contain it");
    set.tensors_[names[i]] = view;
  }
  return set;
}

const TensorView* TensorSet::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : it->second;
}

std::string TensorSet::metadata_of(const TensorView& tensor, const std::string& key) const {
  for (const std::shared_ptr<SafetensorsFile>& f : files_) {
    const TensorView* own = f->find(tensor.name);
    if (own != &tensor) continue;
    const auto it = f->metadata().find(key);
    return it == f->metadata().end() ? std::string() : it->second;
  }
  return std::string();
}

const TensorView& TensorSet::get(const std::string& name) const {
  const TensorView* view = find(name);
  if (!view) throw Error(ErrorCode::InvalidModel, description_ + ": missing tensor \"" + name + "\"");
  return *view;
}

}  // namespace vdiff
