"""GradPower's kernel layer: one small set of operations, three interchangeable backends.

==================  =======================================================================================
``eager``           plain torch ops on any device, dtype and layout: the reference and the fallback
``cpu``             the C kernel ``gradpower_kernel.c`` for CPU tensors (built and validated at first use)
``triton``          Triton kernels for accelerators (CUDA, ROCm, XPU); CPU tensors under ``TRITON_INTERPRET=1``
``dispatch``        picks a backend per (device type, dtype combination) once, self-checks it, falls back
``selfcheck``       the first-use probe a fast backend must pass
==================  =======================================================================================

Every backend offers the same operations on plain (local) tensors:

* ``phi_(tensors, p, *, grad_scale=None)``: in place ``g <- s * phi_p(g / s)``;
* ``phi_sum_sq(tensors, p, *, grad_scale=None) -> Tensor``: per-tensor sums of squares of that, read only;
* ``adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, group, p, *, coef=None)``: one AdamW step on
  ``coef * phi_p(g)`` in torch AdamW's state layout (``group``: a plain AdamW param group); ``steps``
  advance by one after the step succeeded;
* ``muon_momentum_(grad, buf, momentum, p, nesterov, *, coef=None) -> update``: Muon's momentum on
  ``coef * phi_p(grad)``, ``grad`` unchanged.

``coef`` is an optional 0-d float32 tensor on the tensors' device (None = 1). Callers (:mod:`hf_gradpower.
transform`, the optimizers) use :mod:`.dispatch`; nothing here imports them.
"""
