// info_nce on cuBLAS logits: row / column log-sum-exp and the gradient weights of a block of logits.
//
// The caller (kernels/info_nce.py, backend "cuda") computes S = Q_chunk K^T with torch.mm (cuBLAS, tensor
// cores, fp32 output), a block of rows at a time, and these kernels do the softmax statistics on it:
//     lse_r  = log sum_c exp(s_rc),   s = scale * S       (one block per row, online max / sum)
//     clse_c = log sum_r exp(s_rc)                         (per column, over a segment of rows; the caller
//                                                           merges segments and row blocks with logsumexp)
//     W_rc   = g_r exp(s_rc - lse_r) + p_r [c == pos(r)] + h_c exp(s_rc - clse_c)
// W is the gradient of sum_r (g_r lse_r + p_r s_r,pos(r)) + sum_c h_c clse_c with respect to s. It is formed
// in fp32 (so P_ii - 1 keeps its precision for a confident positive) and rounded once to the input dtype,
// and the caller finishes dQ = scale W K and dK = scale W^T Q with two more cuBLAS matmuls.
// exp is evaluated as exp2 of log2-scaled values (the native instruction).
#include "common.cuh"

namespace {

constexpr int kThreads = 256;

struct MaxSum {  // sum_i exp2(x_i) = l * exp2(m)
  float m, l;
};

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.f};  // both empty
  return {m, a.l * exp2f(a.m - m) + b.l * exp2f(b.m - m)};
}

template <int N>
__global__ void __launch_bounds__(kThreads)
lse_rows_kernel(const float* __restrict__ S, int64_t cols, const float* __restrict__ scale, float* __restrict__ lse,
                float* __restrict__ pos, int64_t pos_col0) {
  __shared__ MaxSum warp_stats[kThreads / 32];
  const int64_t r = blockIdx.x;
  const float* s = S + r * cols;
  const float scale2 = *scale * ssl::kLog2e;
  MaxSum acc{-INFINITY, 0.f};
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * N; c < cols; c += kThreads * N) {
    const ssl::Pack<float, N> v = ssl::load_pack<float, N>(s + c);
    float x[N], m = acc.m;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      x[i] = v.v[i] * scale2;
      m = fmaxf(m, x[i]);
    }
    float l = acc.l * exp2f(acc.m - m);  // acc.m = -inf, m finite: exp2f(-inf) = 0
#pragma unroll
    for (int i = 0; i < N; ++i) l += exp2f(x[i] - m);
    acc = {m, l};
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    const MaxSum other{__shfl_xor_sync(ssl::kFullMask, acc.m, offset), __shfl_xor_sync(ssl::kFullMask, acc.l, offset)};
    acc = merge(acc, other);
  }
  if ((threadIdx.x & 31) == 0) warp_stats[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    MaxSum total = warp_stats[0];
    for (int w = 1; w < kThreads / 32; ++w) total = merge(total, warp_stats[w]);
    lse[r] = (total.m + log2f(total.l)) * ssl::kLn2;
    if (pos != nullptr) pos[r] = s[pos_col0 + r] * *scale;
  }
}

__global__ void __launch_bounds__(kThreads)
lse_cols_kernel(const float* __restrict__ S, int64_t rows, int64_t cols, const float* __restrict__ scale,
                int64_t rows_per_seg, float* __restrict__ part) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= cols) return;
  const float scale2 = *scale * ssl::kLog2e;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * rows_per_seg;
  const int64_t last = min(first + rows_per_seg, rows);
  float m = -INFINITY, l = 0.f;
  for (int64_t r = first; r < last; ++r) {  // consecutive threads read consecutive columns: coalesced
    const float x = S[r * cols + c] * scale2;
    if (x > m) {
      l = l * exp2f(m - x) + 1.f;
      m = x;
    } else {
      l += exp2f(x - m);
    }
  }
  part[static_cast<int64_t>(blockIdx.y) * cols + c] = (m + log2f(l)) * ssl::kLn2;
}

template <typename TW, int N>
__global__ void __launch_bounds__(kThreads)
lse_grad_kernel(const float* __restrict__ S, int64_t rows, int64_t cols, const float* __restrict__ scale,
                const float* __restrict__ row_lse, const float* __restrict__ row_grad,
                const float* __restrict__ row_pos_grad, int64_t pos_col0, const float* __restrict__ col_lse,
                const float* __restrict__ col_grad, TW* __restrict__ W) {
  const int64_t packs_per_row = cols / N;
  const int64_t pack = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (pack >= rows * packs_per_row) return;
  const int64_t r = pack / packs_per_row, c0 = (pack - r * packs_per_row) * N;
  const float scale2 = *scale * ssl::kLog2e;
  const ssl::Pack<float, N> sv = ssl::load_pack<float, N>(S + r * cols + c0);
  const bool has_row = row_lse != nullptr && row_grad != nullptr;
  const float g = has_row ? row_grad[r] : 0.f;
  const float lse2 = has_row ? row_lse[r] * ssl::kLog2e : 0.f;
  const int64_t pos_col = pos_col0 + r;
  ssl::Pack<TW, N> out;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const int64_t c = c0 + i;
    const float s2 = sv.v[i] * scale2;
    float w = 0.f;
    if (has_row) w += g * exp2f(s2 - lse2);
    if (row_pos_grad != nullptr && c == pos_col) w += row_pos_grad[r];
    if (col_lse != nullptr && col_grad != nullptr) w += col_grad[c] * exp2f(s2 - col_lse[c] * ssl::kLog2e);
    out.v[i] = ssl::from_float<TW>(w);
  }
  ssl::store_pack<TW, N>(W + r * cols + c0, out);
}

template <typename TW, int N>
void launch_grad(const float* S, int64_t rows, int64_t cols, const float* scale, const float* row_lse,
                 const float* row_grad, const float* row_pos_grad, int64_t pos_col0, const float* col_lse,
                 const float* col_grad, void* W, cudaStream_t stream) {
  const int64_t packs = rows * (cols / N);
  lse_grad_kernel<TW, N><<<static_cast<unsigned>(ssl::ceil_div(packs, kThreads)), kThreads, 0, stream>>>(
      S, rows, cols, scale, row_lse, row_grad, row_pos_grad, pos_col0, col_lse, col_grad, static_cast<TW*>(W));
}

}  // namespace

extern "C" int ssl_lse_rows(const float* S, int64_t rows, int64_t cols, const float* scale, float* lse, float* pos,
                            int64_t pos_col0, int device, void* stream) {
  SSL_GUARD(device);
  if (rows == 0 || cols == 0) return 0;
  if (cols % 4 == 0 && ssl::aligned_to(S, 16))
    lse_rows_kernel<4><<<static_cast<unsigned>(rows), kThreads, 0, SSL_STREAM(stream)>>>(S, cols, scale, lse, pos,
                                                                                          pos_col0);
  else
    lse_rows_kernel<1><<<static_cast<unsigned>(rows), kThreads, 0, SSL_STREAM(stream)>>>(S, cols, scale, lse, pos,
                                                                                          pos_col0);
  return static_cast<int>(cudaGetLastError());
}

extern "C" int ssl_lse_cols(const float* S, int64_t rows, int64_t cols, const float* scale, int64_t rows_per_seg,
                            float* part, int device, void* stream) {
  SSL_GUARD(device);
  if (rows == 0 || cols == 0) return 0;
  const int64_t segments = ssl::ceil_div(rows, rows_per_seg);
  if (segments > 65535) return static_cast<int>(cudaErrorInvalidConfiguration);
  const dim3 grid(static_cast<unsigned>(ssl::ceil_div(cols, kThreads)), static_cast<unsigned>(segments));
  lse_cols_kernel<<<grid, kThreads, 0, SSL_STREAM(stream)>>>(S, rows, cols, scale, rows_per_seg, part);
  return static_cast<int>(cudaGetLastError());
}

extern "C" int ssl_lse_grad(const float* S, int64_t rows, int64_t cols, const float* scale, const float* row_lse,
                            const float* row_grad, const float* row_pos_grad, int64_t pos_col0, const float* col_lse,
                            const float* col_grad, void* W, int w_dtype, int device, void* stream) {
  SSL_GUARD(device);
  if (rows == 0 || cols == 0) return 0;
  SSL_DISPATCH_FLOAT(w_dtype, TW, {
    const bool vectorise = cols % 4 == 0 && ssl::aligned_to(S, 16) && ssl::aligned_to(W, 4 * sizeof(TW));
    if (vectorise)
      launch_grad<TW, 4>(S, rows, cols, scale, row_lse, row_grad, row_pos_grad, pos_col0, col_lse, col_grad, W,
                         SSL_STREAM(stream));
    else
      launch_grad<TW, 1>(S, rows, cols, scale, row_lse, row_grad, row_pos_grad, pos_col0, col_lse, col_grad, W,
                         SSL_STREAM(stream));
  });
  return static_cast<int>(cudaGetLastError());
}
