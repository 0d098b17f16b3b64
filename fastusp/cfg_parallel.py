"""CFG parallelism: the guidance passes of one denoising step run at the same time on two groups of ranks.

diffusers' FLUX and Qwen-Image pipelines call the transformer once per guidance pass (conditional, then
unconditional, with true CFG), combine the two outputs, then call scheduler.step. With cfg=2, cfg group g runs the
passes whose index within the step is g (mod 2) and returns an empty placeholder for the others. When both passes
of a pair have run, one all-gather over the cfg groups fills the placeholders in place, before the pipeline reads
them (one broadcast per pass where their lengths differ: Qwen-Image 2.1 returns its prompt's tokens too). Kernels
are queued asynchronously, so both groups compute their pass at the same time.

A step whose last pass has no partner (no guidance: one call per step) is completed when the pipeline calls
scheduler.step, by a broadcast from the group that ran it. Outside the denoising loop (a direct call of the
transformer) every group runs every call itself.

This relies on what diffusers' pipelines do: the denoising loop, and nothing else, runs inside
`with self.progress_bar(...)`; the passes of one step do not read each other's outputs; a step ends with
scheduler.step.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from ._forward import forward_of, patch_attribute, wrap_forward


class ForwardSlot:
    """Holds the forward that the cfg wrapper calls, so compile_pipeline can put its CUDA graphs beneath the
    wrapper: a graph must not capture which pass this group runs or skips."""

    def __init__(self, forward):
        self.forward = forward


class GuidancePasses:
    """The passes of the current step on this rank: its own outputs and the placeholders it still has to fill."""

    def __init__(self, config, transformer):
        self.cfg, self.cfg_rank, self.group = config.cfg, config.cfg_rank, config.cfg_group
        self.out_features = transformer.proj_out.out_features
        self.dtype = transformer.proj_out.weight.dtype
        self.passes: list[torch.Tensor] = []  # this step's outputs, index = pass number; unfilled if not ours

    def run(self, forward, batch: int, tokens: int, device) -> torch.Tensor:
        """This group's pass: forward(); another group's: a [batch, tokens, out_features] placeholder."""
        index = len(self.passes)
        if index % self.cfg == self.cfg_rank:
            out = forward().contiguous()  # the exchange writes and sends storage: a view's order would be lost
        else:
            out = torch.empty(batch, tokens, self.out_features, dtype=self.dtype, device=device)
        self.passes.append(out)
        if len(self.passes) % self.cfg == 0:  # a full pair: every group has its pass, exchange them
            self._exchange(self.passes[-self.cfg:])
        return out

    def finish_step(self) -> None:
        """Before scheduler.step: fill a trailing pass that has no partner from the group that ran it."""
        unpaired = len(self.passes) % self.cfg
        if unpaired:
            tail = self.passes[-unpaired:]
            for g, out in enumerate(tail):
                dist.broadcast(out, src=dist.get_global_rank(self.group, g), group=self.group)
        self.reset()

    def reset(self) -> None:
        self.passes = []

    def _exchange(self, pair: list[torch.Tensor]) -> None:
        if any(out.shape != pair[0].shape for out in pair):  # passes of other lengths (Qwen-Image 2.1's prefill
            for g, out in enumerate(pair):                     # with prompts of other lengths): one broadcast each
                dist.broadcast(out, src=dist.get_global_rank(self.group, g), group=self.group)
            return
        mine = pair[self.cfg_rank].clone()  # all_gather writes every slot, this rank's own too
        dist.all_gather(pair, mine, group=self.group)


class DenoisingLoop:
    """Which pipeline, if any, is inside its denoising loop. Every diffusers pipeline runs that loop inside its
    progress bar, so the bar marks it (`track`). Some pipelines also set `_current_timestep` in the loop;
    FluxImg2Img, FluxInpaint and FluxControlNet of diffusers 0.42 do not. Pipelines that share the transformer
    (from_pipe) share its loop tracker."""

    def __init__(self, on_start):
        self.pipe = None  # the pipeline in its loop, None outside any
        self.on_start = on_start

    def start(self, pipe) -> None:
        self.pipe = pipe
        self.on_start()

    def track(self, pipe) -> None:
        make_bar = pipe.progress_bar

        @functools.wraps(make_bar)
        def progress_bar(*args, **kwargs):
            return _LoopBar(make_bar(*args, **kwargs), self, pipe)

        patch_attribute(pipe, "progress_bar", progress_bar)


class _LoopBar:
    """A pipeline's progress bar (tqdm) that marks the loop it wraps, in either form: `with bar:` or `for t in bar`."""

    def __init__(self, bar, loop: DenoisingLoop, pipe):
        self._bar, self._loop, self._pipe = bar, loop, pipe

    def __enter__(self):
        self._loop.start(self._pipe)
        return self._bar.__enter__()

    def __exit__(self, *exc):
        self._loop.pipe = None
        return self._bar.__exit__(*exc)

    def __iter__(self):
        self._loop.start(self._pipe)
        try:
            yield from self._bar
        finally:
            self._loop.pipe = None

    def __getattr__(self, name):
        return getattr(self._bar, name)


def apply_cfg_parallel(pipe, transformer, config, output_tokens) -> None:
    """Wrap the (sequence-sharded) forward so each cfg group runs its share of the guidance passes.
    output_tokens(inputs): how many tokens the forward returns for these inputs (a skipped pass's placeholder)."""
    slot = ForwardSlot(forward_of(transformer))
    passes = GuidancePasses(config, transformer)
    # a loop starts with no passes: a call that raised mid-step may have left some
    loop = DenoisingLoop(on_start=passes.reset)
    patch_attribute(transformer, "_fastusp_denoising_loop", loop)
    loop.track(pipe)

    def run_pass(_, inputs):
        forward = lambda: slot.forward(**inputs, return_dict=False)[0]
        if loop.pipe is None:  # a direct call, or one outside the loop: no steps to pair it in
            return forward()
        _hook_scheduler(loop.pipe.scheduler, passes)  # here, not once: users swap pipe.scheduler
        hidden = inputs["hidden_states"]
        return passes.run(forward, hidden.shape[0], output_tokens(inputs), hidden.device)

    wrap_forward(transformer, run_pass)
    patch_attribute(transformer, "_fastusp_forward_slot", slot)


def track_denoising_loop(pipe, transformer) -> None:
    """cfg=2 for another pipeline around an already parallelized transformer (from_pipe): mark its loop too."""
    transformer._fastusp_denoising_loop.track(pipe)


def _hook_scheduler(scheduler, passes: GuidancePasses) -> None:
    """scheduler.step ends a step: complete its passes first."""
    if getattr(scheduler.step, "_fastusp_passes", None) is passes:
        return
    patch_attribute(scheduler, "step", _run_first(passes.finish_step, scheduler.step, passes))


def _run_first(before, method, passes: GuidancePasses):
    @functools.wraps(method)  # keeps the signature: some pipelines inspect scheduler.step's parameters
    def hooked(*args, **kwargs):
        before()
        return method(*args, **kwargs)

    hooked._fastusp_passes = passes
    return hooked
