// The torch backend's subject-wise attention op, written against ATen in C++.
//
// The same algorithm as semfid/backends/torch.py (TorchBackend.subject_forward / subject_backward,
// module docstring there): one chunk loop over the queries, the target and reference keys as one
// set of 2·M' keys, P recomputed in backward. On small layers (SDXL: 60 of 70 cross-attention
// layers have 16 queries) that loop is a few dozen tiny ATen calls, and in Python the interpreter
// between them cost more than the arithmetic; here the calls follow each other directly. The
// Python implementation stays the reference and the fallback: tests compare the two on every
// branch, and `semfid.backends.torch` uses this one only for CPU tensors in eager mode. Layers
// below the `small_work` size run in subject_small.cpp's plain loops instead (same contract).
//
// Shapes (validated in Python, semfid/_inputs.py): q [B, H, N, D], k / v [B, H, M, D|Dv],
// k_ref [B, H, M_ref, D], bias / ref_bias [B, H, M|M_ref] or undefined, tokens / ref_tokens
// [B, S] int64, weights [B, S] or undefined. acc = float32 (float64 for float64 inputs).

#include <torch/extension.h>

#include "row_exp.h"
#include "subject_small.h"

#include <algorithm>
#include <limits>
#include <optional>
#include <vector>

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Chunking and product orientation: the Python module's constants, passed in by the caller.
struct Tuning {
  int64_t block_elements;  // elements of one [B, H, chunk, K] probability block
  int64_t min_chunk;       // fewest query rows per chunk
  int64_t narrow;          // products with fewer output columns than this are computed transposed
  int64_t small_work;      // layers of at most this many forward multiply-adds take subject_small.cpp
};

// Rows per chunk for n queries (Python: _chunk_rows and _chunks): about block_elements / (B·H·K)
// rows, as round(n / that) chunks of equal size up to one row.
int64_t chunk_rows(const Tuning& t, int64_t B, int64_t H, int64_t K, int64_t n) {
  const int64_t target = std::max(t.min_chunk, t.block_elements / std::max<int64_t>(1, B * H * K));
  const int64_t count = std::max<int64_t>(1, (n + target / 2) / target);
  return std::max<int64_t>(1, (n + count - 1) / count);  // n = 0: no chunk
}

// a @ b for [batch, n, k] x [batch, k, m]; a narrow product (m < narrow < n) as (bᵀ aᵀ)ᵀ.
Tensor bmm_oriented(const Tuning& t, const Tensor& a, const Tensor& b) {
  if (b.size(-1) < t.narrow && t.narrow < a.size(-2)) {
    return at::bmm(b.transpose(1, 2), a.transpose(1, 2)).transpose(1, 2);
  }
  return at::bmm(a, b);
}

// total + a @ b in the orientation bmm_oriented gave total (undefined total: a @ b).
Tensor add_bmm(const Tuning& t, Tensor total, const Tensor& a, const Tensor& b) {
  if (!total.defined()) {
    return bmm_oriented(t, a, b);
  }
  if (total.is_contiguous()) {
    return total.baddbmm_(a, b);
  }
  total.transpose(1, 2).baddbmm_(b.transpose(1, 2), a.transpose(1, 2));
  return total;
}

// Keys of the op as [B·H, K, D] batches (Python: _SubjectKeys). paired: K = 2·W target + reference
// keys (the shorter set padded with -inf-masked keys); otherwise the target keys alone (K = M).
struct SubjectKeys {
  int64_t B, H, M, M_ref, width, segments;
  double scale;
  at::ScalarType acc;
  Tensor keys;       // [B·H, K, D]
  Tensor v;          // [B·H, W, Dv]
  Tensor bias;       // [B·H, 1, K] or undefined
  Tensor dead_rows;  // [B·H, 1, segments, 1] bool or undefined
  Tensor index;      // [B, segments·S]

  SubjectKeys(const Tensor& q, const Tensor& k, const Tensor& v_in, const Tensor& k_ref,
              const OptTensor& bias_in, const OptTensor& ref_bias, const Tensor& tokens,
              const Tensor& ref_tokens, double scale_, bool paired)
      : scale(scale_), acc(semfid_cpu::acc_dtype(q.scalar_type())) {
    B = k.size(0);
    H = k.size(1);
    M = k.size(2);
    const int64_t D = k.size(3);
    M_ref = k_ref.size(2);
    width = paired ? std::max(M, M_ref) : M;
    segments = paired ? 2 : 1;
    Tensor all;
    if (!paired) {
      all = k.to(acc);
    } else if (M == M_ref) {
      all = at::cat({k, k_ref}, 2).to(acc);
    } else {
      all = at::zeros({B, H, 2 * width, D}, q.options().dtype(acc));
      all.narrow(2, 0, M).copy_(k);
      all.narrow(2, width, M_ref).copy_(k_ref);
    }
    keys = all.reshape({B * H, -1, D});
    Tensor vv = v_in.to(acc);
    if (width != M) {  // zero value rows under the target segment's padding keys
      vv = at::constant_pad_nd(vv, {0, 0, 0, width - M});
    }
    v = vv.reshape({B * H, width, -1});
    make_bias(q, bias_in, ref_bias, paired);
    if (bias.defined()) {
      Tensor dead = at::isneginf(bias.view({B * H, 1, segments, width})).all(-1).unsqueeze(-1);
      if (dead.any().item<bool>()) {  // CPU only: a host read is free
        dead_rows = dead;
      }
    }
    index = paired ? at::cat({tokens, ref_tokens + width}, 1) : tokens;
  }

  void make_bias(const Tensor& q, const OptTensor& b, const OptTensor& rb, bool paired) {
    if (!paired) {
      if (b.has_value()) {
        bias = b->reshape({B * H, 1, M}).to(acc);
      }
      return;
    }
    if (!b.has_value() && !rb.has_value() && M == M_ref) {
      return;
    }
    const double inf = std::numeric_limits<double>::infinity();
    Tensor all = at::zeros({B, H, 2 * width}, q.options().dtype(acc));
    all.narrow(2, M, width - M).fill_(-inf);
    all.narrow(2, width + M_ref, width - M_ref).fill_(-inf);
    if (b.has_value()) {
      all.narrow(2, 0, M).copy_(*b);
    }
    if (rb.has_value()) {
      all.narrow(2, width, M_ref).copy_(*rb);
    }
    bias = all.view({B * H, 1, 2 * width});
  }

  // [B·H, c, D] contiguous acc-dtype copy of rows [start, start + c) of t [B, H, N, D], times the
  // logit scale when `scaled` (the scale is folded into the query chunk, not into the keys).
  Tensor queries(const Tensor& t, int64_t start, int64_t c, bool scaled) const {
    Tensor chunk = t.narrow(2, start, c);
    Tensor out = at::empty({B, H, c, t.size(3)}, t.options().dtype(acc));
    if (!scaled) {
      out.copy_(chunk);
    } else if (t.scalar_type() == acc) {
      at::mul_out(out, chunk, at::Scalar(scale));
    } else {
      out.copy_(chunk).mul_(scale);  // widen first: the product is formed in the acc dtype
    }
    return out.view({B * H, c, -1});
  }

  // P of a query chunk, [B·H, c, segments, W].
  Tensor probabilities(const Tensor& qc) const {
    Tensor s = bias.defined() ? at::baddbmm(bias, qc, keys.transpose(1, 2))
                              : at::bmm(qc, keys.transpose(1, 2));
    Tensor p = at::softmax(s.view({s.size(0), s.size(1), segments, width}), -1);
    if (dead_rows.defined()) {
      p.masked_fill_(dead_rows, 0.0);
    }
    return p;
  }

  Tensor map_index(int64_t rows) const {
    return index.unsqueeze(1).unsqueeze(1).expand({B, H, rows, index.size(1)});
  }

  // [B, (H,) c, segments·S] selected columns (A_t first, then A_r when paired).
  Tensor gather_maps(const Tensor& p, bool mean_heads) const {
    const int64_t c = p.size(1);
    Tensor a = at::gather(p.view({B, H, c, segments * width}), -1, map_index(c));
    return mean_heads ? a.mean(1) : a;
  }

  // dP[..., index] += G: g [B, c, segments·S] (already divided by H) or [B, H, c, ..].
  void scatter_map_grads(const Tensor& dp, Tensor g, bool mean_heads) const {
    const int64_t c = dp.size(1);
    if (mean_heads) {
      g = g.unsqueeze(1).expand({B, H, c, g.size(-1)});
    }
    dp.view({B, H, c, -1}).scatter_add_(-1, map_index(c), g);
  }
};

// [B]: Σ over every non-batch dim of w[b, s] · d²  (d [B, (H,) c, S]).
Tensor weighted_square_sum(const Tensor& d, const OptTensor& weights) {
  Tensor sq = d.square();
  if (weights.has_value()) {
    std::vector<int64_t> shape(d.dim(), 1);
    shape[0] = weights->size(0);
    shape.back() = weights->size(1);
    sq.mul_(weights->view(shape));
  }
  return sq.flatten(1).sum(1);
}

// The factor turning diff into the map gradient scattered onto dP (Python: _map_grad_scale).
Tensor map_grad_scale(const Tensor& dloss, const OptTensor& weights, int64_t N, int64_t H, int64_t S,
                      bool mean_heads, at::ScalarType acc) {
  Tensor c = dloss.to(acc) * (2.0 / static_cast<double>(N * H));
  const int64_t B = c.size(0);
  std::vector<int64_t> shape = mean_heads ? std::vector<int64_t>{B, 1, 1}
                                          : std::vector<int64_t>{B, 1, 1, 1};
  if (!weights.has_value()) {
    return c.mul_(1.0 / static_cast<double>(S)).view(shape);
  }
  shape.back() = S;
  return (c.unsqueeze(1) * weights->to(acc)).view(shape);
}

// Map gradients of one chunk to scatter onto dP (Python: _subject_map_grads).
Tensor subject_map_grads(const SubjectKeys& keys, const Tensor& p, const Tensor& diff,
                         const Tensor& factor, const OptTensor& dmaps, int64_t start, int64_t c,
                         int64_t S, bool mean_heads, bool detach_reference) {
  Tensor d;
  if (mean_heads) {
    d = diff.narrow(1, start, c);
  } else {
    Tensor a = keys.gather_maps(p, false);
    d = a.narrow(-1, 0, S) - a.narrow(-1, S, S);
  }
  Tensor g_t;
  if (factor.defined()) {
    g_t = d * factor;
  }
  if (dmaps.has_value()) {
    Tensor dm = dmaps->narrow(-2, start, c).to(keys.acc);
    const double alpha = mean_heads ? 1.0 / static_cast<double>(keys.H) : 1.0;
    g_t = g_t.defined() ? g_t.add_(dm, alpha) : dm.mul(alpha);
  }
  if (keys.segments == 1) {
    return g_t;
  }
  Tensor g_r;
  if (factor.defined() && !detach_reference) {
    g_r = -(d * factor);
  }
  if (!g_t.defined() && !g_r.defined()) {
    return Tensor();
  }
  return at::cat({g_t.defined() ? g_t : at::zeros_like(d), g_r.defined() ? g_r : at::zeros_like(d)}, -1);
}

Tensor nothing(const Tensor& q, at::ScalarType dtype) {
  return at::empty({0}, q.options().dtype(dtype));
}

}  // namespace

// (out, lse, lse_ref, loss, maps, diff) with the layouts of semfid.backends.base.empty_subject_outputs
// for a backend with SUBJECT_SAVES_LSE = False (lse and lse_ref empty).
std::vector<Tensor> subject_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                    const Tensor& k_ref, const OptTensor& bias,
                                    const OptTensor& ref_bias, const Tensor& tokens,
                                    const Tensor& ref_tokens, const OptTensor& weights, double scale,
                                    bool mean_heads, bool return_maps, int64_t block_elements,
                                    int64_t min_chunk, int64_t narrow, int64_t small_work) {
  if (semfid_cpu::small_layer_applies(q, k, v, k_ref, tokens, small_work)) {
    return semfid_cpu::small_forward(q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, weights, scale,
                                     mean_heads, return_maps);
  }
  at::NoGradGuard no_grad;
  const Tuning tune{block_elements, min_chunk, narrow, small_work};
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), S = tokens.size(1);
  SubjectKeys keys(q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, scale, /*paired=*/true);
  const at::ScalarType acc = keys.acc;
  Tensor out = at::empty({B, N, H, v.size(3)}, q.options()).transpose(1, 2);
  Tensor maps = !return_maps ? nothing(q, acc)
                : mean_heads ? at::empty({B, N, S}, q.options().dtype(acc))
                             : at::empty({B, H, N, S}, q.options().dtype(acc));
  Tensor diff = mean_heads ? at::empty({B, N, S}, q.options().dtype(acc)) : nothing(q, acc);
  Tensor loss;
  const int64_t rows = chunk_rows(tune, B, H, 2 * keys.width, N);
  for (int64_t start = 0; start < N; start += rows) {
    const int64_t c = std::min(rows, N - start);
    Tensor p = keys.probabilities(keys.queries(q, start, c, /*scaled=*/true));
    out.narrow(2, start, c).copy_(bmm_oriented(tune, p.select(2, 0), keys.v).view({B, H, c, -1}));
    Tensor a = keys.gather_maps(p, mean_heads);
    Tensor d;
    if (mean_heads) {  // the head-mean diff is saved for backward: written in place
      d = diff.narrow(1, start, c);
      at::sub_out(d, a.narrow(-1, 0, S), a.narrow(-1, S, S));
    } else {
      d = a.narrow(-1, 0, S) - a.narrow(-1, S, S);
    }
    if (return_maps) {
      maps.narrow(-2, start, c).copy_(a.narrow(-1, 0, S));
    }
    Tensor part = weighted_square_sum(d, weights);
    loss = loss.defined() ? loss.add_(part) : part;  // chunks in order: reproducible bits
  }
  if (!loss.defined()) {  // no queries: the mean over an empty set, as torch.mean gives it
    return {out, nothing(q, acc), nothing(q, acc),
            at::full({B}, std::numeric_limits<double>::quiet_NaN(), q.options().dtype(acc)), maps, diff};
  }
  const double h_red = mean_heads ? 1.0 : static_cast<double>(H);
  loss.mul_(1.0 / (static_cast<double>(N) * h_red * (weights.has_value() ? 1.0 : static_cast<double>(S))));
  return {out, nothing(q, acc), nothing(q, acc), loss, maps, diff};
}

// (dq, dk, dv, dk_ref) with the strides of their inputs; dk_ref empty when the reference is detached.
std::vector<Tensor> subject_backward(const Tensor& q, const Tensor& k, const Tensor& v,
                                     const Tensor& k_ref, const OptTensor& bias,
                                     const OptTensor& ref_bias, const Tensor& tokens,
                                     const Tensor& ref_tokens, const OptTensor& weights, double scale,
                                     bool mean_heads, bool detach_reference, const Tensor& diff,
                                     const OptTensor& dout, const OptTensor& dloss,
                                     const OptTensor& dmaps, int64_t block_elements,
                                     int64_t min_chunk, int64_t narrow, int64_t small_work) {
  if (semfid_cpu::small_layer_applies(q, k, v, k_ref, tokens, small_work)) {
    return semfid_cpu::small_backward(q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, weights, scale,
                                      mean_heads, detach_reference, diff, dout, dloss, dmaps);
  }
  at::NoGradGuard no_grad;
  const Tuning tune{block_elements, min_chunk, narrow, small_work};
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), S = tokens.size(1);
  Tensor dq = at::empty_like(q), dk_out = at::empty_like(k), dv_out = at::empty_like(v);
  Tensor dk_ref_out = detach_reference ? at::empty({0}, q.options()) : at::empty_like(k_ref);
  // Head-mean maps with a detached reference need no A_r again: diff was saved.
  const bool paired = !(mean_heads && detach_reference);
  SubjectKeys keys(q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, scale, paired);
  Tensor factor;
  if (dloss.has_value() && N > 0) {  // no queries: no chunk to scale
    factor = map_grad_scale(*dloss, weights, N, H, S, mean_heads, keys.acc);
  }
  const int64_t W = keys.width;
  // The key columns whose dS reaches dq and dk: the reference segment only when it is not detached.
  const int64_t k_grad = detach_reference ? W : keys.segments * W;
  Tensor keys_grad = keys.keys.narrow(1, 0, k_grad);
  Tensor dkeys, dv;
  const int64_t rows = chunk_rows(tune, B, H, keys.segments * W, N);
  for (int64_t start = 0; start < N; start += rows) {
    const int64_t c = std::min(rows, N - start);
    Tensor qc = keys.queries(q, start, c, /*scaled=*/true);  // dkeys = dSᵀ·q·scale comes out whole
    Tensor p = keys.probabilities(qc);
    Tensor p_t = p.select(2, 0);
    Tensor dp_t;
    if (dout.has_value()) {
      Tensor do_c = keys.queries(*dout, start, c, /*scaled=*/false);
      dp_t = at::bmm(do_c, keys.v.transpose(1, 2));
      dv = add_bmm(tune, dv, p_t.transpose(1, 2), do_c);
    }
    Tensor dp;
    if (paired || !dp_t.defined()) {
      dp = at::zeros_like(p);
      if (dp_t.defined()) {
        dp.select(2, 0).copy_(dp_t);
      }
    } else {
      dp = dp_t.view(p.sizes());
    }
    Tensor g = subject_map_grads(keys, p, diff, factor, dmaps, start, c, S, mean_heads, detach_reference);
    if (g.defined()) {
      keys.scatter_map_grads(dp, g, mean_heads);
    }
    Tensor ds = at::_softmax_backward_data(dp, p, -1, keys.acc).view({B * H, c, -1}).narrow(2, 0, k_grad);
    Tensor dq_rows = dq.narrow(2, start, c);
    Tensor dq_c = bmm_oriented(tune, ds, keys_grad).view({B, H, c, D});
    if (dq.scalar_type() == keys.acc) {
      at::mul_out(dq_rows, dq_c, at::Scalar(scale));  // out= must have the product's dtype
    } else {
      dq_rows.copy_(dq_c.mul_(scale));
    }
    dkeys = add_bmm(tune, dkeys, ds.transpose(1, 2), qc);
  }
  const int64_t M = k.size(2), M_ref = k_ref.size(2);
  if (!dkeys.defined()) {  // no queries: nothing reaches the keys
    dkeys = at::zeros({B * H, keys.segments * W, D}, q.options().dtype(keys.acc));
  }
  dkeys = dkeys.view({B, H, -1, D});
  dk_out.copy_(dkeys.narrow(2, 0, M));
  if (!dv.defined()) {
    dv_out.zero_();
  } else {
    dv_out.copy_(dv.view({B, H, W, -1}).narrow(2, 0, M));
  }
  if (!detach_reference) {
    dk_ref_out.copy_(dkeys.narrow(2, W, M_ref));
  }
  return {dq, dk_out, dv_out, dk_ref_out};
}

namespace {

// The whole differentiable op: autograd's node for it is this C++ class, so neither direction
// passes through Python (semfid.ops runs the same functions through a Python autograd.Function
// when this extension is missing, and through the semfid::subject_* custom ops when traced).
class SubjectFunction : public torch::autograd::Function<SubjectFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
      const Tensor& k_ref, const OptTensor& bias, const OptTensor& ref_bias, const Tensor& tokens,
      const Tensor& ref_tokens, const OptTensor& weights, double scale, bool mean_heads,
      bool detach_reference, bool return_maps, int64_t block_elements, int64_t min_chunk,
      int64_t narrow, int64_t small_work) {
    std::vector<Tensor> r = subject_forward(q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, weights,
                                            scale, mean_heads, return_maps, block_elements, min_chunk,
                                            narrow, small_work);
    const Tensor& diff = r[5];
    ctx->save_for_backward({q, k, v, k_ref, bias.value_or(Tensor()), ref_bias.value_or(Tensor()),
                            tokens, ref_tokens, weights.value_or(Tensor()), diff});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["mean_heads"] = mean_heads;
    ctx->saved_data["detach_reference"] = detach_reference;
    ctx->saved_data["return_maps"] = return_maps;
    ctx->saved_data["tuning"] = std::vector<int64_t>{block_elements, min_chunk, narrow, small_work};
    ctx->set_materialize_grads(false);
    if (!return_maps) {
      ctx->mark_non_differentiable({r[4]});
    }
    return {r[0], r[3], r[4]};  // out, loss, maps
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const bool return_maps = ctx->saved_data["return_maps"].toBool();
    const bool detach_reference = ctx->saved_data["detach_reference"].toBool();
    auto optional = [](const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); };
    OptTensor dout = optional(grads[0]), dloss = optional(grads[1]);
    OptTensor dmaps = return_maps ? optional(grads[2]) : OptTensor();
    torch::autograd::variable_list result(17);  // one per forward argument, undefined: no gradient
    if (!dout.has_value() && !dloss.has_value() && !dmaps.has_value()) {
      return result;
    }
    // As semfid.ops._refuse_double_backward: this backward takes diff as a constant.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "semfid.subject_attention does not support double backward (create_graph=True): its "
                "backward treats saved softmax statistics as constants, so second derivatives would "
                "be wrong. Take the first gradient without create_graph, or use the explicit-softmax "
                "reference (semfid.testing) where higher-order terms are needed.");
    auto saved = ctx->get_saved_variables();
    auto tuning = ctx->saved_data["tuning"].toIntVector();
    std::vector<Tensor> g = subject_backward(
        saved[0], saved[1], saved[2], saved[3], optional(saved[4]), optional(saved[5]), saved[6],
        saved[7], optional(saved[8]), ctx->saved_data["scale"].toDouble(),
        ctx->saved_data["mean_heads"].toBool(), detach_reference, saved[9], dout, dloss, dmaps,
        tuning[0], tuning[1], tuning[2], tuning[3]);
    result[0] = g[0];
    result[1] = g[1];
    result[2] = g[2];
    if (!detach_reference) {
      result[3] = g[3];
    }
    return result;
  }
};

}  // namespace

// (out, loss, maps) of the differentiable op; maps empty unless return_maps.
std::vector<Tensor> subject_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                      const Tensor& k_ref, const OptTensor& bias,
                                      const OptTensor& ref_bias, const Tensor& tokens,
                                      const Tensor& ref_tokens, const OptTensor& weights,
                                      double scale, bool mean_heads, bool detach_reference,
                                      bool return_maps, int64_t block_elements, int64_t min_chunk,
                                      int64_t narrow, int64_t small_work) {
  // The reference keys get no gradient when detached: they are not an input of the graph node.
  Tensor k_ref_in = detach_reference ? k_ref.detach() : k_ref;
  return SubjectFunction::apply(q, k, v, k_ref_in, bias, ref_bias, tokens, ref_tokens, weights, scale,
                                mean_heads, detach_reference, return_maps, block_elements,
                                min_chunk, narrow, small_work);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "semfid's torch-backend subject op in C++ (see csrc/cpu/subject_core.cpp)";
  m.def("subject_forward", &subject_forward, "(out, lse, lse_ref, loss, maps, diff)");
  m.def("subject_backward", &subject_backward, "(dq, dk, dv, dk_ref)");
  m.def("takes_small_loops", &semfid_cpu::small_layer_applies,
        "(q, k, v, k_ref, tokens, small_work): whether a layer runs in subject_small.cpp");
  m.def("subject_attention", &subject_attention,
        "(out, loss, maps), differentiable: forward and backward both run in C++");
  m.def("softmax_rows_", &semfid_cpu::softmax_rows_,
        "(s [R, M], bias [M] or None) -> (lse, inv_sum): s <- exp(s + bias - rowmax), row_exp.h");
  m.def("exp_rows_cols_", &semfid_cpu::exp_rows_cols_,
        "(s [C, N], row_bias [C] or None, col_sub [N]): s <- exp(s + row_bias - col_sub)");
  m.def("softmax_grad_cols_", &semfid_cpu::softmax_grad_cols_,
        "(dp [C, N], p [C, N], col_delta [N]): dp <- p * (dp - col_delta)");
}
