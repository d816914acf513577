// Registration of the SINQ CPU op as a torch custom op, plus a few Python helpers.
//
//   torch.ops.sinq_vllm.cpu_linear(x, qweight, scales_zeros, col_scales, shard_offsets,
//                                  bias, nbits, group_size, codebook=None, int8_act=False,
//                                  exact=False) -> Tensor
//   torch.ops.sinq_vllm.sinkhorn_stds(m, mu1, mu2) -> (std_rows, std_cols)   (quantizer)
//   torch.ops.sinq_vllm.group_fit(x, nbits, deltas, lloyd_steps, weights, scales, zeros)
//       -> (scales, zeros)                                                    (quantizer, sinq_fit)
//   torch.ops.sinq_vllm.column_scale_step(x, t, scales, zeros, nbits) -> t    (quantizer, sinq_fit)
//
// TORCH_LIBRARY_FRAGMENT (not TORCH_LIBRARY) because other extensions of this package
// (CUDA) register ops in the same `sinq_vllm` namespace. The fake (meta) implementation
// is registered from Python (sinq_vllm/kernels/cpu_backend.py).
#include <torch/extension.h>
#include <torch/library.h>

#include "sinq_cpu_ops.h"

TORCH_LIBRARY_FRAGMENT(sinq_vllm, m) {
  m.def(
      "cpu_linear(Tensor x, Tensor qweight, Tensor scales_zeros, Tensor col_scales, int[] shard_offsets, "
      "Tensor? bias, int nbits, int group_size, Tensor? codebook=None, bool int8_act=False, bool exact=False) -> Tensor");
  m.def("sinkhorn_stds(Tensor m, Tensor? mu1, Tensor? mu2) -> (Tensor, Tensor)");
  m.def(
      "group_fit(Tensor x, int nbits, float[] deltas, int lloyd_steps, Tensor? weights, Tensor? scales, "
      "Tensor? zeros) -> (Tensor, Tensor)");
  m.def("column_scale_step(Tensor x, Tensor t, Tensor scales, Tensor zeros, int nbits) -> Tensor");
}

TORCH_LIBRARY_IMPL(sinq_vllm, CPU, m) {
  m.impl("cpu_linear", &sinq_cpu::cpu_linear);
  m.impl("sinkhorn_stds", &sinq_cpu::sinkhorn_stds);
  m.impl("group_fit", &sinq_cpu::group_fit);
  m.impl("column_scale_step", &sinq_cpu::column_scale_step);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "SINQ linear op for CPU (AVX-512 BF16/VNNI, AVX2 or scalar, chosen at run time)";
  m.def("isa", &sinq_cpu::isa_name, "instruction set the kernels use now");
  m.def("supported_isas", &sinq_cpu::supported_isas, "instruction sets this CPU can run, best first");
  m.def("set_isa", &sinq_cpu::set_isa, "force an instruction set ('auto' for the best); returns the one in use");
}
