"""UniPTS's base-decayed sparsity objective (SPEC §4 (a)).

The only loss of UniPTS's sparse-training stage is a distillation loss from
the dense model (the teacher) to the sparse one (the student)::

    L   = (T²/B) · Σ_b Σ_j p_bj · (ln p_bj − ln q_bj / τ_e)
    p   = softmax(z_teacher / T)        T = 4
    q   = softmax(z_student)            (no temperature on the student)
    τ_e = τ_0 · γ^e                     τ_0 = 8, γ = 0.99, e the 0-based epoch

**Which "log base".** SPEC calls τ_e "a decaying logarithm base" and writes
the student term as ``log q_j / τ_e``. The two readings are

1. ``ln(q_j) / τ_e`` — the natural log divided by τ_e; and
2. ``log_{τ_e}(q_j) = ln(q_j) / ln(τ_e)`` — a logarithm to base τ_e.

We implement (1). It *is* a logarithm with a decaying base: ``ln(q)/τ =
log_b(q)`` with base ``b_e = exp(τ_e)``, which decays from ``e^8`` with the
epoch; τ_e is the base's exponent. (1) is also what the authors' released
code computes (``log_softmax(student) / (8·0.99^epoch)`` fed to a summed
KL-divergence, times ``T²/B``). Reading (2) is rejected: it is undefined at
τ_e = 1 (ln 1 = 0) and flips the sign of the student term for τ_e < 1, so
it could not be "zero when the student equals the teacher at τ_e = 1", and
it would scale the student term by ``1/ln 8 ≈ 0.48`` instead of ``1/8`` at
the first epoch.

Properties of (1), used by the tests:

* at τ_e = 1 it is ``T²·mean_b KL(p_b ‖ q_b)``, the usual distillation loss;
  with T = 1 as well, it is exactly 0 when the student's logits equal the
  teacher's (for T ≠ 1, ``p = softmax(z/T) ≠ softmax(z) = q``);
* for any τ_e > 0 its minimiser over q is still ``q = p`` (only the
  cross-entropy term depends on q, scaled by ``1/τ_e``), but its minimum is
  ``−(1 − 1/τ_e)·T²·mean_b H(p_b)``, not 0: it is not a divergence;
* its gradient w.r.t. the student's logits is ``(T²/B)·(q − p)/τ_e``: the
  decaying base is a per-epoch gain ``1/τ_e`` on the distillation gradient,
  growing from 1/8 as training proceeds.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

from flipout_jax import validate

DEFAULT_TEMPERATURE = 4.0
DEFAULT_TAU0 = 8.0
DEFAULT_TAU_DECAY = 0.99


def _check_positive(value, name: str) -> float:
  """A finite number > 0, :mod:`flipout_jax.validate`'s check."""
  return validate.number(value, name, low=0, low_open=True)


def tau_schedule(epoch, *, tau0: float = DEFAULT_TAU0,
                 decay: float = DEFAULT_TAU_DECAY):
  """The base exponent ``τ_e = τ_0 · decay^e`` of epoch ``e`` (0-based).

  Args:
    epoch: the 0-based epoch ``e`` (Python int/float, or a jnp scalar).
    tau0: ``τ_0 > 0`` (paper: 8).
    decay: ``γ > 0`` (paper: 0.99).

  Returns:
    ``τ_e``: a Python float for a Python ``epoch``, else a float32 jnp value.
    ``τ_0 = 8``: 8, 7.92, 7.8408, ...
  """
  tau0 = _check_positive(tau0, "tau0")
  decay = _check_positive(decay, "decay")
  if isinstance(epoch, numbers.Real) and not isinstance(epoch, bool):
    if not (math.isfinite(epoch) and epoch >= 0):
      raise ValueError(f"epoch: {epoch} must be finite and >= 0.")
    return tau0 * decay ** float(epoch)
  return jnp.float32(tau0) * jnp.float32(decay) ** jnp.asarray(epoch, jnp.float32)


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                      tau, *, temperature: float = DEFAULT_TEMPERATURE
                      ) -> jax.Array:
  """UniPTS's base-decayed distillation loss (module docstring for the math).

  ``L = (T²/B) · Σ_b Σ_j p_bj·(ln p_bj − ln q_bj / τ)``, ``p = softmax(z_t/T)``,
  ``q = softmax(z_s)``. The teacher is not differentiated through.

  Args:
    student_logits: ``[B, C]`` logits of the sparse model, or ``[B, ..., C]``
      (a sequence model's ``[B, T, V]``): every leading position is an
      example, so ``B`` in the formula is ``B·T`` (the mean over positions).
    teacher_logits: the dense model's logits, the same shape.
    tau: ``τ_e > 0`` (e.g. :func:`tau_schedule`); may be traced, so one
      compiled step serves every epoch.
    temperature: ``T > 0`` on the teacher's logits only (paper: 4).

  Returns:
    A float32 scalar.
  """
  temperature = _check_positive(temperature, "temperature")
  if student_logits.shape != teacher_logits.shape or student_logits.ndim < 2:
    raise ValueError(
        f"student_logits: shape {student_logits.shape} must be [B, ..., C] "
        f"and equal teacher_logits' {teacher_logits.shape}.")
  teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  log_p = jax.nn.log_softmax(teacher / temperature, axis=-1)
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  # exp(log_p) rather than softmax: p·ln p is then 0·finite where p
  # underflows, never 0·(−inf).
  per_example = jnp.sum(jnp.exp(log_p) * (log_p - log_q / tau), axis=-1)
  return temperature ** 2 * jnp.mean(per_example)
