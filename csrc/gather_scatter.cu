// gather_tokens / scatter_tokens: row copies with 16-byte vectorised loads and stores.
//
// Gather:  out[b, k] = x[b, ids[b, k]].   Its backward is a scatter with zero fill (below).
// Scatter: out[b, l] = x_vis[b, inv[b, l]] if inv[b, l] >= 0 else fill, with inv the inverse map of ids
//          (position -> k, or -1 where masked; built by the caller), so every output row is written once,
//          in position order, with no atomics and no zero-initialisation pass.
// Scatter backward: dx_vis[b, k] = dout[b, ids[b, k]] (again one pass in position order through inv) and
//          dfill = sum of dout over the masked rows: per block an fp32 column sum over a fixed group of rows,
//          reduced across the block's thread rows in a fixed order; the caller sums the groups (deterministic).
//
// A copy moves bytes, whatever the dtype: each row is copied in units of the widest access (16, 8, 4 or 2
// bytes) that divides the row's size, both base pointers and the strides. 16 bytes whenever D * elem is a
// multiple of 16 and the tensors are 16-byte aligned (D = 768 or 1024 in any dtype); narrower otherwise.
// Threads: blockDim.x threads share a row (at most 32, so a warp covers 512 bytes per step), blockDim.y rows
// per block.
#include "common.cuh"

namespace {

using ssl::ceil_div;

template <typename U, typename Index, bool INVERSE>
__global__ void copy_rows_kernel(const U* __restrict__ src, const Index* __restrict__ index, const U* __restrict__ fill,
                                 U* __restrict__ out, int64_t num_rows, int64_t rows_per_batch, int64_t stride_b,
                                 int64_t stride_r, int64_t units) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= num_rows) return;
  const int64_t j = static_cast<int64_t>(index[row]);
  U* dst = out + row * units;
  if (INVERSE && j < 0) {  // a masked position: the fill (the mask token), or zeros for gather's backward
    for (int64_t u = threadIdx.x; u < units; u += blockDim.x) dst[u] = fill != nullptr ? fill[u] : U{};
    return;
  }
  const U* from = src + (row / rows_per_batch) * stride_b + j * stride_r;
  for (int64_t u = threadIdx.x; u < units; u += blockDim.x) dst[u] = from[u];
}

// The widest unit (16/8/4/2 bytes) dividing the row size, the strides and every pointer.
int copy_unit(int64_t row_bytes, int64_t stride_b_bytes, int64_t stride_r_bytes, const void* a, const void* b,
              const void* c) {
  for (int unit = 16; unit > 2; unit >>= 1) {
    if (row_bytes % unit == 0 && stride_b_bytes % unit == 0 && stride_r_bytes % unit == 0 &&
        ssl::aligned_to(a, unit) && ssl::aligned_to(b, unit) && (c == nullptr || ssl::aligned_to(c, unit)))
      return unit;
  }
  return 2;
}

template <typename U, typename Index, bool INVERSE>
int launch_copy(const void* src, int64_t stride_b, int64_t stride_r, const Index* index, const void* fill, void* out,
                int64_t num_rows, int64_t rows_per_batch, int64_t row_bytes, int elem_size, cudaStream_t stream) {
  constexpr int kUnit = static_cast<int>(sizeof(U));
  const int64_t units = row_bytes / kUnit;
  const int tx = units >= 32 ? 32 : ssl::next_pow2(units);
  const int ty = 256 / tx;
  const dim3 block(tx, ty);
  const int64_t grid = ceil_div(num_rows, ty);
  copy_rows_kernel<U, Index, INVERSE><<<static_cast<unsigned>(grid), block, 0, stream>>>(
      static_cast<const U*>(src), index, static_cast<const U*>(fill), static_cast<U*>(out), num_rows, rows_per_batch,
      stride_b * elem_size / kUnit, stride_r * elem_size / kUnit, units);
  return static_cast<int>(cudaGetLastError());
}

template <typename Index, bool INVERSE>
int copy_rows(const void* src, int64_t stride_b, int64_t stride_r, const Index* index, const void* fill, void* out,
              int64_t num_rows, int64_t rows_per_batch, int64_t dim, int elem_size, cudaStream_t stream) {
  const int64_t row_bytes = dim * elem_size;
  const int unit = copy_unit(row_bytes, stride_b * elem_size, stride_r * elem_size, src, out, fill);
  switch (unit) {
    case 16: return launch_copy<uint4, Index, INVERSE>(src, stride_b, stride_r, index, fill, out, num_rows,
                                                       rows_per_batch, row_bytes, elem_size, stream);
    case 8: return launch_copy<uint2, Index, INVERSE>(src, stride_b, stride_r, index, fill, out, num_rows,
                                                      rows_per_batch, row_bytes, elem_size, stream);
    case 4: return launch_copy<uint32_t, Index, INVERSE>(src, stride_b, stride_r, index, fill, out, num_rows,
                                                         rows_per_batch, row_bytes, elem_size, stream);
    default: return launch_copy<uint16_t, Index, INVERSE>(src, stride_b, stride_r, index, fill, out, num_rows,
                                                          rows_per_batch, row_bytes, elem_size, stream);
  }
}

template <typename T, int N>
__global__ void scatter_rows_bwd_kernel(const T* __restrict__ dout, const int32_t* __restrict__ inverse,
                                        T* __restrict__ dx_vis, float* __restrict__ partial, int64_t num_rows,
                                        int64_t num_patches, int64_t num_keep, int64_t dim, int64_t stride_b,
                                        int64_t stride_l, int64_t rows_per_group) {
  extern __shared__ float sums[];  // [blockDim.y][blockDim.x * N]
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * N;
  const bool col_ok = col < dim;
  float acc[N];
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i] = 0.f;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_group;
  const int64_t last = min(first + rows_per_group, num_rows);
  if (col_ok) {
    for (int64_t row = first + threadIdx.y; row < last; row += blockDim.y) {
      const int64_t b = row / num_patches, l = row - b * num_patches;
      const ssl::Pack<T, N> g = ssl::load_pack<T, N>(dout + b * stride_b + l * stride_l + col);
      const int32_t k = inverse[row];
      if (k >= 0) {
        ssl::store_pack<T, N>(dx_vis + (b * num_keep + k) * dim + col, g);
      } else {
#pragma unroll
        for (int i = 0; i < N; ++i) acc[i] += ssl::to_float(g.v[i]);
      }
    }
  }
  const int width = blockDim.x * N;
#pragma unroll
  for (int i = 0; i < N; ++i) sums[threadIdx.y * width + threadIdx.x * N + i] = acc[i];
  __syncthreads();
  if (threadIdx.y == 0 && col_ok) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      float total = 0.f;
      for (int y = 0; y < static_cast<int>(blockDim.y); ++y) total += sums[y * width + threadIdx.x * N + i];
      partial[static_cast<int64_t>(blockIdx.x) * dim + col + i] = total;
    }
  }
}

template <typename T, int N>
int launch_scatter_bwd(const void* dout, int64_t stride_b, int64_t stride_l, const int32_t* inverse, void* dx_vis,
                       float* partial, int64_t num_rows, int64_t num_patches, int64_t num_keep, int64_t dim,
                       int64_t rows_per_group, cudaStream_t stream) {
  const int64_t packs = dim / N;
  const int tx = packs >= 32 ? 32 : ssl::next_pow2(packs);
  const int ty = 256 / tx;
  const dim3 grid(static_cast<unsigned>(ceil_div(num_rows, rows_per_group)),
                  static_cast<unsigned>(ceil_div(packs, tx)));
  const size_t shared = sizeof(float) * 256 * N;
  scatter_rows_bwd_kernel<T, N><<<grid, dim3(tx, ty), shared, stream>>>(
      static_cast<const T*>(dout), inverse, static_cast<T*>(dx_vis), partial, num_rows, num_patches, num_keep, dim,
      stride_b, stride_l, rows_per_group);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" const char* ssl_cuda_error_string(int status) {
  return cudaGetErrorString(static_cast<cudaError_t>(status));
}

extern "C" int ssl_gather_rows(const void* src, int64_t src_stride_b, int64_t src_stride_r, const void* index,
                               int index_is_int64, void* out, int64_t batch, int64_t rows_per_batch, int64_t dim,
                               int elem_size, int device, void* stream) {
  SSL_GUARD(device);
  const int64_t num_rows = batch * rows_per_batch;
  if (num_rows == 0 || dim == 0) return 0;
  if (index_is_int64)
    return copy_rows<int64_t, false>(src, src_stride_b, src_stride_r, static_cast<const int64_t*>(index), nullptr, out,
                                     num_rows, rows_per_batch, dim, elem_size, SSL_STREAM(stream));
  return copy_rows<int32_t, false>(src, src_stride_b, src_stride_r, static_cast<const int32_t*>(index), nullptr, out,
                                   num_rows, rows_per_batch, dim, elem_size, SSL_STREAM(stream));
}

extern "C" int ssl_scatter_rows(const void* src, int64_t src_stride_b, int64_t src_stride_r, const int32_t* inverse,
                                const void* fill, void* out, int64_t batch, int64_t num_patches, int64_t dim,
                                int elem_size, int device, void* stream) {
  SSL_GUARD(device);
  const int64_t num_rows = batch * num_patches;
  if (num_rows == 0 || dim == 0) return 0;
  return copy_rows<int32_t, true>(src, src_stride_b, src_stride_r, inverse, fill, out, num_rows, num_patches, dim,
                                  elem_size, SSL_STREAM(stream));
}

extern "C" int ssl_scatter_rows_bwd(const void* dout, int64_t stride_b, int64_t stride_l, const int32_t* inverse,
                                    void* dx_vis, float* partial, int64_t batch, int64_t num_patches, int64_t num_keep,
                                    int64_t dim, int64_t rows_per_group, int dtype, int device, void* stream) {
  SSL_GUARD(device);
  const int64_t num_rows = batch * num_patches;
  if (num_rows == 0 || dim == 0) return 0;
  SSL_DISPATCH_FLOAT(dtype, T, {
    constexpr int kVec = 16 / sizeof(T);
    const int64_t bytes = sizeof(T) * kVec;
    const bool vectorise = dim % kVec == 0 && (stride_b * sizeof(T)) % bytes == 0 &&
                           (stride_l * sizeof(T)) % bytes == 0 && ssl::aligned_to(dout, bytes) &&
                           ssl::aligned_to(dx_vis, bytes);
    if (vectorise)
      return launch_scatter_bwd<T, kVec>(dout, stride_b, stride_l, inverse, dx_vis, partial, num_rows, num_patches,
                                         num_keep, dim, rows_per_group, SSL_STREAM(stream));
    return launch_scatter_bwd<T, 1>(dout, stride_b, stride_l, inverse, dx_vis, partial, num_rows, num_patches,
                                    num_keep, dim, rows_per_group, SSL_STREAM(stream));
  });
  return 0;
}
