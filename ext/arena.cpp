// krypton::arena_* — one reserved address range for the large CPU tensors of explain()'s batches.
//
// Why: a run allocates the same large tensors (stitched windows, conv outputs, occluded images) batch
// after batch. glibc either maps each fresh from the kernel and unmaps it when freed (every batch
// page-faults its tensors in again; expensive in virtual machines) or, told to keep freed blocks, places
// them over whatever free chunks earlier work left in its heap, so that identical requests peaked up to
// 1.7x apart (vgg16 at batch 139: 377-651 MB) and a memory budget could only be kept with a wide margin.
// Here every block of `min_bytes` or more allocated while a scope is open comes from one range, first fit
// in address order, freed blocks coalescing with their neighbours: batches reuse the same pages, and a
// run's peak depends only on its own sequence of allocations, not on the process's history. When the
// outermost scope closes, the free part of the range above its first `keep_bytes` goes back to the kernel
// (madvise MADV_DONTNEED); the free pages below stay resident for the next run, which would otherwise
// page-fault them in again (efficientnet_lite0 stride 16: ~18% of a request; resnet18 ~2%); keep_bytes 0
// gives every free page back. A measured peak (krypton.memory.PeakMemory) adds the kept pages that a run
// used again (counted since arena_mark(): the free pages then resident, by mincore, that a block of the run
// was then carved from, each page once): their RSS was already in the peak's base.
//
// The allocator is installed as torch's CPU allocator on the first scope and stays installed (a tensor
// allocated in a scope may be freed after it, through either deleter); outside scopes every request goes
// straight to the allocator it replaced. A block that does not fit the range comes from there too.
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <iterator>
#include <map>
#include <mutex>
#include <vector>

namespace krypton {
namespace {

constexpr size_t kCommitStep = size_t(64) << 20;

class Arena final : public c10::Allocator {
 public:
  static Arena& get() {  // never destroyed: torch may free tensors during static destruction
    static Arena* arena = new Arena;
    return *arena;
  }

  // Opens a scope; false (and nothing changes) where the range cannot be reserved.
  bool begin(int64_t min_bytes, int64_t keep_bytes) {
    std::lock_guard<std::mutex> guard(mu_);
    if (region_ == nullptr && !reserve()) return false;
    if (depth_++ == 0) {
      min_bytes_.store(static_cast<size_t>(std::max<int64_t>(min_bytes, 1)));
      keep_ = static_cast<size_t>(std::max<int64_t>(keep_bytes, 0)) / page_ * page_;
      high_water_ = top_;
      active_.store(true);
    }
    return true;
  }

  void end() {
    std::lock_guard<std::mutex> guard(mu_);
    if (depth_ == 0 || --depth_ > 0) return;
    active_.store(false);
    discard_free(keep_);
  }

  // Starts counting reused pages (one count at a time: a second mark restarts it).
  void mark() {
    std::lock_guard<std::mutex> guard(mu_);
    reused_ = 0;
    unclaimed_ = free_;
    if (touched_ > top_) unclaimed_[top_] = touched_ - top_;
  }

  // in use (bytes of live blocks), high water (end of the range's used part) since the outermost scope
  // opened, free blocks below it, reserved bytes, resident free bytes that blocks were carved from since
  // mark()
  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> guard(mu_);
    return {static_cast<int64_t>(in_use_), static_cast<int64_t>(high_water_),
            static_cast<int64_t>(free_.size()), static_cast<int64_t>(capacity_), static_cast<int64_t>(reused_)};
  }

  c10::DataPtr allocate(size_t n) override {
    if (!active_.load(std::memory_order_relaxed) || n < min_bytes_.load(std::memory_order_relaxed) ||
        n > capacity_) {
      return base_->allocate(n);
    }
    const size_t size = (n + page_ - 1) / page_ * page_;
    std::lock_guard<std::mutex> guard(mu_);
    size_t offset = take(size);
    if (offset == SIZE_MAX) return base_->allocate(n);
    claim(offset, size);
    used_[offset] = size;
    in_use_ += size;
    return {region_ + offset, region_ + offset, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  bool reserve() {
    // Address space for the whole physical memory (a batch can never need more; a quarter of an address
    // space limit at most), inaccessible and so not committed: `commit` opens it as the used part grows.
    page_ = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const long pages = sysconf(_SC_PHYS_PAGES);
    size_t want = pages > 0 ? static_cast<size_t>(pages) * page_ : (size_t(1) << 34);
    struct rlimit limit;
    if (getrlimit(RLIMIT_AS, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY) {
      want = std::min<size_t>(want, limit.rlim_cur / 4);
    }
    want = want / kCommitStep * kCommitStep;
    if (want == 0) return false;
    void* range = mmap(nullptr, want, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (range == MAP_FAILED) return false;
    region_ = static_cast<char*>(range);
    capacity_ = want;
    base_ = c10::GetCPUAllocator();
    c10::SetCPUAllocator(this, /*priority=*/255);
    return true;
  }

  // The offset of `size` free bytes (first fit, else the range's end), or SIZE_MAX.
  size_t take(size_t size) {
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->second < size) continue;
      const size_t offset = it->first, rest = it->second - size;
      free_.erase(it);
      if (rest > 0) free_[offset + size] = rest;
      return offset;
    }
    if (size > capacity_ - top_ || !commit(top_ + size)) return SIZE_MAX;
    const size_t offset = top_;
    top_ += size;
    high_water_ = std::max(high_water_, top_);
    touched_ = std::max(touched_, top_);
    return offset;
  }

  // Makes the range accessible up to `end` (in steps of kCommitStep; it stays so).
  bool commit(size_t end) {
    if (end <= committed_) return true;
    const size_t to = std::min(capacity_, (end + kCommitStep - 1) / kCommitStep * kCommitStep);
    if (mprotect(region_ + committed_, to - committed_, PROT_READ | PROT_WRITE) != 0) return false;
    committed_ = to;
    return true;
  }

  void give_back(size_t offset, size_t size) {
    if (!active_.load()) discard_above(offset, size, keep_);  // outside a scope: at once, above keep_
    auto next = free_.lower_bound(offset);
    if (next != free_.begin()) {
      auto prev = std::prev(next);
      if (prev->first + prev->second == offset) {
        offset = prev->first;
        size += prev->second;
        free_.erase(prev);
      }
    }
    if (next != free_.end() && offset + size == next->first) {
      size += next->second;
      free_.erase(next);
    }
    if (offset + size == top_) {
      top_ = offset;  // the pages stay resident until the scope ends, below keep_ after it (touched_)
    } else {
      free_[offset] = size;
    }
  }

  void discard(size_t offset, size_t size) {
    if (size > 0) madvise(region_ + offset, size, MADV_DONTNEED);
  }

  // Resident bytes of [offset, offset + size) (page-aligned, inside the committed part).
  size_t resident_bytes(size_t offset, size_t size) {
    const size_t pages = size / page_;
    if (pages == 0) return 0;
    residency_.resize(pages);
    if (mincore(region_ + offset, size, residency_.data()) != 0) return size;  // unknown: count it all
    size_t n = 0;
    for (unsigned char r : residency_) n += r & 1;
    return n * page_;
  }

  // A new block at [offset, offset + size): its pages that were free at mark() and are still resident
  // were kept from before the measured run; count them once and forget them.
  void claim(size_t offset, size_t size) {
    if (unclaimed_.empty()) return;
    const size_t end = offset + size;
    auto it = unclaimed_.upper_bound(offset);
    if (it != unclaimed_.begin()) --it;
    while (it != unclaimed_.end() && it->first < end) {
      const size_t lo = std::max(it->first, offset), hi = std::min(it->first + it->second, end);
      if (lo >= hi) {
        ++it;
        continue;
      }
      reused_ += resident_bytes(lo, hi - lo);
      const size_t first = it->first, last = it->first + it->second;
      it = unclaimed_.erase(it);
      if (first < lo) unclaimed_[first] = lo - first;
      if (hi < last) unclaimed_[hi] = last - hi;  // hi == end: the loop stops at it
    }
  }

  // The part of [offset, offset + size) at or above `from`.
  void discard_above(size_t offset, size_t size, size_t from) {
    const size_t start = std::max(offset, from);
    if (offset + size > start) discard(start, offset + size - start);
  }

  // Every free page at or above `from`: free blocks and the touched part beyond the used one.
  void discard_free(size_t from) {
    for (const auto& block : free_) discard_above(block.first, block.second, from);
    if (touched_ > top_) discard_above(top_, touched_ - top_, from);
    touched_ = std::max(top_, std::min(touched_, from));
  }

  static void release(void* ptr) {
    Arena& arena = get();
    char* p = static_cast<char*>(ptr);
    if (p == nullptr || arena.region_ == nullptr || p < arena.region_ || p >= arena.region_ + arena.capacity_) {
      arena.base_->raw_deleter()(ptr);  // a small block, or one from before the range: the base's own
      return;
    }
    std::lock_guard<std::mutex> guard(arena.mu_);
    const size_t offset = static_cast<size_t>(p - arena.region_);
    auto it = arena.used_.find(offset);
    TORCH_INTERNAL_ASSERT(it != arena.used_.end(), "krypton arena: freeing an unknown block");
    const size_t size = it->second;
    arena.used_.erase(it);
    arena.in_use_ -= size;
    arena.give_back(offset, size);
  }

  std::mutex mu_;
  std::atomic<bool> active_{false};
  c10::Allocator* base_ = nullptr;
  char* region_ = nullptr;
  size_t capacity_ = 0;
  std::atomic<size_t> min_bytes_{SIZE_MAX};
  size_t page_ = 4096;
  size_t committed_ = 0;   // the range is readable and writable below this
  size_t top_ = 0;         // end of the used part of the range
  size_t touched_ = 0;     // end of the part whose pages may be resident
  size_t keep_ = 0;        // free pages below this stay resident when the outermost scope closes
  size_t high_water_ = 0;  // the largest top_ since the outermost scope opened
  size_t in_use_ = 0;
  size_t reused_ = 0;                   // see mark() and claim()
  std::map<size_t, size_t> unclaimed_;  // the free part at mark() that no block has been carved from since
  std::vector<unsigned char> residency_;
  int depth_ = 0;
  std::map<size_t, size_t> free_;  // offset -> bytes, below top_, never adjacent
  std::map<size_t, size_t> used_;  // offset -> bytes
};

bool arena_begin(int64_t min_bytes, int64_t keep_bytes) { return Arena::get().begin(min_bytes, keep_bytes); }
void arena_end() { Arena::get().end(); }
void arena_mark() { Arena::get().mark(); }
std::vector<int64_t> arena_stats() { return Arena::get().stats(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(krypton, m) {
  m.def("arena_begin(int min_bytes, int keep_bytes) -> bool", &arena_begin);
  m.def("arena_end() -> ()", &arena_end);
  m.def("arena_mark() -> ()", &arena_mark);
  m.def("arena_stats() -> int[]", &arena_stats);
}

}  // namespace krypton
