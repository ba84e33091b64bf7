// patch_loss: MAE's per-patch (normalised-)pixel MSE, forward fused with the expensive part of the gradient.
//
// Per row r = (b, l) of P values, all math in fp32 (the same as kernels/patch_loss.py):
//     mu = sum(t) / P,  var = sum((t - mu)^2) / (P - 1),  t_hat = (t - mu) / sqrt(var + eps)   (norm_pix)
//     diff = y - t_hat,  per_patch = sum(diff^2) / P,  loss = sum(per_patch * w) / max(sum(w), 1)
// Gradient: grad_y[r] = (g * w_r / n + g_r) * 2 diff[r] / P, with g the loss's and g_r per_patch's gradient.
// The forward stores diff in pred's dtype (unscaled), so the backward is one rescaling pass over it.
//
// One warp per row, SSL_PATCH_LOSS_ROWS rows per block. The row is read three times with norm_pix (mean,
// variance, then the loss): the second and third reads of a row (3 KB for P = 768 fp32) hit L1/L2, so DRAM
// sees one read. Loads are 4 values wide (16 bytes of fp32, 8 of bf16) when P % 4 == 0 and the rows are
// aligned. The scalar loss is deterministic: each block writes one partial of sum(per_patch * w) and of
// sum(w), summed in a fixed order, and a one-block kernel adds the partials in a fixed order.
#include "common.cuh"

namespace {

constexpr int kRows = SSL_PATCH_LOSS_ROWS;
constexpr int kFinishThreads = 1024;

template <typename TP, typename TT, int N>
__global__ void __launch_bounds__(kRows * 32)
patch_loss_fwd_kernel(const TP* __restrict__ pred, const TT* __restrict__ target, const void* __restrict__ mask,
                      int mask_code, float* __restrict__ per_patch, TP* __restrict__ diff,
                      float* __restrict__ part_loss,
                      float* __restrict__ part_weight, int64_t num_rows, int64_t num_patches, int64_t patch_dim,
                      int64_t pred_sb, int64_t pred_sl, int64_t target_sb, int64_t target_sl, int64_t mask_sb,
                      int64_t mask_sl, bool norm_pix, float eps) {
  __shared__ float block_loss[kRows], block_weight[kRows];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRows + warp;
  float contribution = 0.f, weight = 0.f;
  if (row < num_rows) {
    const int64_t b = row / num_patches, l = row - b * num_patches;
    const TT* t = target + b * target_sb + l * target_sl;
    const TP* y = pred + b * pred_sb + l * pred_sl;
    const int64_t packs = patch_dim / N;
    float mean = 0.f, rstd = 1.f;
    if (norm_pix) {
      float sum = 0.f;
      for (int64_t p = lane; p < packs; p += 32) {
        const ssl::Pack<TT, N> tv = ssl::load_pack<TT, N>(t + p * N);
#pragma unroll
        for (int i = 0; i < N; ++i) sum += ssl::to_float(tv.v[i]);
      }
      mean = ssl::warp_sum(sum) / static_cast<float>(patch_dim);
      float sq = 0.f;
      for (int64_t p = lane; p < packs; p += 32) {
        const ssl::Pack<TT, N> tv = ssl::load_pack<TT, N>(t + p * N);
#pragma unroll
        for (int i = 0; i < N; ++i) {
          const float c = ssl::to_float(tv.v[i]) - mean;
          sq += c * c;
        }
      }
      const float var = ssl::warp_sum(sq) / static_cast<float>(patch_dim - 1);
      rstd = 1.f / sqrtf(var + eps);
    }
    float sq = 0.f;
    for (int64_t p = lane; p < packs; p += 32) {
      const ssl::Pack<TT, N> tv = ssl::load_pack<TT, N>(t + p * N);
      const ssl::Pack<TP, N> yv = ssl::load_pack<TP, N>(y + p * N);
      ssl::Pack<TP, N> dv;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float d = ssl::to_float(yv.v[i]) - (ssl::to_float(tv.v[i]) - mean) * rstd;
        sq += d * d;
        dv.v[i] = ssl::from_float<TP>(d);
      }
      if (diff != nullptr) ssl::store_pack<TP, N>(diff + row * patch_dim + p * N, dv);
    }
    const float value = ssl::warp_sum(sq) / static_cast<float>(patch_dim);
    weight = ssl::load_weight(mask, mask_code, b * mask_sb + l * mask_sl);
    contribution = value * weight;
    if (lane == 0) per_patch[row] = value;
  }
  if (lane == 0) {
    block_loss[warp] = contribution;
    block_weight[warp] = weight;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float loss = 0.f, total = 0.f;
    for (int w = 0; w < kRows; ++w) {
      loss += block_loss[w];
      total += block_weight[w];
    }
    part_loss[blockIdx.x] = loss;
    part_weight[blockIdx.x] = total;
  }
}

__global__ void __launch_bounds__(kFinishThreads)
patch_loss_finish_kernel(const float* __restrict__ part_loss, const float* __restrict__ part_weight,
                         int64_t num_parts, float* __restrict__ loss, float* __restrict__ count) {
  __shared__ float scratch[kFinishThreads / 32];
  float l = 0.f, w = 0.f;
  for (int64_t i = threadIdx.x; i < num_parts; i += blockDim.x) {
    l += part_loss[i];
    w += part_weight[i];
  }
  l = ssl::block_sum(l, scratch);
  w = ssl::block_sum(w, scratch);
  if (threadIdx.x == 0) {
    const float n = fmaxf(w, 1.f);  // no masked patch: loss 0, not 0/0
    *loss = l / n;
    *count = n;
  }
}

template <typename T, int N>
__global__ void __launch_bounds__(kRows * 32)
patch_loss_bwd_kernel(const T* __restrict__ diff, const void* __restrict__ mask, int mask_code, int64_t mask_sb,
                      int64_t mask_sl, const float* __restrict__ grad_loss, const float* __restrict__ count,
                      const float* __restrict__ grad_per_patch, T* __restrict__ grad_pred, int64_t num_rows,
                      int64_t num_patches, int64_t patch_dim) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRows + warp;
  if (row >= num_rows) return;
  float scale = 0.f;
  if (grad_loss != nullptr) {
    const int64_t b = row / num_patches, l = row - b * num_patches;
    scale += ssl::load_weight(mask, mask_code, b * mask_sb + l * mask_sl) * (*grad_loss / *count);
  }
  if (grad_per_patch != nullptr) scale += grad_per_patch[row];
  scale *= 2.f / static_cast<float>(patch_dim);
  const int64_t packs = patch_dim / N;
  for (int64_t p = lane; p < packs; p += 32) {
    const ssl::Pack<T, N> dv = ssl::load_pack<T, N>(diff + row * patch_dim + p * N);
    ssl::Pack<T, N> gv;
#pragma unroll
    for (int i = 0; i < N; ++i) gv.v[i] = ssl::from_float<T>(ssl::to_float(dv.v[i]) * scale);
    ssl::store_pack<T, N>(grad_pred + row * patch_dim + p * N, gv);
  }
}

template <typename TP, typename TT, int N>
void launch_fwd(const void* pred, int64_t pred_sb, int64_t pred_sl, const void* target, int64_t target_sb,
                int64_t target_sl, const void* mask, int mask_code, int64_t mask_sb, int64_t mask_sl,
                float* per_patch, void* diff, float* part_loss, float* part_weight, int64_t num_rows,
                int64_t num_patches, int64_t patch_dim, bool norm_pix, float eps, int64_t grid, cudaStream_t stream) {
  patch_loss_fwd_kernel<TP, TT, N><<<static_cast<unsigned>(grid), kRows * 32, 0, stream>>>(
      static_cast<const TP*>(pred), static_cast<const TT*>(target), mask, mask_code, per_patch,
      static_cast<TP*>(diff), part_loss, part_weight, num_rows, num_patches, patch_dim, pred_sb, pred_sl, target_sb,
      target_sl, mask_sb, mask_sl, norm_pix, eps);
}

}  // namespace

extern "C" int ssl_patch_loss_fwd(const void* pred, int pred_dtype, int64_t pred_stride_b, int64_t pred_stride_l,
                                  const void* target, int target_dtype, int64_t target_stride_b,
                                  int64_t target_stride_l, const void* mask, int mask_dtype, int64_t mask_stride_b,
                                  int64_t mask_stride_l, float* per_patch, void* diff, float* part_loss,
                                  float* part_weight, float* loss, float* count, int64_t batch, int64_t num_patches,
                                  int64_t patch_dim, int norm_pix, float eps, int device, void* stream) {
  SSL_GUARD(device);
  cudaStream_t s = SSL_STREAM(stream);
  const int64_t num_rows = batch * num_patches;
  const int64_t grid = ssl::ceil_div(num_rows, kRows);
  if (grid > 0) {
    SSL_DISPATCH_FLOAT(pred_dtype, TP, {
      SSL_DISPATCH_FLOAT(target_dtype, TT, {
        const bool vectorise = patch_dim % 4 == 0 && pred_stride_b % 4 == 0 && pred_stride_l % 4 == 0 &&
                               target_stride_b % 4 == 0 && target_stride_l % 4 == 0 &&
                               ssl::aligned_to(pred, 4 * sizeof(TP)) && ssl::aligned_to(target, 4 * sizeof(TT)) &&
                               (diff == nullptr || ssl::aligned_to(diff, 4 * sizeof(TP)));
        if (vectorise)
          launch_fwd<TP, TT, 4>(pred, pred_stride_b, pred_stride_l, target, target_stride_b, target_stride_l, mask,
                                mask_dtype, mask_stride_b, mask_stride_l, per_patch, diff, part_loss, part_weight,
                                num_rows, num_patches, patch_dim, norm_pix != 0, eps, grid, s);
        else
          launch_fwd<TP, TT, 1>(pred, pred_stride_b, pred_stride_l, target, target_stride_b, target_stride_l, mask,
                                mask_dtype, mask_stride_b, mask_stride_l, per_patch, diff, part_loss, part_weight,
                                num_rows, num_patches, patch_dim, norm_pix != 0, eps, grid, s);
      });
    });
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return static_cast<int>(status);
  }
  patch_loss_finish_kernel<<<1, kFinishThreads, 0, s>>>(part_loss, part_weight, grid, loss, count);
  return static_cast<int>(cudaGetLastError());
}

extern "C" int ssl_patch_loss_bwd(const void* diff, int dtype, const void* mask, int mask_dtype,
                                  int64_t mask_stride_b, int64_t mask_stride_l, const float* grad_loss,
                                  const float* count, const float* grad_per_patch, void* grad_pred, int64_t batch,
                                  int64_t num_patches, int64_t patch_dim, int device, void* stream) {
  SSL_GUARD(device);
  const int64_t num_rows = batch * num_patches;
  const int64_t grid = ssl::ceil_div(num_rows, kRows);
  if (grid == 0 || patch_dim == 0) return 0;
  SSL_DISPATCH_FLOAT(dtype, T, {
    const bool vectorise = patch_dim % 4 == 0 && ssl::aligned_to(diff, 4 * sizeof(T)) &&
                           ssl::aligned_to(grad_pred, 4 * sizeof(T));
    if (vectorise)
      patch_loss_bwd_kernel<T, 4><<<static_cast<unsigned>(grid), kRows * 32, 0, SSL_STREAM(stream)>>>(
          static_cast<const T*>(diff), mask, mask_dtype, mask_stride_b, mask_stride_l, grad_loss, count,
          grad_per_patch, static_cast<T*>(grad_pred), num_rows, num_patches, patch_dim);
    else
      patch_loss_bwd_kernel<T, 1><<<static_cast<unsigned>(grid), kRows * 32, 0, SSL_STREAM(stream)>>>(
          static_cast<const T*>(diff), mask, mask_dtype, mask_stride_b, mask_stride_l, grad_loss, count,
          grad_per_patch, static_cast<T*>(grad_pred), num_rows, num_patches, patch_dim);
  });
  return static_cast<int>(cudaGetLastError());
}
