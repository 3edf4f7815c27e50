// torch's scaled_dot_product_attention on "mlx": which backend runs it.
//
// torch asks a device for its fused attention only through a C++ dispatch stub
// (_fused_sdp_choice_stub); without a PrivateUse1 entry every call decomposes into the math
// path (float32 casts, a product, softmax, a product: several kernels the GPU's host encodes
// one by one). Here "mlx" answers `overrideable` where MLX's fused attention computes exactly
// what torch asks, and torch then calls aten::_scaled_dot_product_fused_attention_overrideable,
// whose lowering (torch_mlx/ops/attention.py) is mx.fast.scaled_dot_product_attention, eager and
// inside compiled graphs alike. Everything else keeps the math path.
#include <ATen/Context.h>
#include <ATen/SDPBackend.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/DispatchStub.h>
#include <ATen/native/transformers/attention.h>
#include <c10/core/GradMode.h>

namespace torch_mlx {
namespace {

bool fused_fits(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const std::optional<at::Tensor>& mask, double dropout_p, bool enable_gqa) {
  // forward only: the fused op's backward is not provided, so anything autograd records
  // takes the math path (whose ops all have derivatives)
  bool needs_grad = c10::GradMode::is_enabled() &&
                    (q.requires_grad() || k.requires_grad() || v.requires_grad() ||
                     (mask.has_value() && mask->requires_grad()));
  if (needs_grad || dropout_p != 0.0) return false;
  if (q.is_nested() || k.is_nested() || v.is_nested()) return false;
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4) return false;
  auto dtype = q.scalar_type();
  if (dtype != at::kFloat && dtype != at::kHalf && dtype != at::kBFloat16) return false;
  if (k.scalar_type() != dtype || v.scalar_type() != dtype) return false;
  // sym_ sizes: under torch.compile with dynamic shapes the fake tensors' sizes are symbolic
  // (plain numel()/size() throw there); each comparison becomes a guard of the graph
  auto qs = q.sym_sizes(), ks = k.sym_sizes(), vs = v.sym_sizes();
  if (q.sym_numel() == 0 || k.sym_numel() == 0 || v.sym_numel() == 0) return false;
  if (qs[0] != ks[0] || ks[0] != vs[0]) return false;  // no batch broadcast
  if (qs[3] != ks[3] || ks[2] != vs[2] || ks[1] != vs[1]) return false;
  // grouped-query attention: MLX shares each key/value head among its query heads
  if (qs[1] != ks[1] && !(enable_gqa && qs[1] % ks[1] == 0)) return false;
  if (mask.has_value()) {
    const auto& m = *mask;
    if (m.dim() > 4) return false;
    auto mt = m.scalar_type();
    if (mt != at::kBool && mt != dtype) return false;
  }
  return true;
}

int64_t choose_sdp_backend(const at::Tensor& query, const at::Tensor& key,
                           const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
                           double dropout_p, bool /*is_causal*/, std::optional<double> /*scale*/,
                           bool enable_gqa) {
  auto& ctx = at::globalContext();  // torch.nn.attention.sdpa_kernel's choices
  if (ctx.userEnabledOverrideableSDP() &&
      fused_fits(query, key, value, attn_mask, dropout_p, enable_gqa)) {
    return static_cast<int64_t>(at::SDPBackend::overrideable);
  }
  if (ctx.userEnabledMathSDP()) return static_cast<int64_t>(at::SDPBackend::math);
  return static_cast<int64_t>(at::SDPBackend::error);
}

}  // namespace
}  // namespace torch_mlx

namespace at::native {
REGISTER_PRIVATEUSE1_DISPATCH(_fused_sdp_choice_stub, &torch_mlx::choose_sdp_backend)
}  // namespace at::native
