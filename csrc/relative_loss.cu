// relative_loss: HPM's pairwise (RankNet) loss over each image's masked patches, with its gradient.
//
// Same math as kernels/relative_loss.py. For image b and ordered pairs (j, k), z = p_k - p_j,
// y+ = [t_k > t_j], y- = [t_k < t_j] (ties and j == k excluded):
//     stable:   l_jk = y+ softplus(-z) + y- softplus(z)
//     official: l_jk = -y+ log(sigmoid(z) + e) - y- log(1 - sigmoid(z) + e),   e = 1e-6
//     loss = sum(l) / max(#pairs, 1)
// G_j = d/dp_j sum_pairs l = sum_k (-dl_jk/dz_jk + dl_kj/dz_kj) is written in the forward (fp32, [B, M]);
// the backward is then grad_loss * G / count, an O(B M) torch op in the caller.
//   stable:   G_j = -2 sum_k (sigmoid(z) - y+)
//   official: with s = sigmoid(z), s' = sigmoid(-z) evaluated separately (as the reference does),
//             dl_jk/dz    = -y+ s(1-s)/(s+e) + y- s(1-s)/(1-s+e)
//             dl_kj/dz_kj = -y- s'(1-s')/(s'+e) + y+ s'(1-s')/(1-s'+e)
//
// Block (b, jt): 32 rows j (one per lane) x 4 warps, warp w visiting k = w, w + 4, ...; every lane of a warp
// reads the same (p_k, t_k) (a broadcast from L1). G_j, the loss and the pair count are summed over the warps
// through shared memory in a fixed order, and a one-block kernel adds the per-block partials in a fixed
// order: the result is bitwise reproducible.
#include "common.cuh"

namespace {

constexpr int kRows = SSL_RELATIVE_ROWS;
constexpr int kWarps = 4;
constexpr int kFinishThreads = 1024;
constexpr float kOfficialEps = 1e-6f;

__device__ __forceinline__ float softplus(float x) { return fmaxf(x, 0.f) + log1pf(expf(-fabsf(x))); }

template <typename TP, typename TT, bool STABLE>
__global__ void __launch_bounds__(kRows * kWarps)
relative_loss_fwd_kernel(const TP* __restrict__ score, const TT* __restrict__ true_loss, float* __restrict__ grad,
                         float* __restrict__ part_loss, int32_t* __restrict__ part_count, int64_t size_m,
                         int64_t score_sb, int64_t score_sm, int64_t true_sb, int64_t true_sm, int64_t row_tiles) {
  __shared__ float grad_part[kWarps][kRows];
  __shared__ float loss_part[kWarps][kRows];
  __shared__ int32_t count_part[kWarps][kRows];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t b = blockIdx.x / row_tiles, tile = blockIdx.x - b * row_tiles;
  const int64_t j = tile * kRows + lane;
  const bool j_ok = j < size_m;
  const TP* p = score + b * score_sb;
  const TT* t = true_loss + b * true_sb;
  const float p_j = j_ok ? ssl::to_float(p[j * score_sm]) : 0.f;
  const float t_j = j_ok ? ssl::to_float(t[j * true_sm]) : 0.f;
  float loss = 0.f, g = 0.f;
  int32_t count = 0;
  if (j_ok) {
    for (int64_t k = warp; k < size_m; k += kWarps) {
      const float t_k = ssl::to_float(t[k * true_sm]);
      const bool pos = t_k > t_j, neg = t_k < t_j;
      if (!(pos || neg)) continue;
      const float z = ssl::to_float(p[k * score_sm]) - p_j;
      const float s = 1.f / (1.f + expf(-z));
      if (STABLE) {
        loss += softplus(pos ? -z : z);
        g += -2.f * (s - (pos ? 1.f : 0.f));
      } else {
        const float s_rev = 1.f / (1.f + expf(z));
        loss += pos ? -logf(s + kOfficialEps) : -logf(1.f - s + kOfficialEps);
        const float ds = s * (1.f - s), ds_rev = s_rev * (1.f - s_rev);
        const float dl_jk = pos ? -ds / (s + kOfficialEps) : ds / (1.f - s + kOfficialEps);
        const float dl_kj = neg ? -ds_rev / (s_rev + kOfficialEps) : ds_rev / (1.f - s_rev + kOfficialEps);
        g += dl_kj - dl_jk;
      }
      ++count;
    }
  }
  grad_part[warp][lane] = g;
  loss_part[warp][lane] = loss;
  count_part[warp][lane] = count;
  __syncthreads();
  if (warp == 0) {
    float g_total = 0.f;
    for (int w = 0; w < kWarps; ++w) g_total += grad_part[w][lane];
    if (grad != nullptr && j_ok) grad[b * size_m + j] = g_total;
  }
  if (threadIdx.x == 0) {
    float l_total = 0.f;
    int32_t c_total = 0;
    for (int w = 0; w < kWarps; ++w)
      for (int r = 0; r < kRows; ++r) {
        l_total += loss_part[w][r];
        c_total += count_part[w][r];
      }
    part_loss[blockIdx.x] = l_total;
    part_count[blockIdx.x] = c_total;
  }
}

__global__ void __launch_bounds__(kFinishThreads)
relative_loss_finish_kernel(const float* __restrict__ part_loss, const int32_t* __restrict__ part_count,
                            int64_t num_parts, float* __restrict__ loss, float* __restrict__ count) {
  __shared__ float loss_scratch[kFinishThreads];
  __shared__ long long count_scratch[kFinishThreads];
  float l = 0.f;
  long long c = 0;
  for (int64_t i = threadIdx.x; i < num_parts; i += blockDim.x) {
    l += part_loss[i];
    c += part_count[i];
  }
  loss_scratch[threadIdx.x] = l;
  count_scratch[threadIdx.x] = c;
  __syncthreads();
  for (int half = kFinishThreads / 2; half > 0; half >>= 1) {  // a fixed tree: reproducible
    if (static_cast<int>(threadIdx.x) < half) {
      loss_scratch[threadIdx.x] += loss_scratch[threadIdx.x + half];
      count_scratch[threadIdx.x] += count_scratch[threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const float total = static_cast<float>(count_scratch[0] > 0 ? count_scratch[0] : 1);
    *loss = loss_scratch[0] / total;
    *count = total;
  }
}

template <typename TP, typename TT>
void launch_fwd(const void* score, int64_t score_sb, int64_t score_sm, const void* true_loss, int64_t true_sb,
                int64_t true_sm, float* grad, float* part_loss, int32_t* part_count, int64_t batch, int64_t size_m,
                bool stable, cudaStream_t stream) {
  const int64_t tiles = ssl::ceil_div(size_m, kRows);
  const unsigned grid = static_cast<unsigned>(batch * tiles);
  if (stable)
    relative_loss_fwd_kernel<TP, TT, true><<<grid, kRows * kWarps, 0, stream>>>(
        static_cast<const TP*>(score), static_cast<const TT*>(true_loss), grad, part_loss, part_count, size_m,
        score_sb, score_sm, true_sb, true_sm, tiles);
  else
    relative_loss_fwd_kernel<TP, TT, false><<<grid, kRows * kWarps, 0, stream>>>(
        static_cast<const TP*>(score), static_cast<const TT*>(true_loss), grad, part_loss, part_count, size_m,
        score_sb, score_sm, true_sb, true_sm, tiles);
}

}  // namespace

extern "C" int ssl_relative_loss_fwd(const void* score, int score_dtype, int64_t score_stride_b,
                                     int64_t score_stride_m, const void* true_loss, int true_dtype,
                                     int64_t true_stride_b, int64_t true_stride_m, float* grad, float* part_loss,
                                     int32_t* part_count, float* loss, float* count, int64_t batch, int64_t size_m,
                                     int stable, int device, void* stream) {
  SSL_GUARD(device);
  cudaStream_t s = SSL_STREAM(stream);
  const int64_t parts = batch * ssl::ceil_div(size_m, kRows);
  if (parts > 0) {
    SSL_DISPATCH_FLOAT(score_dtype, TP, {
      SSL_DISPATCH_FLOAT(true_dtype, TT, {
        launch_fwd<TP, TT>(score, score_stride_b, score_stride_m, true_loss, true_stride_b, true_stride_m, grad,
                           part_loss, part_count, batch, size_m, stable != 0, s);
      });
    });
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return static_cast<int>(status);
  }
  relative_loss_finish_kernel<<<1, kFinishThreads, 0, s>>>(part_loss, part_count, parts, loss, count);
  return static_cast<int>(cudaGetLastError());
}
