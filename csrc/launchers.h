// The C interface between the CUDA kernels (*.cu, compiled by nvcc) and the torch binding (bindings.cpp,
// compiled by the host compiler). Plain C types only: no CUDA or torch header is needed to include it.
//
// Conventions: pointers are device pointers; sizes and strides are in elements; `stream` is a cudaStream_t
// passed as void* (Python hands over torch.cuda.current_stream().cuda_stream); `device` is the CUDA device
// index the kernel runs on (the launcher switches to it and back). Float dtype codes: 0 float32, 1 float16,
// 2 bfloat16; mask codes add 3 for uint8/bool. Every launcher returns a cudaError_t as int (0 = success);
// ssl_cuda_error_string turns it into a message.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { SSL_F32 = 0, SSL_F16 = 1, SSL_BF16 = 2, SSL_U8 = 3 };

const char* ssl_cuda_error_string(int status);

// ---- gathering: row copies ----------------------------------------------------------------------------
// out[b, k, :] = src[b, index[b, k], :]. src rows have unit stride along D; index is int32 or int64.
int ssl_gather_rows(const void* src, int64_t src_stride_b, int64_t src_stride_r, const void* index,
                    int index_is_int64, void* out, int64_t batch, int64_t rows_per_batch, int64_t dim,
                    int elem_size, int device, void* stream);

// out[b, l, :] = src[b, inverse[b, l], :] where inverse >= 0, else fill[:] (zeros when fill is NULL).
int ssl_scatter_rows(const void* src, int64_t src_stride_b, int64_t src_stride_r, const int32_t* inverse,
                     const void* fill, void* out, int64_t batch, int64_t num_patches, int64_t dim, int elem_size,
                     int device, void* stream);

// Backward of scatter: dx_vis[b, inverse[b, l]] = dout[b, l] where inverse >= 0; the rows with inverse < 0
// are summed in fp32 per group of `rows_per_group` rows into partial[group, D] (summed over groups by the caller).
int ssl_scatter_rows_bwd(const void* dout, int64_t stride_b, int64_t stride_l, const int32_t* inverse,
                         void* dx_vis, float* partial, int64_t batch, int64_t num_patches, int64_t num_keep,
                         int64_t dim, int64_t rows_per_group, int dtype, int device, void* stream);

// ---- patch_loss ---------------------------------------------------------------------------------------
// Rows per block of the forward: the caller sizes the two partial-sum workspaces to
// ceil(batch * num_patches / SSL_PATCH_LOSS_ROWS) floats each.
enum { SSL_PATCH_LOSS_ROWS = 8 };

int ssl_patch_loss_fwd(const void* pred, int pred_dtype, int64_t pred_stride_b, int64_t pred_stride_l,
                       const void* target, int target_dtype, int64_t target_stride_b, int64_t target_stride_l,
                       const void* mask, int mask_dtype, int64_t mask_stride_b, int64_t mask_stride_l,
                       float* per_patch, void* diff, float* part_loss, float* part_weight, float* loss,
                       float* count, int64_t batch, int64_t num_patches, int64_t patch_dim, int norm_pix,
                       float eps, int device, void* stream);

int ssl_patch_loss_bwd(const void* diff, int dtype, const void* mask, int mask_dtype, int64_t mask_stride_b,
                       int64_t mask_stride_l, const float* grad_loss, const float* count,
                       const float* grad_per_patch, void* grad_pred, int64_t batch, int64_t num_patches,
                       int64_t patch_dim, int device, void* stream);

// ---- relative_loss ------------------------------------------------------------------------------------
// Blocks of the forward own SSL_RELATIVE_ROWS rows j of one image: workspaces of batch * ceil(M / 32) entries.
enum { SSL_RELATIVE_ROWS = 32 };

int ssl_relative_loss_fwd(const void* score, int score_dtype, int64_t score_stride_b, int64_t score_stride_m,
                          const void* true_loss, int true_dtype, int64_t true_stride_b, int64_t true_stride_m,
                          float* grad, float* part_loss, int32_t* part_count, float* loss, float* count,
                          int64_t batch, int64_t size_m, int stable, int device, void* stream);

// ---- hard-patch selection -----------------------------------------------------------------------------
// out[b, :k] = positions of the k largest scores of row b in ascending position order. Ties: the lower
// position wins; NaN ranks above +inf; -0.0 equals +0.0 (the order of a stable descending sort).
int ssl_row_topk(const void* scores, int dtype, int64_t stride_b, int64_t stride_l, int64_t batch,
                 int64_t length, int64_t k, int64_t* out, int device, void* stream);

// ---- info_nce: log-sum-exp over a block of logits S (fp32 dot products, scaled by *scale) ----------------
// lse[r] = log sum_c exp(scale * S[r, c]); pos[r] = scale * S[r, pos_col0 + r] (pos may be NULL).
int ssl_lse_rows(const float* S, int64_t rows, int64_t cols, const float* scale, float* lse, float* pos,
                 int64_t pos_col0, int device, void* stream);
// part[g, c] = log sum over rows r of segment g (rows_per_seg rows each) of exp(scale * S[r, c]).
int ssl_lse_cols(const float* S, int64_t rows, int64_t cols, const float* scale, int64_t rows_per_seg,
                 float* part, int device, void* stream);
// W[r, c] = g[r] exp(s - lse[r]) + p[r] [c == pos_col0 + r] + h[c] exp(s - clse[c]), s = scale * S[r, c],
// formed in fp32 and stored in W's dtype. Any of (lse, g), p, (clse, h) may be NULL (term left out).
int ssl_lse_grad(const float* S, int64_t rows, int64_t cols, const float* scale, const float* row_lse,
                 const float* row_grad, const float* row_pos_grad, int64_t pos_col0, const float* col_lse,
                 const float* col_grad, void* W, int w_dtype, int device, void* stream);

#ifdef __cplusplus
}
#endif
