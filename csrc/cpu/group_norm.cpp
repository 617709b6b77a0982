// Torch-facing side of the fused GroupNorm (+ residual, + SiLU) on CPU: schema, checks, layout, threading, ISA
// choice. Kernel bodies: group_norm_impl.h; math: fastdiff/math/group_norm.h; autograd: fastdiff/ops/group_norm.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

#include "dispatch.h"
#include "fastdiff/math/group_norm.h"
#include "group_norm_args.h"

FD_DECLARE_ISA_KERNEL(void, group_norm_fwd_rows, const FdGnArgs&, int64_t, int64_t, float*)
FD_DECLARE_ISA_KERNEL(void, group_norm_fwd_rows, const FdGnArgs&, int64_t, int64_t, uint16_t*)
FD_DECLARE_ISA_KERNEL(void, group_norm_bwd_rows, const FdGnArgs&, int64_t, int64_t, float*)
FD_DECLARE_ISA_KERNEL(void, group_norm_bwd_rows, const FdGnArgs&, int64_t, int64_t, uint16_t*)
FD_DECLARE_ISA_KERNEL(void, group_norm_fwd_cl_sums, const FdGnArgs&, int64_t, int64_t, float*)
FD_DECLARE_ISA_KERNEL(void, group_norm_fwd_cl_sums, const FdGnArgs&, int64_t, int64_t, uint16_t*)
FD_DECLARE_ISA_KERNEL(void, group_norm_fwd_cl_apply, const FdGnArgs&, int64_t, int64_t, float*)
FD_DECLARE_ISA_KERNEL(void, group_norm_fwd_cl_apply, const FdGnArgs&, int64_t, int64_t, uint16_t*)
FD_DECLARE_ISA_KERNEL(void, group_norm_bwd_cl_sums, const FdGnArgs&, int64_t, int64_t, float*)
FD_DECLARE_ISA_KERNEL(void, group_norm_bwd_cl_sums, const FdGnArgs&, int64_t, int64_t, uint16_t*)
FD_DECLARE_ISA_KERNEL(void, group_norm_bwd_cl_apply, const FdGnArgs&, int64_t, int64_t, float*)
FD_DECLARE_ISA_KERNEL(void, group_norm_bwd_cl_apply, const FdGnArgs&, int64_t, int64_t, uint16_t*)

namespace fastdiff::cpu {
namespace {

// Memory layout the kernels run on. x is (B, C, *spatial); "channels-last" means C is the innermost dimension
// in memory ((B, *spatial, C) contiguous: torch.channels_last for 4-D, and the same idea for 3-D/5-D).
bool channels_last_like(const at::Tensor& x) {
  return x.dim() >= 3 && !x.is_contiguous() && x.movedim(1, -1).is_contiguous();
}

// The tensor in the kernels' layout: (B, C, n) contiguous, or (B, n, C) contiguous when cl.
at::Tensor to_layout(const at::Tensor& t, bool cl) {
  return cl ? t.movedim(1, -1).contiguous() : t.contiguous();
}

// Back to (B, C, *spatial) (a channels-last view when cl).
at::Tensor from_layout(const at::Tensor& t, bool cl) { return cl ? t.movedim(-1, 1) : t; }

void check_common(const char* op, const at::Tensor& x, int64_t G, const std::optional<at::Tensor>& w,
                  const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& r,
                  const std::optional<at::Tensor>& rc) {
  TORCH_CHECK(x.device().is_cpu(), op, " (cpu): x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              " (cpu): dtype must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 2, op, ": x must be (B, C, *), got shape ", x.sizes());
  const int64_t C = x.size(1);
  TORCH_CHECK(G > 0 && C % G == 0, op, ": num_channels (", C, ") must be divisible by num_groups (", G, ")");
  for (auto* p : {&w, &b}) {
    if (p->has_value()) {
      const at::Tensor& t = p->value();
      TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == C, op,
                  ": weight and bias must be contiguous float32 CPU tensors of C = ", C, " elements");
    }
  }
  if (r.has_value()) {
    TORCH_CHECK(r->sizes() == x.sizes() && r->scalar_type() == x.scalar_type() && r->device().is_cpu(), op,
                ": residual must be a CPU tensor of x's shape and dtype; got ", r->sizes(), " ", r->scalar_type());
  }
  if (rc.has_value()) {
    TORCH_CHECK(rc->device().is_cpu() && rc->scalar_type() == at::kFloat && rc->is_contiguous() &&
                    rc->numel() == x.size(0) * C, op,
                ": the per-channel residual must be a contiguous float32 CPU tensor of B * C elements");
  }
}

template <class F> void by_dtype(const at::Tensor& x, F&& f) {
  if (x.scalar_type() == at::kFloat) f(static_cast<float*>(nullptr));
  else f(static_cast<uint16_t*>(nullptr));
}

int64_t positions(const at::Tensor& x) { return x.size(1) ? x.numel() / (x.size(0) * x.size(1)) : 0; }

// Channels-last tasks: `chunk` positions each, about 16K elements (enough to amortise a task, small enough
// that both cores get work at SD sizes).
void cl_chunks(FdGnArgs& p) {
  p.chunk = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(p.C, 1));
  p.nchunk = (p.n + p.chunk - 1) / p.chunk;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_fwd(const at::Tensor& x_in, int64_t G,
                                                               const std::optional<at::Tensor>& weight,
                                                               const std::optional<at::Tensor>& bias,
                                                               const std::optional<at::Tensor>& residual,
                                                               const std::optional<at::Tensor>& residual_c,
                                                               double eps, bool silu) {
  check_common("group_norm", x_in, G, weight, bias, residual, residual_c);
  const int64_t B = x_in.size(0), C = x_in.size(1);
  const bool cl = channels_last_like(x_in);
  at::Tensor x = to_layout(x_in, cl);
  at::Tensor r = residual.has_value() ? to_layout(*residual, cl) : at::Tensor();
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor mean = at::empty({B, G}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({B, G}, x.options().dtype(at::kFloat));
  FdGnArgs p;
  p.B = B, p.C = C, p.G = G, p.n = positions(x_in), p.eps = static_cast<float>(eps), p.silu = silu;
  p.native_bf16 = isa() == Isa::avx512_bf16;
  if (B == 0 || p.n == 0) {  // nothing to normalise (the Python wrapper documents the empty case)
    mean.fill_(NAN);
    rstd.fill_(NAN);
    return {from_layout(y, cl), mean, rstd};
  }
  p.x = x.data_ptr(), p.r = r.defined() ? r.data_ptr() : nullptr, p.y = y.data_ptr();
  p.w = weight.has_value() ? weight->data_ptr<float>() : nullptr;
  p.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  p.rc = residual_c.has_value() ? residual_c->data_ptr<float>() : nullptr;
  p.mean = mean.data_ptr<float>(), p.rstd = rstd.data_ptr<float>();
  const int64_t cpg = C / G;
  by_dtype(x, [&](auto tag) {
    if (!cl) {
      const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(cpg * p.n, 1));
      at::parallel_for(0, B * G, grain, [&](int64_t lo, int64_t hi) { FD_ISA_CALL(group_norm_fwd_rows, p, lo, hi, tag); });
      return;
    }
    cl_chunks(p);
    std::vector<float> part(p.B * p.nchunk * 2 * C), shift(B * C), ca(B * C), ka(B * C);
    p.part = part.data(), p.shift = shift.data();
    at::parallel_for(0, B * p.nchunk, 1, [&](int64_t lo, int64_t hi) { FD_ISA_CALL(group_norm_fwd_cl_sums, p, lo, hi, tag); });
    std::vector<float> s1(C), s2(C);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = 0; c < C; ++c) {  // merge the chunks of sample b in double (same shift: plain sums)
        double d1 = 0, d2 = 0;
        for (int64_t j = 0; j < p.nchunk; ++j) {
          const float* q = p.part + (b * p.nchunk + j) * 2 * C;
          d1 += q[c];
          d2 += q[C + c];
        }
        s1[c] = static_cast<float>(d1), s2[c] = static_cast<float>(d2);
      }
      for (int64_t g = 0; g < G; ++g) {
        float m, rs;
        fd_gn_group_stats(s1.data() + g * cpg, s2.data() + g * cpg, p.shift + b * C + g * cpg, cpg, p.n, p.eps, &m, &rs);
        p.mean[b * G + g] = m, p.rstd[b * G + g] = rs;
        for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
          fd_gn_channel_affine(m, rs, p.w ? p.w[c] : 1.f, p.bias ? p.bias[c] : 0.f, p.rc ? p.rc[b * C + c] : 0.f,
                               &ca[b * C + c], &ka[b * C + c]);
        }
      }
    }
    p.ca = ca.data(), p.ka = ka.data();
    at::parallel_for(0, B * p.nchunk, 1, [&](int64_t lo, int64_t hi) { FD_ISA_CALL(group_norm_fwd_cl_apply, p, lo, hi, tag); });
  });
  return {from_layout(y, cl), mean, rstd};
}

// Returns dx (== d residual), dweight (C), dbias (C) and d residual_c (B, C; empty without one), fp32 for the
// small ones. The caller (Python autograd) drops what it does not need.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_bwd(
    const at::Tensor& dy_in, const at::Tensor& x_in, int64_t G, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& residual_c, const at::Tensor& mean, const at::Tensor& rstd, bool silu) {
  check_common("group_norm_backward", x_in, G, weight, bias, residual, residual_c);
  TORCH_CHECK(dy_in.sizes() == x_in.sizes() && dy_in.scalar_type() == x_in.scalar_type() && dy_in.device().is_cpu(),
              "group_norm_backward: grad ", dy_in.sizes(), " ", dy_in.scalar_type(), " does not match x ",
              x_in.sizes(), " ", x_in.scalar_type());
  const int64_t B = x_in.size(0), C = x_in.size(1), cpg = C / G;
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat && mean.is_contiguous() &&
                  rstd.is_contiguous() && mean.numel() == B * G && rstd.numel() == B * G,
              "group_norm_backward: mean and rstd must be the forward's contiguous float32 (B, G) statistics");
  const bool cl = channels_last_like(x_in);
  at::Tensor x = to_layout(x_in, cl);
  at::Tensor dy = to_layout(dy_in, cl);
  at::Tensor r = residual.has_value() ? to_layout(*residual, cl) : at::Tensor();
  at::Tensor dx = at::empty(x.sizes(), x.options());
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dw_part = at::zeros({B, C}, f32), db_part = at::zeros({B, C}, f32);
  at::Tensor drc = residual_c.has_value() ? at::zeros({B, C}, f32) : at::empty({0}, f32);
  FdGnArgs p;
  p.B = B, p.C = C, p.G = G, p.n = positions(x_in), p.silu = silu;
  p.native_bf16 = isa() == Isa::avx512_bf16;
  if (B == 0 || p.n == 0) return {from_layout(dx, cl), dw_part.sum(0), db_part.sum(0), drc};
  p.x = x.data_ptr(), p.r = r.defined() ? r.data_ptr() : nullptr, p.dy = dy.data_ptr(), p.y = dx.data_ptr();
  p.w = weight.has_value() ? weight->data_ptr<float>() : nullptr;
  p.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  p.rc = residual_c.has_value() ? residual_c->data_ptr<float>() : nullptr;
  p.mean = mean.data_ptr<float>(), p.rstd = rstd.data_ptr<float>();
  p.dw_part = dw_part.data_ptr<float>(), p.db_part = db_part.data_ptr<float>();
  p.drc = residual_c.has_value() ? drc.data_ptr<float>() : nullptr;
  by_dtype(x, [&](auto tag) {
    if (!cl) {
      const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(cpg * p.n, 1));
      at::parallel_for(0, B * G, grain, [&](int64_t lo, int64_t hi) { FD_ISA_CALL(group_norm_bwd_rows, p, lo, hi, tag); });
      return;
    }
    cl_chunks(p);
    const int64_t BC = B * C;
    std::vector<float> part(B * p.nchunk * 3 * C), ca(BC), ka(BC), cd(BC), cb(BC), cc(BC);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t g = c / cpg;
        fd_gn_channel_affine(p.mean[b * G + g], p.rstd[b * G + g], p.w ? p.w[c] : 1.f, p.bias ? p.bias[c] : 0.f,
                             p.rc ? p.rc[b * C + c] : 0.f, &ca[b * C + c], &ka[b * C + c]);
      }
    }
    p.part = part.data(), p.ca = ca.data(), p.ka = ka.data();
    at::parallel_for(0, B * p.nchunk, 1, [&](int64_t lo, int64_t hi) { FD_ISA_CALL(group_norm_bwd_cl_sums, p, lo, hi, tag); });
    std::vector<float> sdz(C), sdzv(C), sv(C);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        double d0 = 0, d1 = 0, d2 = 0;
        for (int64_t j = 0; j < p.nchunk; ++j) {
          const float* q = p.part + (b * p.nchunk + j) * 3 * C;
          d0 += q[c], d1 += q[C + c], d2 += q[2 * C + c];
        }
        sdz[c] = static_cast<float>(d0), sdzv[c] = static_cast<float>(d1), sv[c] = static_cast<float>(d2);
      }
      for (int64_t g = 0; g < G; ++g) {
        const float m = p.mean[b * G + g], rs = p.rstd[b * G + g];
        float mg, mgx;
        fd_gn_bwd_group(p.w ? p.w + g * cpg : nullptr, sdz.data() + g * cpg, sdzv.data() + g * cpg, cpg, p.n, rs, &mg,
                        &mgx);
        for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
          const int64_t i = b * C + c;
          fd_gn_bwd_coefs(p.w ? p.w[c] : 1.f, p.rc ? p.rc[i] : 0.f, m, rs, mg, mgx, &cd[i], &cb[i], &cc[i]);
          p.dw_part[i] = rs * sdzv[c];
          p.db_part[i] = sdz[c];
          if (p.drc) p.drc[i] = cd[i] * sdz[c] + cb[i] * sv[c] - static_cast<float>(p.n) * rs * mg;
        }
      }
    }
    p.cd = cd.data(), p.cb = cb.data(), p.cc = cc.data();
    at::parallel_for(0, B * p.nchunk, 1, [&](int64_t lo, int64_t hi) { FD_ISA_CALL(group_norm_bwd_cl_apply, p, lo, hi, tag); });
  });
  return {from_layout(dx, cl), dw_part.sum(0), db_part.sum(0), drc};
}

}  // namespace
}  // namespace fastdiff::cpu

TORCH_LIBRARY_FRAGMENT(fastdiff, m) {
  // y = act(group_norm(x + residual + residual_c[:, :, None...]) * weight + bias); mean/rstd: (B, G) fp32.
  m.def("group_norm(Tensor x, int num_groups, Tensor? weight, Tensor? bias, Tensor? residual, Tensor? residual_c, "
        "float eps, bool silu) -> (Tensor, Tensor, Tensor)");
  m.def("group_norm_backward(Tensor grad, Tensor x, int num_groups, Tensor? weight, Tensor? bias, Tensor? residual, "
        "Tensor? residual_c, Tensor mean, Tensor rstd, bool silu) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("group_norm", &fastdiff::cpu::group_norm_fwd);
  m.impl("group_norm_backward", &fastdiff::cpu::group_norm_bwd);
}
