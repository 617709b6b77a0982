// Torch-facing side of the CPU flash attention: schema, checks, strides, threading, ISA choice.
// Kernel bodies: attention_impl.h; autograd and routing: fastdiff/ops/attention.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "attention_args.h"
#include "dispatch.h"

FD_DECLARE_ISA_KERNEL(void, attention_fwd, const FdAttnArgs&, int64_t, int64_t, int64_t)
FD_DECLARE_ISA_KERNEL(void, attention_bwd, const FdAttnArgs&, int64_t, int64_t)

namespace fastdiff::cpu {
namespace {

constexpr int64_t kQueryTile = 48;  // MQ of the vector kernels: query chunks are whole tiles

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu(), op, " (cpu): q, k, v must be CPU tensors, got ", t->device());
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16, op,
                " (cpu): dtype must be float32 or bfloat16, got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 4, op, ": q, k, v must be 4-d (B, H, L, D), got shape ", t->sizes());
  }
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
              ": q, k, v must share one dtype");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(1) == q.size(1) && v.size(1) == q.size(1) &&
                  k.size(3) == q.size(3) && v.size(3) == q.size(3) && k.size(2) == v.size(2),
              op, ": expected q (B, H, Lq, D), k and v (B, H, Lk, D); got ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes());
  TORCH_CHECK(q.size(3) > 0, op, ": head_dim must be positive");
}

// The kernels read rows with unit stride along D and any strides in B, H, L.
at::Tensor unit_last(const at::Tensor& t) { return t.stride(3) == 1 || t.size(3) == 1 ? t : t.contiguous(); }

void set_strides(const at::Tensor& t, int64_t* s) {
  for (int i = 0; i < 3; ++i) s[i] = t.size(i) == 1 ? 0 : t.stride(i);
}

void set_mask(FdAttnArgs& p, const std::optional<at::Tensor>& mask) {
  if (!mask.has_value()) return;
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.device().is_cpu() && m.scalar_type() == at::kFloat && m.dim() == 4, "attention (cpu): attn_mask must be "
              "a 4-d float32 CPU tensor (the Python wrapper converts bool masks), got ", m.scalar_type(), " ", m.sizes());
  TORCH_CHECK(m.size(3) == p.Lk && m.stride(3) == 1 && m.size(2) == p.Lq, "attention (cpu): attn_mask must be "
              "(B|1, H|1, Lq, Lk) with unit stride along Lk; got ", m.sizes(), " strides ", m.strides());
  TORCH_CHECK((m.size(0) == 1 || m.size(0) == p.B) && (m.size(1) == 1 || m.size(1) == p.H),
              "attention (cpu): attn_mask ", m.sizes(), " does not broadcast to (B, H) = (", p.B, ", ", p.H, ")");
  p.mask = m.data_ptr<float>();
  set_strides(m, p.smask);
}

FdAttnArgs base_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  FdAttnArgs p;
  p.B = q.size(0), p.H = q.size(1), p.Lq = q.size(2), p.Lk = k.size(2), p.D = q.size(3);
  p.bf16 = q.scalar_type() == at::kBFloat16;
  p.scale = static_cast<float>(scale);
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  set_strides(q, p.sq), set_strides(k, p.sk), set_strides(v, p.sv);
  return p;
}

// Returns (out, lse): out (B, H, Lq, D) contiguous in q's dtype, lse (B, H, Lq) fp32 (see attention_args.h).
// pair_dot: 0 = automatic (bf16 pair dot products where the CPU has AVX512_BF16), 1 = never (fp32 products),
// 2 = always for bf16 inputs (emulated without AVX512_BF16: for tests of that path's logic).
std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                 const at::Tensor& v_in, const std::optional<at::Tensor>& mask,
                                                 double scale, int64_t pair_dot) {
  check_qkv("attention", q_in, k_in, v_in);
  TORCH_CHECK(pair_dot >= 0 && pair_dot <= 2, "attention (cpu): pair_dot must be 0, 1 or 2, got ", pair_dot);
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  FdAttnArgs p = base_args(q, k, v, scale);
  set_mask(p, mask);
  const bool native = isa() == Isa::avx512_bf16;
  p.pair_dot = p.bf16 && p.D % 2 == 0 && (pair_dot == 2 || (pair_dot == 0 && native));
  p.native_bf16_dot = native;
  at::Tensor out = at::empty({p.B, p.H, p.Lq, p.D}, q.options());
  at::Tensor lse = at::empty({p.B, p.H, p.Lq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  TORCH_CHECK(p.Lk > 0, "attention (cpu): no keys (the Python wrapper returns zeros)");
  p.out = out.data_ptr(), p.lse = lse.data_ptr<float>();
  // Enough tasks for every thread: split each head's queries into chunks of whole tiles when B * H is small.
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads()), heads = p.B * p.H;
  const int64_t nchunk = std::max<int64_t>(1, std::min<int64_t>((want + heads - 1) / heads,
                                                                 (p.Lq + kQueryTile - 1) / kQueryTile));
  const int64_t qc = (p.Lq + nchunk - 1) / nchunk;
  const int64_t qc_tiles = (qc + kQueryTile - 1) / kQueryTile * kQueryTile;
  const int64_t ntask = heads * ((p.Lq + qc_tiles - 1) / qc_tiles);
  at::parallel_for(0, ntask, 1, [&](int64_t lo, int64_t hi) { FD_ISA_CALL(attention_fwd, p, qc_tiles, lo, hi); });
  return {out, lse};
}

// Returns (dq, dk, dv), contiguous, in q's dtype. One task per (batch, head).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(const at::Tensor& dout_in, const at::Tensor& q_in,
                                                             const at::Tensor& k_in, const at::Tensor& v_in,
                                                             const at::Tensor& out_in, const at::Tensor& lse,
                                                             const std::optional<at::Tensor>& mask, double scale) {
  check_qkv("attention_backward", q_in, k_in, v_in);
  TORCH_CHECK(dout_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes() &&
                  dout_in.scalar_type() == q_in.scalar_type() && out_in.scalar_type() == q_in.scalar_type() &&
                  dout_in.device().is_cpu() && out_in.device().is_cpu(),
              "attention_backward: grad and out must be CPU tensors of q's shape and dtype");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.dim() == 3 && lse.size(0) == q_in.size(0) &&
                  lse.size(1) == q_in.size(1) && lse.size(2) == q_in.size(2),
              "attention_backward: lse must be the forward's contiguous float32 (B, H, Lq) tensor");
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in), dout = unit_last(dout_in),
                   out = unit_last(out_in);
  FdAttnArgs p = base_args(q, k, v, scale);
  set_mask(p, mask);
  p.dout = dout.data_ptr(), p.o = out.data_ptr();
  set_strides(dout, p.sdo), set_strides(out, p.so);
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  at::Tensor dq = at::empty({p.B, p.H, p.Lq, p.D}, q.options());
  at::Tensor dk = at::empty({p.B, p.H, p.Lk, p.D}, q.options());
  at::Tensor dv = at::empty({p.B, p.H, p.Lk, p.D}, q.options());
  if (p.B * p.H == 0) return {dq, dk, dv};
  TORCH_CHECK(p.Lq > 0 && p.Lk > 0, "attention_backward (cpu): empty sequences are handled by the Python wrapper");
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  at::parallel_for(0, p.B * p.H, 1, [&](int64_t lo, int64_t hi) { FD_ISA_CALL(attention_bwd, p, lo, hi); });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace fastdiff::cpu

TORCH_LIBRARY_FRAGMENT(fastdiff, m) {
  // softmax(scale * q k^T + attn_mask) v, flash-style (no Lq x Lk matrix); lse: (B, H, Lq) fp32, base 2.
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float scale, int pair_dot) -> (Tensor, Tensor)");
  m.def("attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? attn_mask, "
        "float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("attention", &fastdiff::cpu::attention_fwd);
  m.impl("attention_backward", &fastdiff::cpu::attention_bwd);
}
