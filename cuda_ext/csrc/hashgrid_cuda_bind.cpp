// torch bindings of the CUDA hash-grid build (hashgrid_cuda.cu holds the kernels, torch-free).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "hashgrid_cuda.h"

namespace {

void check_inputs(const torch::Tensor& x, const torch::Tensor& offsets, const torch::Tensor& scales,
                  int64_t n_features) {
    TORCH_CHECK(x.is_cuda() && x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.size(1) == 3,
                "hashgrid: x must be a float32 CUDA tensor of shape (N, 3)");
    TORCH_CHECK(offsets.is_cuda() && offsets.scalar_type() == torch::kInt32 && offsets.dim() == 1 &&
                    offsets.is_contiguous() && offsets.device() == x.device(),
                "hashgrid: level offsets must be a contiguous int32 vector on x's device");
    TORCH_CHECK(scales.is_cuda() && scales.scalar_type() == torch::kFloat32 && scales.is_contiguous() &&
                    scales.numel() + 1 == offsets.numel() && scales.device() == x.device(),
                "hashgrid: level scales must be float32 on x's device with one value per level");
    TORCH_CHECK(n_features == 1 || n_features == 2 || n_features == 4 || n_features == 8,
                "hashgrid: n_features_per_level must be 1, 2, 4 or 8, got ", n_features);
}

void check_launch() {
    const char* err = hashgrid::last_error_cuda();
    TORCH_CHECK(err == nullptr, "hashgrid: CUDA kernel launch failed: ", err ? err : "");
}

void* current_stream() { return static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()); }

torch::Tensor forward(torch::Tensor x, torch::Tensor params, torch::Tensor offsets, torch::Tensor scales,
                      int64_t n_features) {
    check_inputs(x, offsets, scales, n_features);
    TORCH_CHECK(params.is_cuda() && params.scalar_type() == torch::kFloat32 && params.device() == x.device(),
                "hashgrid: params must be float32 on x's device");
    const c10::cuda::CUDAGuard guard(x.device());
    x = x.contiguous();
    params = params.contiguous();
    const int n_levels = (int)scales.numel();
    auto out = torch::empty({x.size(0), n_levels * n_features}, x.options());
    hashgrid::forward_cuda(x.data_ptr<float>(), params.data_ptr<float>(), offsets.data_ptr<int32_t>(),
                           scales.data_ptr<float>(), x.size(0), n_levels, (int)n_features, out.data_ptr<float>(),
                           current_stream());
    check_launch();
    return out;
}

void run_backward_params(const torch::Tensor& x, const torch::Tensor& grad_out, const torch::Tensor& offsets,
                         const torch::Tensor& scales, int64_t n_features, torch::Tensor& grad) {
    const int n_levels = (int)scales.numel();
    TORCH_CHECK(grad_out.size(0) == x.size(0) && grad_out.size(1) == n_levels * n_features,
                "hashgrid: grad_out has the wrong shape");
    hashgrid::backward_params_cuda(x.data_ptr<float>(), grad_out.data_ptr<float>(), offsets.data_ptr<int32_t>(),
                                   scales.data_ptr<float>(), x.size(0), n_levels, (int)n_features,
                                   grad.data_ptr<float>(), current_stream());
    check_launch();
}

torch::Tensor backward_params(torch::Tensor x, torch::Tensor grad_out, torch::Tensor offsets, torch::Tensor scales,
                              int64_t n_features, int64_t n_params) {
    check_inputs(x, offsets, scales, n_features);
    const c10::cuda::CUDAGuard guard(x.device());
    x = x.contiguous();
    grad_out = grad_out.to(torch::kFloat32).contiguous();
    auto grad = torch::zeros({n_params}, x.options());
    run_backward_params(x, grad_out, offsets, scales, n_features, grad);
    return grad;
}

// grad += d loss / d params, in place (the kernels add atomically into whatever grad holds).
void backward_params_accumulate(torch::Tensor x, torch::Tensor grad_out, torch::Tensor offsets,
                                torch::Tensor scales, int64_t n_features, torch::Tensor grad) {
    check_inputs(x, offsets, scales, n_features);
    TORCH_CHECK(grad.is_cuda() && grad.scalar_type() == torch::kFloat32 && grad.is_contiguous() &&
                    grad.device() == x.device(),
                "hashgrid: the gradient buffer must be a contiguous float32 vector on x's device");
    const c10::cuda::CUDAGuard guard(x.device());
    x = x.contiguous();
    grad_out = grad_out.to(torch::kFloat32).contiguous();
    run_backward_params(x, grad_out, offsets, scales, n_features, grad);
}

torch::Tensor backward_input(torch::Tensor x, torch::Tensor params, torch::Tensor grad_out, torch::Tensor offsets,
                             torch::Tensor scales, int64_t n_features) {
    check_inputs(x, offsets, scales, n_features);
    const c10::cuda::CUDAGuard guard(x.device());
    x = x.contiguous();
    params = params.contiguous();
    grad_out = grad_out.to(torch::kFloat32).contiguous();
    const int n_levels = (int)scales.numel();
    auto grad_x = torch::empty_like(x);
    hashgrid::backward_input_cuda(x.data_ptr<float>(), params.data_ptr<float>(), grad_out.data_ptr<float>(),
                                  offsets.data_ptr<int32_t>(), scales.data_ptr<float>(), x.size(0), n_levels,
                                  (int)n_features, grad_x.data_ptr<float>(), current_stream());
    check_launch();
    return grad_x;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "citygen hash-grid encoding, CUDA build";
    m.def("forward", &forward, "encode (N,3) positions -> (N, L*F)");
    m.def("backward_params", &backward_params, "gradient w.r.t. the flat parameters");
    m.def("backward_params_accumulate", &backward_params_accumulate,
          "add the gradient w.r.t. the flat parameters into a given buffer, in place");
    m.def("backward_input", &backward_input, "gradient w.r.t. the (N,3) positions");
}
