// Hard-patch selection: the k highest scores of each row, by radix select (no sort).
//
// Order and ties (the order of a stable descending sort, which kernels/hard_patch_masking.py's reference
// uses): a higher score ranks first; equal scores rank by position, lower first; NaN ranks above +inf
// (as in torch.sort / torch.topk); -0.0 equals +0.0. The output is the selected positions of each row
// in ascending position order.
//
// One block of 256 threads per row. Scores map to 32-bit keys whose unsigned order is the float order
// (flip the sign bit of positives, all bits of negatives). Four passes of 8 bits find the key v of the k-th
// largest element: each pass histograms the digit of the keys that match the digits fixed so far (shared
// atomics), and a block-wide scan over the 256 bins, largest digit first, picks the bin where the count
// reaches the number still to take. Afterwards c_gt = k - need keys are > v and `need` more are taken from
// the keys == v, lowest positions first; one pass in position order with two block scans (rank among the
// ties, output slot) writes the positions. O(L) work per pass, L read 5 times (from L1/L2 after the first).
#include "common.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ uint32_t order_key(float f) {
  if (isnan(f)) return 0xffffffffu;  // one key for every NaN, above +inf (0xff800000)
  if (f == 0.f) f = 0.f;             // -0.0 -> +0.0
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Inclusive scan of v over the block (kThreads threads, all of which must call it); total = sum over the block.
__device__ __forceinline__ uint32_t block_inclusive_scan(uint32_t v, uint32_t* warp_totals, uint32_t& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const uint32_t n = __shfl_up_sync(ssl::kFullMask, v, offset);
    if (lane >= offset) v += n;
  }
  if (lane == 31) warp_totals[warp] = v;
  __syncthreads();
  uint32_t before = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const uint32_t t = warp_totals[w];
    before += w < warp ? t : 0u;
    total += t;
  }
  __syncthreads();  // warp_totals is reused by the next scan
  return v + before;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
row_topk_kernel(const T* __restrict__ scores, int64_t stride_b, int64_t stride_l, int64_t length, int64_t k,
                int64_t* __restrict__ out) {
  __shared__ uint32_t histogram[256];
  __shared__ uint32_t warp_totals[kWarps];
  __shared__ uint32_t chosen_prefix, chosen_need;
  const int tid = threadIdx.x;
  const T* row = scores + static_cast<int64_t>(blockIdx.x) * stride_b;
  int64_t* dst = out + static_cast<int64_t>(blockIdx.x) * k;

  uint32_t prefix = 0, prefix_mask = 0, need = static_cast<uint32_t>(k);
  for (int shift = 24; shift >= 0; shift -= 8) {
    histogram[tid] = 0;
    __syncthreads();
    for (int64_t i = tid; i < length; i += kThreads) {
      const uint32_t key = order_key(ssl::to_float(row[i * stride_l]));
      if ((key & prefix_mask) == prefix) atomicAdd(&histogram[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    const uint32_t digit = 255u - tid;  // thread 0 holds the largest digit
    const uint32_t here = histogram[digit];
    uint32_t total;
    const uint32_t inclusive = block_inclusive_scan(here, warp_totals, total);
    const uint32_t exclusive = inclusive - here;
    if (exclusive < need && inclusive >= need) {  // exactly one thread: the bin where the count reaches `need`
      chosen_prefix = prefix | (digit << shift);
      chosen_need = need - exclusive;
    }
    __syncthreads();
    prefix = chosen_prefix;
    need = chosen_need;
    prefix_mask |= 255u << shift;
  }

  // prefix is now the k-th largest key: take every key above it and the first `need` keys equal to it.
  uint32_t ties_before = 0, taken_before = 0;
  for (int64_t start = 0; start < length; start += kThreads) {
    const int64_t i = start + tid;
    const uint32_t key = i < length ? order_key(ssl::to_float(row[i * stride_l])) : 0u;
    const bool greater = i < length && key > prefix;
    const bool tie = i < length && key == prefix;
    uint32_t tie_total, taken_total;
    const uint32_t tie_incl = block_inclusive_scan(tie ? 1u : 0u, warp_totals, tie_total);
    const uint32_t tie_rank = ties_before + tie_incl - (tie ? 1u : 0u);  // ties before i, in position order
    const bool take = greater || (tie && tie_rank < need);
    const uint32_t take_incl = block_inclusive_scan(take ? 1u : 0u, warp_totals, taken_total);
    const uint32_t slot = taken_before + take_incl - (take ? 1u : 0u);
    if (take) dst[slot] = i;
    ties_before += tie_total;
    taken_before += taken_total;
  }
}

}  // namespace

extern "C" int ssl_row_topk(const void* scores, int dtype, int64_t stride_b, int64_t stride_l, int64_t batch,
                            int64_t length, int64_t k, int64_t* out, int device, void* stream) {
  SSL_GUARD(device);
  if (batch == 0 || k == 0) return 0;
  if (k > length || length > 0xffffffffLL) return static_cast<int>(cudaErrorInvalidValue);
  SSL_DISPATCH_FLOAT(dtype, T, {
    row_topk_kernel<T><<<static_cast<unsigned>(batch), kThreads, 0, SSL_STREAM(stream)>>>(
        static_cast<const T*>(scores), stride_b, stride_l, length, k, out);
  });
  return static_cast<int>(cudaGetLastError());
}
