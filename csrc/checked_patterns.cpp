// The patterns whose structure a CPU op call has already checked, so that the next call with the same
// unchanged tensors skips the O(nnz) pass (a decoding step calls each adapter's op once per token with
// the same pattern: the pass cost as much as the one-token product).
//
// An entry is keyed by the two index tensors' TensorImpl addresses and the column bound, and holds
// what would differ if the tensors changed: the version counters (every in-place write through torch
// bumps them, views and detach() included), data pointers (set_, storage swaps), sizes and dtype.
// It holds weak references to the TensorImpls, so an address cannot be reused by a new tensor while
// its entry exists (a weak reference keeps the object's memory): an address match is the same
// tensor. Inference tensors carry no version counter and are checked on every call. Writes that
// bypass the version counter (through `.data`, numpy or raw pointers) are not seen; validate_csr
// checks a pattern whatever this cache holds.
//
// An entry also keeps what the CPU kernels derive from its pattern alone (pattern_derived_cpu: the
// column masks of the expansion, the bf16 kernel's pairs, the tile kernels' block orders), built at
// the first call that asks and dropped with the entry, so that a changed pattern is checked and
// derived again.
#include <c10/core/TensorImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "validation.h"

namespace sparseadapter {
namespace {

// Enough for every layer of a large model with several adapters; when full, the entries of freed
// tensors go first, then all of them (the next call of each pattern checks it again).
constexpr size_t kMaxEntries = 16384;

struct Key {
  const c10::TensorImpl* crow;
  const c10::TensorImpl* col;
  int64_t num_cols;
  bool operator==(const Key& other) const {
    return crow == other.crow && col == other.col && num_cols == other.num_cols;
  }
};

struct KeyHash {
  size_t operator()(const Key& k) const {
    const auto a = reinterpret_cast<uintptr_t>(k.crow);
    const auto b = reinterpret_cast<uintptr_t>(k.col);
    return std::hash<uintptr_t>()(a ^ (b * 0x9e3779b97f4a7c15ULL) ^ static_cast<uintptr_t>(k.num_cols));
  }
};

// What the check saw of one index tensor.
struct Seen {
  c10::weak_intrusive_ptr<c10::TensorImpl> impl;
  uint32_t version;
  const void* data;
  int64_t numel;
  at::ScalarType dtype;

  explicit Seen(const at::Tensor& t)
      : impl(t.getIntrusivePtr()),
        version(t.unsafeGetTensorImpl()->version_counter().current_version()),
        data(t.const_data_ptr()),
        numel(t.numel()),
        dtype(t.scalar_type()) {}

  bool still(const at::Tensor& t) const {
    return !impl.expired() && t.unsafeGetTensorImpl()->version_counter().current_version() == version &&
           t.const_data_ptr() == data && t.numel() == numel && t.scalar_type() == dtype;
  }
};

struct Derived {
  PatternDerivedKind kind;
  uint64_t variant;
  std::shared_ptr<const void> data;
};

struct Entry {
  Seen crow, col;
  std::vector<Derived> derived;  // a few per pattern: searched in order

  const Derived* find(PatternDerivedKind kind, uint64_t variant) const {
    for (const auto& d : derived) {
      if (d.kind == kind && d.variant == variant) return &d;
    }
    return nullptr;
  }
};

struct Cache {
  std::mutex mutex;
  std::unordered_map<Key, Entry, KeyHash> entries;
  std::atomic<int64_t> hits{0}, checks{0}, derived_builds{0};
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: ops may run during interpreter shutdown
  return *c;
}

// Tensors worth an entry whose changes the cache can see: with a version counter, in strided memory,
// and held by someone besides this call (a contiguous copy or a view made for one call never comes
// back, and an entry would only keep its memory).
bool trackable(const at::Tensor& t) {
  return !t.is_inference() && t.has_storage() && t.layout() == at::kStrided && t.use_count() > 1;
}

// The entry of these tensors if they have not changed since it was made, else null; c.mutex held.
Entry* unchanged_entry(Cache& c, const Key& key, const at::Tensor& crow_indices, const at::Tensor& col_indices) {
  const auto it = c.entries.find(key);
  return it != c.entries.end() && it->second.crow.still(crow_indices) && it->second.col.still(col_indices) ? &it->second
                                                                                                           : nullptr;
}

}  // namespace

void check_pattern_bounds_cpu_once(
    const char* op,
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices,
    int64_t num_cols,
    const char* num_cols_name) {
  auto& c = cache();
  const bool track = trackable(crow_indices) && trackable(col_indices);
  const Key key{crow_indices.unsafeGetTensorImpl(), col_indices.unsafeGetTensorImpl(), num_cols};
  if (track) {
    std::lock_guard<std::mutex> lock(c.mutex);
    const auto it = c.entries.find(key);
    if (it != c.entries.end()) {
      if (it->second.crow.still(crow_indices) && it->second.col.still(col_indices)) {
        c.hits.fetch_add(1, std::memory_order_relaxed);
        return;
      }
      c.entries.erase(it);  // changed: check again below
    }
  }
  c.checks.fetch_add(1, std::memory_order_relaxed);
  check_pattern_bounds_cpu(op, crow_indices, col_indices, num_cols, num_cols_name);  // raises when bad
  if (!track) {
    return;
  }
  std::lock_guard<std::mutex> lock(c.mutex);
  if (c.entries.size() >= kMaxEntries) {
    for (auto it = c.entries.begin(); it != c.entries.end();) {
      it = it->second.crow.impl.expired() || it->second.col.impl.expired() ? c.entries.erase(it) : std::next(it);
    }
    if (c.entries.size() >= kMaxEntries) {
      c.entries.clear();
    }
  }
  c.entries.insert_or_assign(key, Entry{Seen(crow_indices), Seen(col_indices)});
}

namespace {

// A group of patterns checked together (sparse_adapter_multi's concatenated arrays): keyed by the
// tensors' addresses and the sizes that split them per adapter, both compared whole.
struct GroupKey {
  std::vector<const c10::TensorImpl*> impls;
  std::vector<int64_t> sizes;
  bool operator==(const GroupKey& other) const { return impls == other.impls && sizes == other.sizes; }
};

struct GroupKeyHash {
  size_t operator()(const GroupKey& k) const {
    size_t h = k.impls.size();
    for (const auto* p : k.impls) {
      h = h * 0x9e3779b97f4a7c15ULL ^ reinterpret_cast<uintptr_t>(p);
    }
    for (const int64_t v : k.sizes) {
      h = h * 31 ^ static_cast<size_t>(v);
    }
    return h;
  }
};

struct GroupCache {
  std::mutex mutex;
  std::unordered_map<GroupKey, std::vector<Seen>, GroupKeyHash> entries;
};

GroupCache& group_cache() {
  static GroupCache* c = new GroupCache();  // never destroyed, as cache()
  return *c;
}

bool all_still(const std::vector<Seen>& seen, c10::ArrayRef<at::Tensor> tensors) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (!seen[i].still(tensors[i])) {
      return false;
    }
  }
  return true;
}

bool any_expired(const std::vector<Seen>& seen) {
  for (const auto& s : seen) {
    if (s.impl.expired()) {
      return true;
    }
  }
  return false;
}

}  // namespace

void check_patterns_cpu_once(
    c10::ArrayRef<at::Tensor> tensors,
    c10::ArrayRef<int64_t> sizes,
    const std::function<void()>& check) {
  auto& c = group_cache();
  bool track = true;
  for (const auto& t : tensors) {
    track = track && trackable(t);
  }
  GroupKey key;
  if (track) {
    key.impls.reserve(tensors.size());
    for (const auto& t : tensors) {
      key.impls.push_back(t.unsafeGetTensorImpl());
    }
    key.sizes.assign(sizes.begin(), sizes.end());
    std::lock_guard<std::mutex> lock(c.mutex);
    const auto it = c.entries.find(key);
    if (it != c.entries.end()) {
      if (all_still(it->second, tensors)) {
        cache().hits.fetch_add(1, std::memory_order_relaxed);
        return;
      }
      c.entries.erase(it);  // changed: check again below
    }
  }
  cache().checks.fetch_add(1, std::memory_order_relaxed);
  check();  // raises when bad
  if (!track) {
    return;
  }
  std::vector<Seen> seen;
  seen.reserve(tensors.size());
  for (const auto& t : tensors) {
    seen.emplace_back(t);
  }
  std::lock_guard<std::mutex> lock(c.mutex);
  if (c.entries.size() >= kMaxEntries) {
    for (auto it = c.entries.begin(); it != c.entries.end();) {
      it = any_expired(it->second) ? c.entries.erase(it) : std::next(it);
    }
    if (c.entries.size() >= kMaxEntries) {
      c.entries.clear();
    }
  }
  c.entries.insert_or_assign(std::move(key), std::move(seen));
}

std::shared_ptr<const void> pattern_derived_cpu(
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices,
    int64_t num_cols,
    PatternDerivedKind kind,
    uint64_t variant,
    const std::function<std::shared_ptr<const void>()>& build) {
  auto& c = cache();
  const bool track = trackable(crow_indices) && trackable(col_indices);
  const Key key{crow_indices.unsafeGetTensorImpl(), col_indices.unsafeGetTensorImpl(), num_cols};
  if (track) {
    std::lock_guard<std::mutex> lock(c.mutex);
    if (const Entry* entry = unchanged_entry(c, key, crow_indices, col_indices)) {
      if (const Derived* d = entry->find(kind, variant)) {
        return d->data;
      }
    }
  }
  // Built outside the lock (O(nnz)); two threads may both build it, the later one's is kept.
  auto built = build();
  c.derived_builds.fetch_add(1, std::memory_order_relaxed);
  if (track) {
    std::lock_guard<std::mutex> lock(c.mutex);
    Entry* entry = unchanged_entry(c, key, crow_indices, col_indices);  // only a checked pattern keeps it
    if (entry != nullptr && !entry->find(kind, variant)) {
      entry->derived.push_back(Derived{kind, variant, built});
    }
  }
  return built;
}

bool pattern_derived_kept_cpu(const at::Tensor& crow_indices, const at::Tensor& col_indices, int64_t num_cols) {
  if (!trackable(crow_indices) || !trackable(col_indices)) {
    return false;
  }
  auto& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  const Key key{crow_indices.unsafeGetTensorImpl(), col_indices.unsafeGetTensorImpl(), num_cols};
  return unchanged_entry(c, key, crow_indices, col_indices) != nullptr;
}

CheckedPatternStats checked_pattern_stats() {
  auto& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  auto& g = group_cache();
  std::lock_guard<std::mutex> group_lock(g.mutex);
  return {
      static_cast<int64_t>(c.entries.size() + g.entries.size()), c.hits.load(std::memory_order_relaxed),
      c.checks.load(std::memory_order_relaxed), c.derived_builds.load(std::memory_order_relaxed)};
}

}  // namespace sparseadapter
