// Prefix caching across requests; prefix_cache.h has the rules.
#include "prefix_cache.h"

#include <algorithm>
#include <cstring>

#include "error.h"

namespace vdiff {

namespace {

// FNV-1a over the bytes of the tokens, continued block after block: keys[k - 1] names the prefix of k
// whole blocks. The block length is the seed, so prefixes cut into other blocks never collide by design.
std::vector<uint64_t> prefix_keys(const int32_t* tokens, int positions, int block) {
  std::vector<uint64_t> keys;
  uint64_t h = 1469598103934665603ull ^ static_cast<uint64_t>(block);
  for (int p = 0; p + block <= positions; p += block) {
    for (int i = p; i < p + block; ++i) {
      const auto t = static_cast<uint32_t>(tokens[i]);
      for (int b = 0; b < 4; ++b) h = (h ^ ((t >> (8 * b)) & 0xff)) * 1099511628211ull;
    }
    keys.push_back(h);
  }
  return keys;
}

}  // namespace

PrefixCache::PrefixCache(Backend& backend, uint64_t capacity_bytes) : backend_(backend), capacity_(capacity_bytes) {
  stats_.capacity_bytes = capacity_bytes;
}

PrefixCache::~PrefixCache() = default;

PrefixCache::Hit PrefixCache::find(const int32_t* tokens, int max_positions, int block) {
  Hit hit;
  if (block < 1 || max_positions < block) return hit;
  const std::vector<uint64_t> keys = prefix_keys(tokens, max_positions, block);
  std::lock_guard<std::mutex> lock(mu_);
  ++stats_.lookups;
  for (int k = static_cast<int>(keys.size()); k >= 1 && !hit.source; --k) {
    const int n = k * block;
    auto [first, last] = index_.equal_range(keys[k - 1]);
    for (auto it = first; it != last; ++it) {
      const Lru::iterator entry = it->second;
      if (entry->block != block || static_cast<int>(entry->tokens.size()) < n ||
          std::memcmp(entry->tokens.data(), tokens, static_cast<size_t>(n) * sizeof(int32_t)) != 0)
        continue;  // a hash collision
      hit.source = entry->cache;
      hit.positions = n;
      lru_.splice(lru_.begin(), lru_, entry);  // iterators stay valid
      break;
    }
  }
  if (hit.source) {
    ++stats_.hits;
    stats_.hit_positions += static_cast<uint64_t>(hit.positions);
  }
  return hit;
}

void PrefixCache::copy_into(const Hit& hit, KVCache& cache) {
  if (hit.source) backend_.copy_kv(*hit.source, cache, hit.positions);
}

void PrefixCache::insert(const int32_t* tokens, int positions, int block, const KVCache& cache) noexcept {
  try {
    if (block < 1 || positions < block || positions % block != 0 || positions > cache.cached_until()) return;
    const uint64_t bytes = backend_.kv_cache_bytes(positions);
    if (bytes > capacity_) return;
    std::vector<uint64_t> keys = prefix_keys(tokens, positions, block);
    std::lock_guard<std::mutex> lock(mu_);
    // Already held (an entry as long or longer starts with these tokens)?
    auto [first, last] = index_.equal_range(keys.back());
    for (auto it = first; it != last; ++it) {
      const Entry& e = *it->second;
      if (e.block == block && static_cast<int>(e.tokens.size()) >= positions &&
          std::memcmp(e.tokens.data(), tokens, static_cast<size_t>(positions) * sizeof(int32_t)) == 0) {
        lru_.splice(lru_.begin(), lru_, it->second);
        return;
      }
    }
    // Entries this one covers (their tokens are a prefix of these) go first: it holds all they hold.
    for (auto it = lru_.begin(); it != lru_.end();) {
      const auto next = std::next(it);
      if (it->block == block && static_cast<int>(it->tokens.size()) < positions &&
          std::memcmp(it->tokens.data(), tokens, it->tokens.size() * sizeof(int32_t)) == 0)
        drop(it, false);
      it = next;
    }
    while (!lru_.empty() && stats_.bytes + bytes > capacity_) drop(std::prev(lru_.end()), true);
    std::unique_ptr<KVCache> copy;
    for (;;) {
      try {
        copy = backend_.make_kv_cache(positions, /*reclaim=*/false);
        break;
      } catch (const Error& e) {
        // The budget is held by live sequences and older entries: older entries make room, sequences not.
        if (e.code() != ErrorCode::OutOfMemory || lru_.empty()) return;
        drop(std::prev(lru_.end()), true);
      }
    }
    backend_.copy_kv(cache, *copy, positions);
    lru_.push_front(Entry{std::vector<int32_t>(tokens, tokens + positions), block, std::move(copy), std::move(keys)});
    const Lru::iterator entry = lru_.begin();
    for (uint64_t key : entry->keys) index_.emplace(key, entry);
    stats_.bytes += bytes;
    ++stats_.inserts;
  } catch (...) {
    // Caching is an optimisation: a failed copy (out of memory, a device error) keeps nothing.
  }
}

bool PrefixCache::evict_one() {
  std::lock_guard<std::mutex> lock(mu_);
  if (lru_.empty()) return false;
  drop(std::prev(lru_.end()), true);
  return true;
}

void PrefixCache::drop(Lru::iterator entry, bool evicted) {
  for (uint64_t key : entry->keys) {
    auto [first, last] = index_.equal_range(key);
    for (auto it = first; it != last; ++it)
      if (it->second == entry) {
        index_.erase(it);
        break;
      }
  }
  stats_.bytes -= entry->cache->size();
  if (evicted) ++stats_.evictions;
  lru_.erase(entry);
}

PrefixCacheStats PrefixCache::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  PrefixCacheStats s = stats_;
  s.entries = static_cast<int>(lru_.size());
  return s;
}

}  // namespace vdiff
