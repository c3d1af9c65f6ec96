// Prefix caching across requests for block-causal families (LLaDA2.x, SDAR): the keys and values of whole
// blocks that one request computed, kept for the next request whose tokens start the same way.
//
// Under block-causal attention with blocks of B aligned at position 0, the keys and values of the positions
// [0, kB) are a function of tokens[0, kB) alone: a later block never changes them. So a sequence whose
// prompt begins with the same k whole blocks as one seen before can copy those k blocks into its own cache
// and prefill only the rest of its prompt. With f32 caches the copy is exactly what its own prefill would
// have written, so the answer is the same token for token; with bf16 caches the rest of the prompt then
// attends the rounded keys of the copied blocks, as every later step of every sequence already does.
//
// Entries are whole-block prefixes of token sequences (a prompt's whole blocks after its prefill; a
// finished sequence's prompt and committed answer blocks, which the next turn of a chat starts with). A
// lookup takes the longest block prefix that any entry shares with the prompt. Each entry is its own
// KVCache (copy in, copy out: no cache is shared while a sequence writes it), made from the backend's KV
// budget. The bytes of all entries are bounded by the capacity; beyond it, and whenever a sequence's cache
// does not fit the budget (Backend::make_kv_cache calls the reclaimer), the least recently used entries
// are dropped. An entry that is a prefix of a newer one is dropped as the newer one covers it.
#pragma once
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "backend.h"

namespace vdiff {

struct PrefixCacheStats {
  uint64_t capacity_bytes = 0;
  uint64_t bytes = 0;  // held by the entries now
  int entries = 0;
  uint64_t lookups = 0;        // sequences that asked (prompts of at least one whole block)
  uint64_t hits = 0;           // of those, the ones that copied a prefix
  uint64_t hit_positions = 0;  // prompt positions copied instead of computed
  uint64_t inserts = 0;        // entries made
  uint64_t evictions = 0;      // entries dropped for room: the capacity or the KV budget
};

class PrefixCache {
 public:
  // capacity_bytes > 0. The backend must outlive the cache.
  PrefixCache(Backend& backend, uint64_t capacity_bytes);
  ~PrefixCache();
  PrefixCache(const PrefixCache&) = delete;
  PrefixCache& operator=(const PrefixCache&) = delete;

  // A found prefix: the entry's cache (kept alive by the pointer even if it is evicted meanwhile) and the
  // number of its leading positions that equal the prompt's (a multiple of the block; 0: nothing found).
  struct Hit {
    std::shared_ptr<const KVCache> source;
    int positions = 0;
  };
  // The longest prefix tokens[0, kB) with kB <= max_positions (k >= 1) that an entry holds. `count`: a
  // sequence's first lookup (the stats count lookups per sequence).
  Hit find(const int32_t* tokens, int max_positions, int block, bool count = true);
  // Copies the hit's positions into `cache` (made by the same backend) and marks them cached there; counts
  // the hit. False, with nothing counted, when the copy failed (the sequence then prefills them). Never
  // throws.
  // `had`: positions the cache held already from an earlier copy (counted then).
  bool copy_into(const Hit& hit, KVCache& cache, int had = 0) noexcept;
  // Keeps a copy of cache's positions [0, positions) (a multiple of block, all cached), computed from
  // tokens[0, positions). Does nothing when an entry already holds that prefix, when it is larger than the
  // capacity, or when the KV budget cannot hold it even without the entries. Copies with no lock held
  // (lookups do not wait for it). Never throws.
  void insert(const int32_t* tokens, int positions, int block, const KVCache& cache) noexcept;
  // Drops the least recently used entry; false when there is none. For the backend's reclaimer.
  bool evict_one();

  // Prefills under way, so that sequences whose prompts start with the same blocks compute them once: a
  // sequence about to prefill tokens[0, positions) from `from` says so (owner: any address of its own),
  // reports its progress after each chunk, and says when it is done, failed or gone. Another, holding
  // `have` of its own first `max_positions`, waits (a step at a time, then finds the blocks here once they
  // are kept) when a prefill under way shares more whole blocks with it, will be kept (the capacity holds
  // it) and has no more left to compute than the waiter would compute itself.
  void prefilling(const void* owner, const int32_t* tokens, int positions, int block, int from);
  void prefill_progress(const void* owner, int done);
  void prefill_ended(const void* owner);
  bool awaits(const int32_t* tokens, int max_positions, int block, int have) const;
  PrefixCacheStats stats() const;

 private:
  struct Entry {
    std::vector<int32_t> tokens;
    int block = 0;
    std::shared_ptr<const KVCache> cache;
    std::vector<uint64_t> keys;  // the hash of each whole-block prefix, for the index
  };
  using Lru = std::list<Entry>;               // most recently used first
  void drop(Lru::iterator it, bool evicted);  // with mu_ held; evicted: for room (counted), not covered
  // With mu_ held: the entry holding tokens[0, positions) (keys: its block prefixes' hashes), or end().
  Lru::iterator holding(const int32_t* tokens, int positions, int block, uint64_t key);
  // With mu_ held: drops the entries whose tokens are a strict prefix of tokens[0, positions).
  void drop_covered(const int32_t* tokens, int positions, int block);

  Backend& backend_;
  const uint64_t capacity_;
  mutable std::mutex mu_;
  Lru lru_;
  struct Prefill {
    const void* owner;
    std::vector<int32_t> tokens;
    int block;
    int done;  // positions prefilled so far
  };
  std::vector<Prefill> prefills_;  // under way
  // Hash of a whole-block prefix -> the entries that hold a prefix with that hash.
  std::unordered_multimap<uint64_t, Lru::iterator> index_;
  PrefixCacheStats stats_;
};

}  // namespace vdiff
