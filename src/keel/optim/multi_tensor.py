"""The multi-tensor engine behind keel's elementwise optimizers (Lion, AdEMAMix).

An elementwise update reads each parameter, its gradient and its state once and writes the parameter and state
once; what limits it is memory bandwidth. torch's eager `_foreach_*` ops make one pass over memory per op, so a
rule of five ops moves about 2.5x the bytes it must. keel therefore runs each rule in one of two ways:

- **eager** (`fused=False`): a handful of `torch._foreach_*` calls per param group (multi-tensor, no
  per-parameter Python loop) on devices with fast foreach kernels (CUDA, ...); on CPU, whose foreach ops run op
  by op over the whole list, the same calls over runs of at least `SMALL_NUMEL` elements (a large tensor alone),
  so temporaries stay in cache: 1.5-1.7x faster at nanoGPT-char shapes on one thread, same results bit for bit.
  Always available; the reference path of the tests.
- **fused** (`fused=True`): the rule written once per tensor and compiled by `torch.compile` over the whole
  list of tensors, so each tensor is read and written in a single pass. The first step compiles, and says so
  on stderr (one line when it starts, one with the seconds it took): 38-61 s from an empty torch.compile cache
  and 6-15 s with torch's on-disk cache, on one thread of a shared two-core machine (40-100 s cold has been
  seen). A new set of tensor shapes compiles again. If compilation fails, keel warns once and stays eager.

`fused=None` (the default) compiles only where the compiled steps are expected to repay the first one. In
`benchmarks/RESULTS.md` the compiled step is 2.8-5.2x faster than the eager one, and a cold compile is repaid
after 1674 steps for Lion at nanoGPT-char shapes (10.8M elements), 562 for AdEMAMix there, and 96 and 49 steps
at GPT-2-small shapes (124M): at most 1.8e10 elements x steps. keel compiles when elements x steps of the run
reach `COMPILE_PAYS_ELEMENT_STEPS` = 5e10, which leaves room for a compile twice as slow as measured. The
steps are the run's `total_steps` (the trainer, and `keel.optim.create` with `total_steps` or `timeline`, pass
it) or, unknown, `ASSUMED_RUN_STEPS` = 5000, so that an optimizer built without a run length compiles from
`FUSED_MIN_NUMEL` = 10M elements. A C++ compiler must be on the PATH. Small models, short runs and tests never
wait for a compiler; the previous default (1M elements, regardless of the run) would have needed about 17000 steps
to repay a cold compile of Lion.

On CUDA a step is far cheaper, so a compile takes more steps to repay: the eager path moves about 52 bytes per
element for Lion and 116 for AdEMAMix (one pass per foreach op) against 20 and 36 compiled, so at an H200's
3.6 TB/s the compiled step saves about 9e-12 (Lion) to 2.2e-11 (AdEMAMix) seconds per element, and a cold
compile of about 30 s is repaid after 1.4e12 to 3.4e12 elements x steps. keel compiles on CUDA when elements x
steps reach `CUDA_COMPILE_PAYS_ELEMENT_STEPS` = 3e12 (GPT-2 small, 163M elements, over 18000 steps); the
trainer's `compile: true` (or `fused: true`) compiles regardless, `compile: false` never. On CUDA the step's
scalars (LR, bias corrections) reach the device by a non-blocking copy from pinned memory, so a step never
waits for the GPU (a plain `torch.tensor(..., device="cuda")` would: a host synchronisation every step).
`benchmarks/bench_gpu.py` measures the compiled and eager steps and the first compiled step on the GPU.

Tensors smaller than `SMALL_NUMEL` (biases, norm gains) are gathered per param group into one flat buffer per
step and scattered back, so a model's hundred small tensors cost a few copies instead of a hundred kernels.
bfloat16 and float16 parameters keep their state in float32 (a low-precision EMA with a decay near 1 stalls:
(1 - beta) g falls below half an ulp of the average), are updated in float32 arithmetic, and are written back
in their own dtype. The state stays float32 through `state_dict` / `load_state_dict`.
"""

from __future__ import annotations

import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence

import torch

from keel.optim.closure import closure_loss
from keel.optim.torch_kernels import fast_foreach_devices

__all__ = [
    "ASSUMED_RUN_STEPS",
    "COMPILE_PAYS_ELEMENT_STEPS",
    "CUDA_COMPILE_PAYS_ELEMENT_STEPS",
    "FUSED_MIN_NUMEL",
    "SMALL_NUMEL",
    "MultiTensorOptimizer",
    "compile_pays",
    "follow_compile_choice",
]

#: With `fused=None`, compile when elements x steps of the run reach this (see the module docstring).
COMPILE_PAYS_ELEMENT_STEPS = 50_000_000_000
#: The same on CUDA, where the eager step is cheap and a compile takes longer to repay (see the module docstring).
CUDA_COMPILE_PAYS_ELEMENT_STEPS = 3_000_000_000_000
#: The run length assumed when the optimizer is not given `total_steps`.
ASSUMED_RUN_STEPS = 5000
#: With `fused=None` and no `total_steps`, compile when the optimizer holds at least this many elements (10M).
FUSED_MIN_NUMEL = COMPILE_PAYS_ELEMENT_STEPS // ASSUMED_RUN_STEPS
#: Tensors with fewer elements are gathered into one flat buffer per param group in the fused path.
SMALL_NUMEL = 1 << 16

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def compiler_available() -> bool:
    """Whether torch.compile can build CPU kernels here (a C++ compiler on the PATH)."""
    return any(shutil.which(cc) for cc in ("c++", "g++", "gcc", "clang++", "cc"))


def compile_pays(numel: int, total_steps: int | None = None, device_type: str = "cpu") -> bool:
    """Whether compiling the fused update of `numel` elements on `device_type` is expected to repay its first step
    over a run of `total_steps` steps (`ASSUMED_RUN_STEPS` if unknown), and a C compiler is here to do it."""
    steps = ASSUMED_RUN_STEPS if total_steps is None else total_steps
    threshold = CUDA_COMPILE_PAYS_ELEMENT_STEPS if device_type == "cuda" else COMPILE_PAYS_ELEMENT_STEPS
    return numel * steps >= threshold and compiler_available()


def follow_compile_choice(optimizer: torch.optim.Optimizer, choice: bool | str) -> None:
    """The trainer's `compile: true | false` decides a keel optimizer's `fused` where it was left null (auto keeps
    the optimizer's own rule); other optimizers are left as they are."""
    if isinstance(optimizer, MultiTensorOptimizer) and optimizer.fused is None and isinstance(choice, bool):
        optimizer.fused = choice


class MultiTensorOptimizer(torch.optim.Optimizer):
    """Base class: subclasses name their state tensors, the per-group scalars and the update rule twice.

    - `state_names`: the per-parameter state tensors (zeros at the first step, in the parameter's dtype, or
      float32 for bfloat16/float16 parameters).
    - `_scalars(group, step) -> list[float]`: the numbers one update needs (step counts from 1).
    - `_update_foreach(params, grads, states, scalars)`: the rule with `torch._foreach_*` ops on lists.
    - `_update_tensor(p, g, states, h)`: the same rule for one tensor, `h` a 1-D tensor of the scalars; this is
      the function `torch.compile` fuses over all tensors.
    """

    state_names: tuple[str, ...] = ()
    _compiled: Callable | None = None  # per subclass, created on first use
    _compiled_here: Callable | None = None  # the torch.compile wrapper keel made (tests may swap `_compiled`)
    _compiled_for: frozenset = frozenset()  # the tensor shapes it has been compiled for
    _compile_failed: bool = False

    def __init__(
        self, params, defaults: dict, fused: bool | None = None, total_steps: int | None = None
    ) -> None:
        if fused not in (None, True, False):
            raise ValueError(f"fused must be true, false or null (auto), got {fused!r}")
        if total_steps is not None and not (isinstance(total_steps, int) and total_steps >= 0):
            raise ValueError(f"total_steps must be a number of steps >= 0 or None, got {total_steps!r}")
        super().__init__(params, defaults)
        self.fused = fused
        self.total_steps = total_steps

    # --- what subclasses provide ---

    def _scalars(self, group: dict, step: int) -> list[float]:
        raise NotImplementedError

    @staticmethod
    def _update_foreach(params, grads, states, scalars) -> None:
        raise NotImplementedError

    @staticmethod
    def _update_tensor(p, g, states, h) -> None:
        raise NotImplementedError

    # --- the engine ---

    def kernels(self) -> dict:
        """The implementation this optimizer runs, as chosen for its parameters (``keel.optim.chosen_kernels``):
        ``fused``, the compiled update (null resolved by the parameters' device and size)."""
        return {"fused": self._use_fused()}

    def _use_fused(self) -> bool:
        if self.fused is False or type(self)._compile_failed:
            return False
        if self.fused is True:
            return True
        params = [p for g in self.param_groups for p in g["params"]]
        device_type = params[0].device.type if params else "cpu"
        return compile_pays(sum(p.numel() for p in params), self.total_steps, device_type)

    def _buckets(self):
        """Parameters with gradients, bucketed by (group, step, dtype); states created on first use."""
        buckets: dict[tuple, tuple[dict, list, list, list]] = {}
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if torch.is_complex(p):
                    raise RuntimeError(f"{type(self).__name__} does not support complex parameters")
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    for name in self.state_names:
                        state[name] = torch.zeros_like(p, dtype=_opmath(p.dtype), memory_format=torch.preserve_format)
                state["step"] += 1
                key = (index, state["step"], p.dtype, p.device)
                bucket = buckets.setdefault(key, (group, [], [], [[] for _ in self.state_names]))
                bucket[1].append(p)
                bucket[2].append(p.grad)
                for column, name in zip(bucket[3], self.state_names):
                    column.append(state[name])
        return buckets

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient."""
        loss = closure_loss(closure)
        plan = getattr(self, "_plan", None)
        if plan is not None and self.fused is not False:
            # fused, and the same parameters have gradients as at the last step: no need to bucket again
            with_grad = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            if tuple(map(id, with_grad)) == plan["ids"]:
                for p in with_grad:
                    self.state[p]["step"] += 1
                if self._run_plan(plan):
                    return loss
                for p in with_grad:
                    self.state[p]["step"] -= 1
            self._plan = None
        buckets = self._buckets()
        if not buckets:
            return loss
        if self._use_fused() and self._step_fused(buckets):
            return loss
        fast_foreach = fast_foreach_devices()
        for (_, step, dtype, device), (group, all_params, all_grads, all_states) in buckets.items():
            scalars = self._scalars(group, step)
            for chunk in _chunks(all_params, device.type in fast_foreach):
                params, grads, states = all_params[chunk], all_grads[chunk], [s[chunk] for s in all_states]
                if dtype in _LOW_PRECISION:  # the state is float32 already; parameters go through float32 copies
                    params32 = [p.float() for p in params]
                    grads32 = [g.float() for g in grads]
                    self._update_foreach(params32, grads32, states, scalars)
                    torch._foreach_copy_(params, params32)
                else:
                    self._update_foreach(params, grads, states, scalars)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, except that the state of bfloat16/float16 parameters stays (or becomes) float32.

        torch casts floating-point state to its parameter's dtype; keel keeps it in float32 so a resumed run
        continues exactly. The fused path's flat buffers are rebuilt from the loaded state at the next step.
        """
        super().load_state_dict(state_dict)
        self._plan = None
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params):
            if p.dtype not in _LOW_PRECISION or saved_id not in state_dict["state"]:
                continue
            saved = state_dict["state"][saved_id]
            for name in self.state_names:
                if isinstance(saved.get(name), torch.Tensor):
                    self.state[p][name] = saved[name].to(device=p.device, dtype=torch.float32, copy=True)

    def _build_plan(self, buckets, signature) -> dict:
        """Which tensors the compiled call sees: large ones as they are, small ones through flat buffers per bucket.

        Small parameters' state lives in the flat buffers (the state dict holds views of them), so only the
        parameters and gradients are copied in, and the parameters copied back, each step.
        """
        ids = tuple(id(p) for _, params, _, _ in buckets.values() for p in params)
        order = {id(p): i for i, p in enumerate(p for group in self.param_groups for p in group["params"])}
        if list(ids) != sorted(ids, key=order.__getitem__):
            ids = None  # buckets not in group order (split by step): always take the bucketing path
        big_params, big_states = [], [[] for _ in self.state_names]
        flats = []  # per bucket with small tensors: (params, param views, grad buffer, grad views, flat tensors)
        counts = []  # per bucket: (large tensors, whether it has a flat buffer), to repeat its row of scalars
        for (_, _, dtype, device), (group, params, _, states) in buckets.items():
            count, small = 0, []
            for i, p in enumerate(params):
                if p.numel() < SMALL_NUMEL:
                    small.append(i)
                    continue
                big_params.append(p)
                for column, state_column in zip(big_states, states):
                    column.append(state_column[i])
                count += 1
            if small:
                sizes = [params[i].numel() for i in small]
                small_params = [params[i] for i in small]
                flat_p = torch.empty(sum(sizes), dtype=dtype, device=device)
                flat_g = torch.empty_like(flat_p)
                p_views = [v.view_as(t) for v, t in zip(flat_p.split(sizes), small_params)]
                g_views = [v.view_as(t) for v, t in zip(flat_g.split(sizes), small_params)]
                flat_states = []
                for name, state_column in zip(self.state_names, states):
                    flat_s = torch.cat([state_column[i].reshape(-1) for i in small])
                    for v, p in zip(flat_s.split(sizes), small_params):
                        self.state[p][name] = v.view_as(p)
                    flat_states.append(flat_s)
                flats.append((small_params, p_views, g_views, flat_p, flat_g, flat_states))
            counts.append((group, params[0], count, bool(small)))
        return {"signature": signature, "ids": ids, "big_params": big_params, "big_states": big_states,
                "flats": flats, "counts": counts}

    def _step_fused(self, buckets) -> bool:
        """All buckets in one compiled call; small tensors through flat buffers. False if compiling failed."""
        signature = tuple((k[0], k[2], k[3], tuple(map(id, b[1]))) for k, b in buckets.items())
        plan = getattr(self, "_plan", None)
        if plan is None or plan["signature"] != signature:
            plan = self._plan = self._build_plan(buckets, signature)
        if not self._run_plan(plan):
            self._plan = None
            return False
        return True

    def _run_plan(self, plan: dict) -> bool:
        """Copy small tensors in, run the compiled update over everything, copy small parameters out."""
        grads = [p.grad for p in plan["big_params"]]
        params, states = list(plan["big_params"]), [list(column) for column in plan["big_states"]]
        for small_params, p_views, g_views, flat_p, flat_g, flat_states in plan["flats"]:
            torch._foreach_copy_(p_views, small_params)
            torch._foreach_copy_(g_views, [p.grad for p in small_params])
            params.append(flat_p)
            grads.append(flat_g)
            for column, flat_s in zip(states, flat_states):
                column.append(flat_s)
        big_rows, flat_rows = [], []
        for group, first, count, has_small in plan["counts"]:
            row = self._scalars(group, self.state[first]["step"])
            big_rows += [row] * count
            flat_rows += [row] if has_small else []
        hyper = _to_device(big_rows + flat_rows, params[0].device)
        cls = type(self)
        if cls._compiled is None:
            cls._compiled = cls._compiled_here = torch.compile(
                _make_list_update(cls._update_tensor), fullgraph=True, dynamic=False
            )
            cls._compiled_for = frozenset()
        shapes = tuple((tuple(p.shape), p.dtype, p.device.type) for p in params)
        compiling = cls._compiled is cls._compiled_here and shapes not in cls._compiled_for
        if compiling:  # a first step that can take a minute: say so
            numel = sum(p.numel() for p in params)
            print(
                f"keel: {cls.__name__} is compiling its fused update with torch.compile ({len(params)} tensors, "
                f"{numel / 1e6:.1f}M elements); seconds with torch's on-disk cache, up to a minute or two "
                "without (fused=False skips it)",
                file=sys.stderr,
                flush=True,
            )
            started = time.perf_counter()
        try:
            cls._compiled(params, grads, states, hyper)
        except Exception as error:  # noqa: BLE001  (any compiler failure: fall back to the eager path)
            cls._compile_failed = True
            warnings.warn(
                f"{cls.__name__}: torch.compile failed ({type(error).__name__}: {str(error)[:200]}); "
                "using the eager multi-tensor path from now on",
                RuntimeWarning,
                stacklevel=4,
            )
            return False
        if compiling:
            cls._compiled_for = cls._compiled_for | {shapes}
            seconds = time.perf_counter() - started
            print(f"keel: {cls.__name__} compiled in {seconds:.1f} s", file=sys.stderr, flush=True)
        for small_params, p_views, *_ in plan["flats"]:
            torch._foreach_copy_(small_params, p_views)
        return True


def _to_device(rows: list[list[float]], device: torch.device) -> torch.Tensor:
    """The step's scalars as a float64 tensor on `device`. On CUDA through pinned memory and a non-blocking copy:
    the host does not wait for the queued work (torch's caching host allocator keeps the pinned block until the
    copy has run)."""
    hyper = torch.tensor(rows, dtype=torch.float64)
    if device.type != "cuda":
        return hyper.to(device)
    return hyper.pin_memory().to(device, non_blocking=True)


def _chunks(tensors: Sequence[torch.Tensor], fast_foreach: bool) -> list[slice]:
    """How the eager path slices a bucket: whole where the device has fast foreach kernels (CUDA, ...); elsewhere
    (CPU) in runs of at least `SMALL_NUMEL` elements, one large tensor at a time.

    torch's CPU foreach ops are a loop of per-tensor ops, run op by op over the whole list, so each op's
    temporaries stream through memory; a run at a time keeps them in cache. Same ops, same results.
    """
    if fast_foreach:
        return [slice(None)]
    out, start, numel = [], 0, 0
    for i, t in enumerate(tensors):
        numel += t.numel()
        if numel >= SMALL_NUMEL:
            out.append(slice(start, i + 1))
            start, numel = i + 1, 0
    if start < len(tensors):
        out.append(slice(start, None))
    return out


def _make_list_update(update_tensor: Callable) -> Callable:
    def update_all(params: Sequence[torch.Tensor], grads, states, hyper: torch.Tensor) -> None:
        for i in range(len(params)):
            p, g = params[i], grads[i]
            opmath = _opmath(p.dtype)
            h = hyper[i].to(opmath)
            update_tensor(p, g.to(opmath), [s[i] for s in states], h)

    return update_all
