"""The TBPTT runner: chunk sequences, carry state, and (optionally) replace the truncated
future gradient with a synthetic one (DNI).

One chunk k covers steps [a, b) of a time-major stream:

    inputs  (N, B, ...)   ----[ a ........ b )----
    state s_k  -> make_trigger -> model -> s_{k+1} -> g_hat_{k+1} = M(s_{k+1})
    objective:  L_k + beta * <g_hat_{k+1}, s_{k+1}>            (one deferred backward)
    M's target at s_k:  dL_k/ds_k + lambda * J_k^T g_hat_{k+1}  (J_k = ds_{k+1}/ds_k)

The runner owns the walk, the update (clip, step), non-finite handling and the data-parallel
sync; what happens at the boundaries belongs to a `DNIStep` (dni_step.py). lambda == beta
comes free with the one backward pass; any other lambda adds a second vector-Jacobian
product through the recurrent core only (docs/design.md, "One chunk with DNI"). BP(lambda)
(`trace_decay` > 0, traces.py) also hands each TD error back to earlier boundaries.
"""
import contextlib
import math

import torch

from . import deferred, nest
from .dni_step import DNIStep
from .synthesizers import synthesizer_context
from .metrics import ChunkMetrics, read_metrics, read_values  # noqa: F401 (public here too)
from .streams import (check_streams, evaluate, forward_with_resets, initial_state,  # noqa: F401
                      zero_streams)
from .truncation import as_schedule, next_length


def window(context, start, steps):
    """`(B, steps * C)`: the rows `start .. start + steps - 1` of a `(N, B, C)` context stream,
    per stream, zeros past its end: what a synthesizer at the boundary before `start` sees
    of the steps that follow it (cDNI)."""
    rows = context[start:start + steps]
    if rows.shape[0] < steps:
        pad = rows.new_zeros((steps - rows.shape[0],) + tuple(context.shape[1:]))
        rows = torch.cat([rows, pad])
    return rows.movedim(1, 0).reshape(context.shape[1], -1)


def _context(context):
    """A `synthesizer_context` block for a given context; no block for None (the caller's
    own block, if any, stays in force)."""
    return synthesizer_context(context) if context is not None else contextlib.nullcontext()


class NonFiniteLossError(RuntimeError):
    """A chunk produced a NaN or infinite loss or gradient; no parameter was changed."""


class TBPTTRunner:
    """Truncated BPTT over time-major streams, with or without synthetic gradients.

    Args:
        model: `forward(inputs, state) -> (outputs, state)`, inputs time-major `(T, B, ...)`.
            If it has `init_state(batch_size)`, `run` can start without a state.
        loss_fn: `loss_fn(outputs, targets) -> scalar`, the chunk's mean loss.
        optimizer: steps the model (and the synthesizer, unless `synth_optimizer` is given);
            None for a runner that only evaluates and synthesizes (`train_chunk` refuses).
        truncation: chunk length: an int, or a schedule `() -> int` (see `RandomTruncation`).
        synthesizer: module `(state, context) -> gradient estimate` shaped like the state
            (e.g. `StateSynthesizer.mlp(state_dim(state))`); None: plain TBPTT.
        clip, synth_clip: max gradient norms of the model's and, clipped apart, the
            synthesizer's parameters (None: no clip; a shared clip hurts, docs/dni.md).
        synth_optimizer: an optimizer of its own for the synthesizer (and aux head).
        batch_dim: batch dimension of state tensors (None: the one before the features).
        on_nonfinite: "raise" (stop with NonFiniteLossError) or "skip" (drop the update,
            restart the state, go on).
        sync: data parallel (`distributed.GradientSync`): after each backward, gradients
            are averaged and trigger statistics summed over the ranks; None: one process.
        dni: a `DNIStep` (instead of `synthesizer` and the keywords below).
        sg_scale, bootstrap, warmup, target_scale, sg_cap, guard, calibrate, aux_head,
        aux_weight, replay, replay_chunks, refit, refit_every, refit_decay, trace_decay,
        trace_horizon: the DNI settings, passed to `DNIStep` (its docstring says what each
            does); the defaults are the stable setting of docs/dni.md. BP(lambda):
            `bootstrap=gamma, trace_decay=lambda`.
    """

    def __init__(self, model, loss_fn, optimizer, truncation=35, synthesizer=None,
                 sg_scale=0.1, bootstrap=None, clip=0.25, synth_clip=None, warmup=0,
                 target_scale="rms", sg_cap=1.0, guard=True, calibrate=False, aux_head=None,
                 aux_weight=0.0, synth_optimizer=None, batch_dim=None, on_nonfinite="raise",
                 sync=None, replay=0, replay_chunks=32, refit=0.0, trace_decay=0.0,
                 trace_horizon=32, dni=None, refit_every=1, refit_decay=1.0):
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        if dni is not None and synthesizer is not None:
            raise ValueError("pass the synthesizer to TBPTTRunner or to its DNIStep, not both")
        if aux_weight and synthesizer is None and dni is None:
            raise ValueError("DNI + Aux needs a synthesizer")
        if dni is None and synthesizer is not None:
            dni = DNIStep(synthesizer, sg_scale=sg_scale, bootstrap=bootstrap, warmup=warmup,
                          target_scale=target_scale, sg_cap=sg_cap, guard=guard,
                          calibrate=calibrate, aux_head=aux_head, aux_weight=aux_weight,
                          batch_dim=batch_dim, replay=replay, replay_chunks=replay_chunks,
                          refit=refit, trace_decay=trace_decay, trace_horizon=trace_horizon,
                          refit_every=refit_every, refit_decay=refit_decay)
        elif dni is None:
            DNIStep.check_settings(sg_scale, bootstrap, target_scale, sg_cap)
        if dni is not None and sync is not None:  # a rank's trigger gradients are W x one
            dni.target_scale = sync.local_target_scale(dni.target_scale)  # process's
        self.model, self.loss_fn, self.optimizer, self.sync = model, loss_fn, optimizer, sync
        self.schedule, self.dni = as_schedule(truncation), dni
        self.clip, self.synth_clip, self.synth_optimizer = clip, synth_clip, synth_optimizer
        self.batch_dim, self.on_nonfinite = batch_dim, on_nonfinite
        self.model_params = [p for p in model.parameters() if p.requires_grad]
        self.synth_params = dni.params if dni is not None else []
        if dni is not None:
            dni.check_optimizer(self.model_params, synth_optimizer or optimizer)
        self.step = 0

    # the DNI settings and state, where code written before DNIStep reads them
    interface = property(lambda self: self.dni.interface if self.dni else None)
    sg_scale = property(lambda self: self.dni.sg_scale if self.dni else None)
    bootstrap = property(lambda self: self.dni.bootstrap if self.dni else None)
    recoveries = property(lambda self: self.dni.recoveries if self.dni else 0)
    target_rms = property(lambda self: self.dni.target_rms if self.dni else None)
    calibration = property(lambda self: self.dni.calibration if self.dni else None)
    guard = property(lambda self: self.dni.guard if self.dni else None)
    replay = property(lambda self: self.dni.replay if self.dni else None)

    # ---- one chunk -------------------------------------------------------------------

    def train_chunk(self, inputs, targets, state, resets=None, future=True, next_resets=None,
                    context=None, next_context=None):
        """Train on one chunk and return the carried (detached) state and its metrics.

        Args:
            inputs, targets: `(T, B, ...)` time-major.
            state: the state entering the chunk.
            resets: optional `(T, B)` bool; stream b's state is zeroed before step t where
                True (gradients stop there).
            future: whether the stream goes on after this chunk (no synthetic gradient at
                the end of a sequence).
            next_resets: optional `(B,)` bool; streams that restart right after this chunk
                get no synthetic gradient.
            context, next_context: the synthesizer's context (cDNI) at the chunk's first
                boundary and at its last, e.g. `window(...)` of the data that follows each
                boundary. None: whatever `synthesizer_context` block the call is in.
        Returns:
            (state, ChunkMetrics)
        """
        if self.optimizer is None:
            raise ValueError("this runner has no optimizer: it can evaluate and synthesize, "
                             "not train; pass one to TBPTTRunner")
        self._zero_grad()
        metrics = ChunkMetrics(step=self.step, length=inputs.shape[0], loss=math.nan,
                               tokens=inputs.shape[0] * inputs.shape[1])
        try:
            if self.dni is None:
                new_state = self._plain_chunk(inputs, targets, state, resets, metrics)
            else:
                new_state = self._dni_chunk(inputs, targets, state, resets, future,
                                            next_resets, metrics, context, next_context)
            self._step()
            if self.dni is not None and self.dni.replay:
                self.dni.replay_steps(metrics.tokens, self.synth_optimizer or self.optimizer,
                                      self.model_params, self.sync, self.synth_clip)
        except NonFiniteLossError:
            if self.on_nonfinite == "raise":
                raise
            self._zero_grad()  # the update is dropped; the streams start again from zero
            metrics.skipped, new_state = True, nest.map_state(torch.zeros_like, state)
            if self.dni is not None:
                self.dni.restart()
        self.step += 1
        return nest.detach(new_state), metrics

    def _zero_grad(self):
        for opt in (self.optimizer, self.synth_optimizer):
            if opt is not None:
                opt.zero_grad(set_to_none=True)

    def _plain_chunk(self, inputs, targets, state, resets, metrics):
        outputs, new_state, _ = forward_with_resets(self.model, inputs, state, resets,
                                                    self.batch_dim)
        loss = self.loss_fn(outputs, targets)
        loss.backward()
        loss, norm, _ = self._after_backward(loss)
        loss, norm = read_values([loss, norm])  # the chunk's one host sync
        self._check_loss(loss, metrics)
        self._check_grad_norm(norm, metrics)
        return new_state

    def _dni_chunk(self, inputs, targets, state, resets, future, next_resets, metrics,
                   context=None, next_context=None):
        dni = self.dni
        with deferred.defer_backward():
            with _context(context):
                boundary = dni.begin(state, self.step, metrics.tokens)
            dni.record_chunk(boundary, future, self.model, inputs, resets)
            outputs, new_state, first = forward_with_resets(
                self.model, inputs, boundary.trigger, resets, self.batch_dim, dni.aux_on)
            loss = self.loss_fn(outputs, targets)
            deferred.backward(loss)
            if future:
                with _context(next_context):
                    dni.inject(boundary, new_state, first, next_resets, resets)
        dni.finish(boundary, future)
        loss, norm, injected = self._after_backward(loss, dni.interface.last_stats,
                                                    boundary.injected)
        # the chunk's one host sync: everything decided on below
        loss, norm, *numbers = read_values([loss, norm, *dni.pending(boundary), injected])
        self._check_loss(loss, metrics)
        dni.account(boundary, metrics, numbers, (self.optimizer, self.synth_optimizer))
        self._check_grad_norm(norm, metrics)
        dni.keep(state, boundary.context)
        return new_state

    def _after_backward(self, loss, stats=None, injected=None):
        """Data parallel: average the gradients, sum the trigger statistics and the injected
        norm over the ranks, take the global loss; then clip the model's gradients (never
        the synthesizer's). Returns (loss, the model's gradient norm, injected)."""
        if self.sync is not None:
            injected = self.sync.after_backward(self.model_params + self.synth_params, stats,
                                                [injected])[0]
            loss = self.sync.mean(loss)
        norm = torch.nn.utils.clip_grad_norm_(self.model_params,
                                              self.clip if self.clip else math.inf)
        return loss, norm, injected

    @torch.no_grad()
    def synthetic_gradient(self, state, tokens, context=None):
        """What this runner would inject at a boundary with `state` (a chunk of `tokens`
        steps x streams), before beta: g_hat in gradient units, capped; zeros without DNI.
        `context`: the synthesizer's context there (cDNI)."""
        if self.dni is None:
            return nest.map_state(torch.zeros_like, nest.detach(state))
        with _context(context):
            return self.dni.synthesize(state, self.dni.scale(tokens))[0]

    def _check_loss(self, loss, metrics):
        """After the backward, before anything else changes: a non-finite loss stops here."""
        metrics.loss = loss
        if not math.isfinite(loss):
            if self.dni is not None:
                self.dni.forget_reference()
            raise NonFiniteLossError(f"chunk {self.step}: loss is {loss}; lower the learning "
                                     "rate or tighten clip, or pass on_nonfinite='skip'")

    def _check_grad_norm(self, norm, metrics):
        metrics.grad_norm = norm
        if not math.isfinite(norm):
            raise NonFiniteLossError(f"chunk {self.step}: gradient norm is {norm}")

    def _step(self):
        if self.synth_clip and self.synth_params:
            torch.nn.utils.clip_grad_norm_(self.synth_params, self.synth_clip)
        for opt in (self.optimizer, self.synth_optimizer):
            if opt is not None:
                opt.step()

    # ---- whole streams -----------------------------------------------------------------

    def walk(self, inputs, targets, state=None, resets=None, start=0, final=True,
             next_resets=None, context=None, context_steps=None):
        """Train chunk by chunk from step `start`: the one chunk walk, resumable.

        A generator: after each chunk it yields `(end, state, metrics)`, where `end` is the
        position the next chunk starts from and `state` the carried (detached) state.
        Stop iterating at any point; `walk(..., state=state, start=end)` goes on from there
        (the truncation schedule's and the runner's own state live in `state_dict()`).

        Args:
            inputs, targets: `(N, B, ...)` time-major streams.
            state: the state entering step `start` (None: `model.init_state(B)`).
            resets: optional `(N, B)` bool marks of sequence starts (state zeroed there).
            start: the step to start from.
            final: the streams end at N: no synthetic gradient after the last chunk.
            next_resets: with `final=False`, the `(B,)` resets of the step after N (the next
                segment's first row): streams that restart there get no synthetic gradient.
            context: optional `(N, B, C)` stream the synthesizer is conditioned on (cDNI):
                at a boundary before step a it sees `window(context, a, context_steps)`,
                the rows of the `context_steps` steps after the boundary (zeros past N).
            context_steps: the window's length (default: the truncation length).
        """
        check_streams(inputs, targets, resets)
        if context is not None:
            context_steps = self._context_steps(context, inputs, context_steps)
        state = initial_state(self.model, inputs, state)
        self.model.train()
        if self.interface is not None:
            self.interface.train()
        a, N = start, inputs.shape[0]
        while a < N:
            b = min(a + next_length(self.schedule), N)
            contexts = {}
            if context is not None:  # both read now: a TokenContext's codes move with the model
                contexts = {"context": window(context, a, context_steps),
                            "next_context": window(context, b, context_steps)}
            state, metrics = self.train_chunk(
                inputs[a:b], targets[a:b], state,
                resets=resets[a:b] if resets is not None else None,
                future=b < N or not final,
                next_resets=(resets[b] if resets is not None else None) if b < N else next_resets,
                **contexts)
            yield b, state, metrics
            a = b

    def _context_steps(self, context, inputs, steps):
        if context.dim() != 3 or tuple(context.shape[:2]) != tuple(inputs.shape[:2]):
            raise ValueError(f"context must be a (N, B, C) stream beside the inputs "
                             f"{tuple(inputs.shape[:2])}, got shape {tuple(context.shape)}")
        steps = steps if steps is not None else getattr(self.schedule, "length", None)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError("with a context and a custom truncation schedule, pass "
                             "context_steps (the steps after a boundary the synthesizer sees)")
        return steps

    def run(self, inputs, targets, state=None, resets=None, on_chunk=None, final=True,
            context=None, context_steps=None):
        """All of `walk` (the same arguments): `on_chunk` is called with each ChunkMetrics
        (logging, progress bars). Returns (the final state, list of ChunkMetrics)."""
        history = []
        for _, state, metrics in self.walk(inputs, targets, state, resets, final=final,
                                           context=context, context_steps=context_steps):
            history.append(metrics)
            if on_chunk is not None:
                on_chunk(metrics)
        return state, history

    def evaluate(self, inputs, targets, state=None, resets=None, chunk_length=None):
        """`evaluate(self.model, self.loss_fn, ...)` in chunks of T (see the free function)."""
        check_streams(inputs, targets, resets)
        state = initial_state(self.model, inputs, state)
        return evaluate(self.model, self.loss_fn, inputs, targets, state, resets,
                        chunk_length or getattr(self.schedule, "length", 35), self.batch_dim)

    # ---- checkpoints -------------------------------------------------------------------

    def state_dict(self):
        """For resuming: the step count, the truncation schedule's and the DNI step's state."""
        sched = self.schedule.state_dict() if hasattr(self.schedule, "state_dict") else {}
        return {"step": self.step, "schedule": sched,
                **(self.dni.state_dict() if self.dni is not None else {})}

    def load_state_dict(self, state):
        self.step = int(state["step"])
        if hasattr(self.schedule, "load_state_dict"):
            self.schedule.load_state_dict(state["schedule"])
        if self.dni is not None:
            self.dni.load_state_dict(state)
