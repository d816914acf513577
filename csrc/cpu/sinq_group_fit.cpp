// Least-squares group fit and column-scale step of the sinq_fit quantizer
// (sinq_vllm/quantizer/groupfit.py and sinq_fit.py hold the math and a torch version).
//
// group_fit: per group x[0..g) (last dim of x [T, N, g]), codes q = clamp(round(.), 0, nmax)
// and the affine fit x ~ a*q + b (a = scale, b = -zero*scale):
//   * search mode (no init): for each delta, q = round((x - min) * (nmax + delta) / range),
//     least squares (a, b) to those codes; the best candidate, then `lloyd_steps` Lloyd steps
//     (nearest codes, least squares) kept only where they lower the error;
//   * refine mode (init scales/zeros): `lloyd_steps` Lloyd steps from them.
//   Optional weights [T, g] make every sum a weighted one (one weight per column of a slab).
// column_scale_step: per column k of slab s, t' = sum_n x*d / sum_n d*d with
//   d = scale*(round(x/t/scale + zero) - zero) the reconstruction of x/t.
//
// Sums are in double; the torch version sums in fp32, so the two can pick different
// candidates where two are equally good to ~1e-7 (tests/test_sinq_fit.py bounds the effect).
// Rounding is round-half-to-even (std::nearbyint), as torch.round.
#include "sinq_cpu_ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace sinq_cpu {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SINQ_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SINQ_CLONES
#endif

constexpr float kMinRange = 1e-4f;  // RTN's floor of (max - min) (quantizer/rtn.py)
constexpr double kInf = std::numeric_limits<double>::infinity();

struct Sums {
  double sw, sx, sxx;  // code-independent
};

struct Fit {
  double a, b, err;  // x - min ~ a*q + b
};

// Least squares of xm ~ a*q + b for codes q; err = inf when degenerate (all codes equal, a <= 0).
inline Fit solve(const Sums& s, double sl, double sll, double sxl) {
  const double det = s.sw * sll - sl * sl;
  if (!(det > 1e-9 * s.sw * std::max(sll, 1.0))) return {0.0, 0.0, kInf};
  const double a = (s.sw * sxl - s.sx * sl) / det;
  const double b = (sll * s.sx - sl * sxl) / det;
  if (!(a > 0)) return {a, b, kInf};
  return {a, b, s.sxx - a * sxl - b * s.sx};
}

// The sums a least-squares fit of (a, b) needs, over the codes of one candidate:
// range search (lloyd == false): q = clamp(round(xm * p)); Lloyd step (lloyd == true):
// q = clamp(round((xm - p) / a)), as the torch version (sub, then div). One loop for both
// (the branch is loop-invariant), each with the torch version's float expression.
SINQ_CLONES void fit_sums(const float* xm, const float* w, int64_t g, bool lloyd, float p, float a, float nmax,
                          double* out) {
  double sl = 0, sll = 0, sxl = 0;
  for (int64_t i = 0; i < g; ++i) {
    float q = lloyd ? std::nearbyint((xm[i] - p) / a) : std::nearbyint(xm[i] * p);
    q = std::min(std::max(q, 0.f), nmax);
    const double wi = w ? w[i] : 1.0;
    sl += wi * q;
    sll += wi * q * q;
    sxl += wi * q * xm[i];
  }
  out[0] = sl;
  out[1] = sll;
  out[2] = sxl;
}

void code_sums(const float* xm, const float* w, int64_t g, float mul, float nmax, double* out) {
  fit_sums(xm, w, g, false, mul, 1.f, nmax, out);
}

void lloyd_sums(const float* xm, const float* w, int64_t g, float b, float a, float nmax, double* out) {
  fit_sums(xm, w, g, true, b, a, nmax, out);
}

void fit_one(const float* x, const float* w, int64_t g, int nbits, const std::vector<float>& deltas, int64_t lloyd,
             const float* init_s, const float* init_z, float* xm, float* out_s, float* out_z) {
  const float nmax = static_cast<float>((1 << nbits) - 1);
  float lo = x[0], hi = x[0];
  for (int64_t i = 1; i < g; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  const float rng = hi - lo;
  const float floor_rng = std::max(rng, kMinRange);
  Sums base{0, 0, 0};
  for (int64_t i = 0; i < g; ++i) {
    xm[i] = x[i] - lo;
    const double wi = w ? w[i] : 1.0;
    base.sw += wi;
    base.sx += wi * xm[i];
    base.sxx += wi * static_cast<double>(xm[i]) * xm[i];
  }
  double sums[3];
  Fit best{0, 0, kInf};
  if (init_s) {
    // refine mode: codes of the current (s, z), rounded as the caller rounds them (x / s + z);
    // in xm coordinates the current line is xm ~ s*q + (-z*s - lo)
    const float s0 = *init_s, z0 = *init_z;
    const double b0 = -static_cast<double>(z0) * s0 - lo;
    double err0 = 0, sl = 0, sll = 0, sxl = 0;
    for (int64_t i = 0; i < g; ++i) {
      float q = std::nearbyint(x[i] / s0 + z0);
      q = std::min(std::max(q, 0.f), nmax);
      const double wi = w ? w[i] : 1.0;
      const double r = xm[i] - (s0 * static_cast<double>(q) + b0);
      err0 += wi * r * r;
      sl += wi * q;
      sll += wi * q * q;
      sxl += wi * q * xm[i];
    }
    best = {s0, b0, err0};
    for (int64_t step = 0; step < lloyd; ++step) {
      if (step > 0) {
        lloyd_sums(xm, w, g, static_cast<float>(best.b), static_cast<float>(best.a), nmax, sums);
        sl = sums[0];
        sll = sums[1];
        sxl = sums[2];
      }
      const Fit f = solve(base, sl, sll, sxl);
      if (f.err < best.err) best = f;
    }
    *out_s = static_cast<float>(best.a);
    *out_z = best.a == s0 && best.b == b0 ? z0 : static_cast<float>(-(best.b + lo) / best.a);
    return;
  }
  for (const float d : deltas) {
    code_sums(xm, w, g, (nmax + d) / floor_rng, nmax, sums);
    const Fit f = solve(base, sums[0], sums[1], sums[2]);
    if (f.err < best.err) best = f;
  }
  for (int64_t step = 0; step < lloyd && std::isfinite(best.err); ++step) {
    lloyd_sums(xm, w, g, static_cast<float>(best.b), static_cast<float>(best.a), nmax, sums);
    const Fit f = solve(base, sums[0], sums[1], sums[2]);
    if (f.err < best.err) best = f;
  }
  if (std::isfinite(best.err) && rng > kMinRange) {
    *out_s = static_cast<float>(best.a);
    *out_z = static_cast<float>(-(best.b + lo) / best.a);
  } else {  // near-constant group: min-max RTN's scale and zero
    const float s = floor_rng / nmax;
    *out_s = s;
    *out_z = -std::nearbyint(lo / s);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> group_fit(const at::Tensor& x, int64_t nbits, at::ArrayRef<double> deltas,
                                             int64_t lloyd_steps, const std::optional<at::Tensor>& weights,
                                             const std::optional<at::Tensor>& scales,
                                             const std::optional<at::Tensor>& zeros) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat, "group_fit: x must be a float32 [T, N, g] tensor");
  TORCH_CHECK(nbits >= 1 && nbits <= 8, "group_fit: nbits must be in 1..8");
  TORCH_CHECK(scales.has_value() == zeros.has_value(), "group_fit: pass both scales and zeros or neither");
  TORCH_CHECK(scales.has_value() || !deltas.empty(), "group_fit: search mode needs at least one delta");
  const int64_t T = x.size(0), N = x.size(1), g = x.size(2);
  const at::Tensor xc = x.contiguous();
  at::Tensor wc, sc, zc;
  if (weights) {
    TORCH_CHECK(weights->scalar_type() == at::kFloat && weights->numel() == T * g,
                "group_fit: weights must be float32 [T, g]");
    wc = weights->contiguous();
  }
  if (scales) {
    TORCH_CHECK(scales->scalar_type() == at::kFloat && scales->numel() == T * N &&
                    zeros->scalar_type() == at::kFloat && zeros->numel() == T * N,
                "group_fit: scales and zeros must be float32 [T, N, 1]");
    sc = scales->contiguous();
    zc = zeros->contiguous();
  }
  std::vector<float> ds(deltas.begin(), deltas.end());
  at::Tensor out_s = at::empty({T, N, 1}, x.options());
  at::Tensor out_z = at::empty({T, N, 1}, x.options());
  const float* px = xc.data_ptr<float>();
  const float* pw = weights ? wc.data_ptr<float>() : nullptr;
  const float* ps = scales ? sc.data_ptr<float>() : nullptr;
  const float* pz = scales ? zc.data_ptr<float>() : nullptr;
  float* os = out_s.data_ptr<float>();
  float* oz = out_z.data_ptr<float>();
  at::parallel_for(0, T * N, 64, [&](int64_t r0, int64_t r1) {
    std::vector<float> xm(g);
    for (int64_t r = r0; r < r1; ++r) {
      const float* w = pw ? pw + (r / N) * g : nullptr;
      fit_one(px + r * g, w, g, static_cast<int>(nbits), ds, lloyd_steps, ps ? ps + r : nullptr,
              pz ? pz + r : nullptr, xm.data(), os + r, oz + r);
    }
  });
  return {out_s, out_z};
}

namespace {

SINQ_CLONES void column_sums(const float* x, const float* t, int64_t N, int64_t g, const float* s, const float* z,
                             float nmax, double* num, double* den) {
  for (int64_t k = 0; k < g; ++k) num[k] = den[k] = 0.0;
  for (int64_t n = 0; n < N; ++n) {
    const float* xr = x + n * g;
    const float sn = s[n], zn = z[n];
    for (int64_t k = 0; k < g; ++k) {
      // as the torch version: (x / t) / s + z, rounded and clamped
      float q = std::nearbyint(xr[k] / t[k] / sn + zn);
      q = std::min(std::max(q, 0.f), nmax);
      const double d = (static_cast<double>(q) - zn) * sn;
      num[k] += xr[k] * d;
      den[k] += d * d;
    }
  }
}

}  // namespace

at::Tensor column_scale_step(const at::Tensor& x, const at::Tensor& t, const at::Tensor& scales,
                             const at::Tensor& zeros, int64_t nbits) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat, "column_scale_step: x must be a float32 [T, N, g] tensor");
  const int64_t T = x.size(0), N = x.size(1), g = x.size(2);
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == T * g, "column_scale_step: t must be float32 [T, g]");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == T * N && zeros.scalar_type() == at::kFloat &&
                  zeros.numel() == T * N,
              "column_scale_step: scales and zeros must be float32 [T, N, 1]");
  const at::Tensor xc = x.contiguous(), tc = t.contiguous(), sc = scales.contiguous(), zc = zeros.contiguous();
  at::Tensor out = at::empty({T, g}, x.options());
  const float* px = xc.data_ptr<float>();
  const float* pt = tc.data_ptr<float>();
  const float* ps = sc.data_ptr<float>();
  const float* pz = zc.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const float nmax = static_cast<float>((1 << nbits) - 1);
  at::parallel_for(0, T, 1, [&](int64_t s0, int64_t s1) {
    std::vector<double> num(g), den(g);
    for (int64_t s = s0; s < s1; ++s) {
      column_sums(px + s * N * g, pt + s * g, N, g, ps + s * N, pz + s * N, nmax, num.data(), den.data());
      for (int64_t k = 0; k < g; ++k) {
        const double v = den[k] > 0 ? num[k] / den[k] : 0.0;
        const float old = pt[s * g + k];
        po[s * g + k] = (v > 0 && std::isfinite(v)) ? static_cast<float>(v) : old;
      }
    }
  });
  return out;
}

}  // namespace sinq_cpu
