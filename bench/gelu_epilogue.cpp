// The feed-forward's first GEMM with cuBLASLt's GELU epilogues, bf16 in and out, for
// bench/ff_epilogue.py: forward `GELU_AUX` writes gelu(x @ w^T) and, as its aux output, the
// pre-activation x @ w^T; backward `DGELU` writes (g @ w) * gelu'(pre). The GELU is cuBLASLt's
// tanh approximation. Row-major tensors; cuBLASLt is column-major, so each product is computed
// transposed: C^T = B^T A^T.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublasLt.h>
#include <cublas_v2.h>

namespace {

#define CHECK_LT(call)                                                                           \
  do {                                                                                           \
    cublasStatus_t status_ = (call);                                                             \
    TORCH_CHECK(status_ == CUBLAS_STATUS_SUCCESS, #call " failed: ", cublasGetStatusString(status_)); \
  } while (0)

constexpr int64_t kWorkspaceBytes = 32 << 20;

// out (m, n) = x (m, k) @ y, where y is `y` (k, n) or, with y_transposed, `y` (n, k) transposed;
// aux (m, n): written (GELU_AUX) or read (DGELU).
void gemm_with_epilogue(const torch::Tensor& x, const torch::Tensor& y, bool y_transposed, torch::Tensor& out,
                        torch::Tensor& aux, cublasLtEpilogue_t epilogue) {
  const int64_t m = x.size(0), k = x.size(1), n = out.size(1);
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  cublasLtMatmulDesc_t desc;
  CHECK_LT(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  // Column-major: D^T (n, m) = op(A) (n, k) @ op(B) (k, m) with A = y's memory and B = x's.
  cublasOperation_t op_a = y_transposed ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = CUBLAS_OP_N;
  CHECK_LT(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
  CHECK_LT(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
  CHECK_LT(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
  void* aux_pointer = aux.data_ptr();
  int64_t aux_ld = n;
  CHECK_LT(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux_pointer,
                                          sizeof(aux_pointer)));
  CHECK_LT(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &aux_ld, sizeof(aux_ld)));
  cublasLtMatrixLayout_t a_layout, b_layout, d_layout;
  CHECK_LT(y_transposed ? cublasLtMatrixLayoutCreate(&a_layout, CUDA_R_16BF, k, n, k)
                        : cublasLtMatrixLayoutCreate(&a_layout, CUDA_R_16BF, n, k, n));
  CHECK_LT(cublasLtMatrixLayoutCreate(&b_layout, CUDA_R_16BF, k, m, k));
  CHECK_LT(cublasLtMatrixLayoutCreate(&d_layout, CUDA_R_16BF, n, m, n));
  cublasLtMatmulPreference_t preference;
  CHECK_LT(cublasLtMatmulPreferenceCreate(&preference));
  CHECK_LT(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                &kWorkspaceBytes, sizeof(kWorkspaceBytes)));
  cublasLtMatmulHeuristicResult_t heuristic;
  int found = 0;
  CHECK_LT(cublasLtMatmulAlgoGetHeuristic(handle, desc, a_layout, b_layout, d_layout, d_layout, preference, 1,
                                          &heuristic, &found));
  TORCH_CHECK(found > 0, "cuBLASLt has no algorithm for this GEMM with epilogue ", static_cast<int>(epilogue));
  auto workspace = torch::empty({kWorkspaceBytes}, x.options().dtype(torch::kUInt8));
  const float alpha = 1.0f, beta = 0.0f;
  CHECK_LT(cublasLtMatmul(handle, desc, &alpha, y.data_ptr(), a_layout, x.data_ptr(), b_layout, &beta,
                          out.data_ptr(), d_layout, out.data_ptr(), d_layout, &heuristic.algo,
                          workspace.data_ptr(), kWorkspaceBytes, at::cuda::getCurrentCUDAStream()));
  cublasLtMatmulPreferenceDestroy(preference);
  cublasLtMatrixLayoutDestroy(d_layout);
  cublasLtMatrixLayoutDestroy(b_layout);
  cublasLtMatrixLayoutDestroy(a_layout);
  cublasLtMatmulDescDestroy(desc);
}

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == torch::kBFloat16 && t.dim() == 2 && t.is_contiguous(), name,
              " must be a contiguous 2-d bf16 CUDA tensor");
}

// x (m, d), weight (h, d) as nn.Linear keeps it -> gelu(x @ weight^T), x @ weight^T, both (m, h).
std::vector<torch::Tensor> linear_gelu(torch::Tensor x, torch::Tensor weight) {
  check(x, "x");
  check(weight, "weight");
  TORCH_CHECK(x.size(1) == weight.size(1), "x and weight disagree on the inner size");
  c10::cuda::CUDAGuard guard(x.device());
  auto out = torch::empty({x.size(0), weight.size(0)}, x.options());
  auto pre = torch::empty_like(out);
  gemm_with_epilogue(x, weight, /*y_transposed=*/true, out, pre, CUBLASLT_EPILOGUE_GELU_AUX);
  return {out, pre};
}

// grad (m, d) of the down projection's output, weight (d, h) as nn.Linear keeps it, pre (m, h)
// -> (grad @ weight) * gelu'(pre), the gradient of the pre-activation.
torch::Tensor linear_gelu_backward(torch::Tensor grad, torch::Tensor weight, torch::Tensor pre) {
  check(grad, "grad");
  check(weight, "weight");
  check(pre, "pre");
  TORCH_CHECK(grad.size(1) == weight.size(0) && pre.size(0) == grad.size(0) && pre.size(1) == weight.size(1),
              "grad, weight and pre disagree on their sizes");
  c10::cuda::CUDAGuard guard(grad.device());
  auto out = torch::empty_like(pre);
  gemm_with_epilogue(grad, weight, /*y_transposed=*/false, out, pre, CUBLASLT_EPILOGUE_DGELU);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_gelu", &linear_gelu, "gelu(x @ w^T) and x @ w^T, one cuBLASLt GEMM (GELU_AUX)");
  m.def("linear_gelu_backward", &linear_gelu_backward, "(g @ w) * gelu'(pre), one cuBLASLt GEMM (DGELU)");
}
