// Every op schema of recallprune, in one TORCH_LIBRARY block. The CPU and CUDA
// implementations register themselves beside their kernels (csrc/cpu, csrc/cuda).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import recallprune._C` loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "recallprune's compiled kernels (custom torch ops)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(recallprune, m) {
  // One fused UndecayedSGD step over lists of tensors (see recallprune/optim/functional.py).
  // keep_masks / decay_masks: empty, or one optional bool/uint8 mask per parameter.
  // momentum_buffers: empty when momentum == 0. grad_sums: empty unless the undecayed
  // gradient is being accumulated.
  m.def(
      "undecayed_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor?[] keep_masks, Tensor?[] decay_masks, Tensor(c!)[] grad_sums, *, float lr, "
      "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
      "bool is_first_step, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // The same with the learning rate as a one-element float32/float64 tensor, as torch's
  // _fused_sgd_.tensor_lr: a CUDA kernel reads it on the device (no host synchronisation).
  m.def(
      "undecayed_sgd_.tensor_lr(Tensor(a!)[] params, Tensor[] grads, "
      "Tensor(b!)[] momentum_buffers, Tensor?[] keep_masks, Tensor?[] decay_masks, "
      "Tensor(c!)[] grad_sums, *, Tensor lr, float momentum, float dampening, "
      "float weight_decay, bool nesterov, bool maximize, bool is_first_step, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");

  // Confusion counts of one batch added to `counts` (int64 [C*C], row = true class).
  // input: logits [N, C, S] (float) or predicted labels [N, S] (int32/int64);
  // target: labels [N, S] (int32/int64). Entries with target == ignore_index are skipped;
  // other entries with a label outside [0, C) are added to `invalid` (int64 [1]).
  m.def(
      "confusion_update_(Tensor(a!) counts, Tensor(b!) invalid, Tensor input, Tensor target, "
      "int num_classes, int? ignore_index=None) -> ()");
  // The same for one batch into fresh tensors: returns (counts [C, C], invalid [1]).
  m.def(
      "confusion_matrix(Tensor input, Tensor target, int num_classes, int? ignore_index=None) "
      "-> (Tensor, Tensor)");
}
