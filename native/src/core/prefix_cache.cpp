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

PrefixCache::Hit PrefixCache::find(const int32_t* tokens, int max_positions, int block, bool count) {
  Hit hit;
  if (block < 1 || max_positions < block) return hit;
  const std::vector<uint64_t> keys = prefix_keys(tokens, max_positions, block);
  std::lock_guard<std::mutex> lock(mu_);
  if (count) ++stats_.lookups;
  for (int k = static_cast<int>(keys.size()); k >= 1; --k) {
    const Lru::iterator entry = holding(tokens, k * block, block, keys[k - 1]);
    if (entry == lru_.end()) continue;
    hit.source = entry->cache;
    hit.positions = k * block;
    lru_.splice(lru_.begin(), lru_, entry);  // iterators stay valid
    break;
  }
  return hit;
}

bool PrefixCache::copy_into(const Hit& hit, KVCache& cache, int had) noexcept {
  if (!hit.source || hit.positions <= had) return false;
  try {
    backend_.copy_kv(*hit.source, cache, hit.positions);
  } catch (...) {
    return false;
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (had == 0) ++stats_.hits;
  stats_.hit_positions += static_cast<uint64_t>(hit.positions - had);
  return true;
}

PrefixCache::Lru::iterator PrefixCache::holding(const int32_t* tokens, int positions, int block, uint64_t key) {
  auto [first, last] = index_.equal_range(key);
  for (auto it = first; it != last; ++it) {
    const Entry& e = *it->second;
    if (e.block == block && static_cast<int>(e.tokens.size()) >= positions &&
        std::memcmp(e.tokens.data(), tokens, static_cast<size_t>(positions) * sizeof(int32_t)) == 0)
      return it->second;
  }
  return lru_.end();  // none, or a hash collision
}

void PrefixCache::drop_covered(const int32_t* tokens, int positions, int block) {
  for (auto it = lru_.begin(); it != lru_.end();) {
    const auto next = std::next(it);
    if (it->block == block && static_cast<int>(it->tokens.size()) < positions &&
        std::memcmp(it->tokens.data(), tokens, it->tokens.size() * sizeof(int32_t)) == 0)
      drop(it, false);
    it = next;
  }
}

void PrefixCache::insert(const int32_t* tokens, int positions, int block, const KVCache& cache) noexcept {
  try {
    if (block < 1 || positions < block || positions % block != 0 || positions > cache.cached_until()) return;
    const uint64_t bytes = backend_.kv_cache_bytes(positions);
    if (bytes > capacity_) return;
    std::vector<uint64_t> keys = prefix_keys(tokens, positions, block);
    {
      std::lock_guard<std::mutex> lock(mu_);
      const Lru::iterator held = holding(tokens, positions, block, keys.back());
      if (held != lru_.end()) {
        lru_.splice(lru_.begin(), lru_, held);
        return;
      }
      // Room in the KV budget: entries may give theirs (those this one covers first), sequences not. When
      // even all of them would not make room, nothing is dropped.
      const uint64_t budget = backend_.kv_cache_budget_bytes();
      if (budget > 0) {
        const uint64_t live = backend_.kv_cache_live_bytes();
        if (live - std::min(live, stats_.bytes) + bytes > budget) return;
        if (live + bytes > budget) drop_covered(tokens, positions, block);
        while (!lru_.empty() && backend_.kv_cache_live_bytes() + bytes > budget) drop(std::prev(lru_.end()), true);
      }
    }
    // The copy, with no lock held: lookups go on meanwhile.
    std::shared_ptr<const KVCache> copy;
    try {
      std::unique_ptr<KVCache> made = backend_.make_kv_cache(positions, /*reclaim=*/false);
      backend_.copy_kv(cache, *made, positions);
      copy = std::move(made);
    } catch (...) {
      return;  // the budget was taken meanwhile, or the copy failed: nothing kept
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (holding(tokens, positions, block, keys.back()) != lru_.end()) return;  // kept by another meanwhile
    drop_covered(tokens, positions, block);
    while (!lru_.empty() && stats_.bytes + bytes > capacity_) drop(std::prev(lru_.end()), true);
    stats_.bytes += bytes;
    ++stats_.inserts;
    lru_.push_front(Entry{std::vector<int32_t>(tokens, tokens + positions), block, std::move(copy), std::move(keys)});
    const Lru::iterator entry = lru_.begin();
    for (uint64_t key : entry->keys) index_.emplace(key, entry);
  } catch (...) {
    // Caching is an optimisation: a failure (out of host memory) keeps nothing.
  }
}

void PrefixCache::prefilling(const void* owner, const int32_t* tokens, int positions, int block, int from) {
  std::lock_guard<std::mutex> lock(mu_);
  prefills_.push_back(Prefill{owner, std::vector<int32_t>(tokens, tokens + positions), block, from});
}

void PrefixCache::prefill_progress(const void* owner, int done) {
  std::lock_guard<std::mutex> lock(mu_);
  for (Prefill& p : prefills_)
    if (p.owner == owner) p.done = done;
}

void PrefixCache::prefill_ended(const void* owner) {
  std::lock_guard<std::mutex> lock(mu_);
  std::erase_if(prefills_, [owner](const Prefill& p) { return p.owner == owner; });
}

bool PrefixCache::awaits(const int32_t* tokens, int max_positions, int block, int have) const {
  std::lock_guard<std::mutex> lock(mu_);
  for (const Prefill& p : prefills_) {
    const int positions = static_cast<int>(p.tokens.size());
    // Not worth waiting for: an entry the capacity cannot hold, or more left to compute than on one's own.
    if (p.block != block || backend_.kv_cache_bytes(positions) > capacity_ || positions - p.done > max_positions - have)
      continue;
    // The whole blocks the two share.
    const int n = std::min(max_positions, static_cast<int>(p.tokens.size()));
    int shared = 0;
    while (shared + block <= n &&
           std::memcmp(p.tokens.data() + shared, tokens + shared, static_cast<size_t>(block) * sizeof(int32_t)) == 0)
      shared += block;
    if (shared > have) return true;
  }
  return false;
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
