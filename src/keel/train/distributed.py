"""Data parallelism on ``torch.distributed``: the process group, rank helpers, collectives and model wrapping.

The trainer calls into this module at a few fixed places and stays one readable loop; with one process every
helper is a no-op (no process group is made and nothing changes, bitwise).

- **Process group.** Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in the environment) with more than
  one process, ``setup`` joins the group from the environment: gloo on CPU, NCCL on CUDA (one device per local
  rank). A group the caller made already is used as it is and left alone at the end.
- **Exactness.** Each rank draws its own shard of every global batch (the tasks shard by ``rank``, ``world_size``);
  the loss of a micro-batch is its sum divided by the *global* count, and DDP's all-reduce *sums* (a comm hook
  replaces its default mean; FSDP2's divide factor is set to 1), so the update equals one process on the whole
  global batch. Gradients synchronise only on the last micro-batch of an accumulation (``no_sync``).
- **Collective decisions.** Counts, the logged loss and evaluation sums are summed over ranks; rank 0 decides what
  only it can see (the run directory) and tells the others (``on_main``, ``from_main``).
- **One writer.** Rank 0 alone writes; state dicts are gathered to it in keel's normal format (full, unsharded).

nanoGPT's DDP (a main-process flag, a per-rank seed, ``no_sync`` on all but the last micro-step, one writer) is the
shape followed here; FSDP2 is ``torch.distributed.fsdp.fully_shard``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from keel.errors import KeelError
from keel.precision import resolve_precision

if TYPE_CHECKING:
    from keel.config import TrainConfig

__all__ = ["Distributed", "DistributedError", "LrScale", "NullMetricsLog", "check_strategy", "launched",
           "lr_scale", "lr_scaling_factor", "resolve_for_world", "setup"]

#: Set by ``keel train --nproc`` for its ranks: a folder where a failing rank writes its one-line message.
FAILURE_DIR_ENV = "KEEL_FAILURE_DIR"
#: Set by ``keel train --nproc`` for its ranks: the launcher's PID (a rank stops when that process is gone).
LAUNCHER_PID_ENV = "KEEL_LAUNCHER_PID"
#: Techniques that copy or export the whole model each step; with FSDP the model is sharded over the ranks.
_WHOLE_MODEL_TECHNIQUES = ("ema", "polyak", "swa", "snapshot")


class DistributedError(RuntimeError):
    """A rank lost contact with the others (one of them died or the network failed): the job cannot continue."""


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value is not None else default
    except ValueError:
        raise KeelError(f"environment: {name}={value!r} is not an integer; allowed: what torchrun sets") from None


@dataclass
class Distributed:
    """Where this process stands among the ranks of a run, and the collectives the trainer needs.

    ``strategy`` is ``"single"`` for one process, else ``"ddp"`` or ``"fsdp"``.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "single"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    # ---------------------------------------------------------------------------------------------- collectives

    def sum(self, *values: float) -> list[float]:
        """Each value summed over ranks (float64: integer counts stay exact up to 2**53)."""
        if not self.active:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device)
        _collective(dist.all_reduce, tensor)
        return tensor.tolist()

    def sum_counts(self, *counts: int) -> list[int]:
        """Integer counts summed over ranks (one all-reduce); the counts themselves with one process."""
        if not self.active:
            return list(counts)
        return [round(v) for v in self.sum(*counts)]

    def sum_dicts(self, values: dict[str, float]) -> dict[str, float]:
        """Dicts of floats summed key by key over ranks, in rank order, so every rank gets the same bits (a rank may
        lack keys: e.g. it had no evaluation batch)."""
        if not self.active:
            return values
        gathered = self.all_gather_object(values)
        keys = [k for part in gathered for k in part]
        return {k: math.fsum(part.get(k, 0.0) for part in gathered) for k in dict.fromkeys(keys)}

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        _collective(dist.all_gather_object, out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        _collective(dist.broadcast_object_list, box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            _collective(dist.barrier)

    def from_main(self, compute: Callable[[], Any]) -> Any:
        """``compute()`` on rank 0 only (e.g. a look at the run directory), its result on every rank."""
        if not self.active:
            return compute()
        return self.broadcast_object(compute() if self.is_main else None)

    def on_main(self, action: Callable[[], Any]) -> Any:
        """Run ``action`` on rank 0 only; if it raises KeelError, every rank raises it (so no rank waits forever
        for one that stopped). Returns what ``action`` returned on rank 0, None elsewhere."""
        if not self.active:
            return action()
        result, error = None, None
        if self.is_main:
            try:
                result = action()
            except KeelError as caught:
                error = caught
        message = self.broadcast_object(None if error is None else (type(error).__name__, str(error)))
        if error is not None:
            raise error
        if message is not None:
            raise KeelError(message[1])
        return result

    # ---------------------------------------------------------------------------------------------- the model

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training forward passes go through: DDP around ``model``, or ``model`` sharded in place
        by FSDP2 (build the optimizer after this). One process: ``model`` itself."""
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = DistributedDataParallel(model, device_ids=ids)
            wrapped.register_comm_hook(None, _allreduce_sum_hook)
            return wrapped
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for module in model.modules():
                if isinstance(module, nn.ModuleList):  # transformer blocks: each its own unit
                    for block in module:
                        fully_shard(block)
            fully_shard(model)
            for module in model.modules():  # sum over ranks: the loss is already divided by the global count
                if hasattr(module, "set_gradient_divide_factor"):
                    module.set_gradient_divide_factor(1.0)
                    module.set_force_sum_reduction_for_comms(True)  # plain sums (gloo has no PREMUL_SUM)
            return model
        return model

    def gradient_sync(self, train_model: nn.Module, sync: bool):
        """Context for one micro-batch's forward and backward: gradients are all-reduced only when ``sync`` (the
        last micro-batch of an accumulation)."""
        if self.strategy == "ddp" and not sync:
            return train_model.no_sync()
        if self.strategy == "fsdp":
            train_model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def eval_shard(self) -> tuple[int, int]:
        """(rank, world_size) to shard evaluation batches with. FSDP runs every forward on every rank (each one
        gathers the parameters), so there each rank evaluates all batches."""
        return (self.rank, self.world_size) if self.strategy == "ddp" else (0, 1)

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics) on every rank, as DDP does before each training forward: every
        evaluation then scores rank 0's model, the one checkpoints hold."""
        if not self.active:
            return
        for buffer in model.buffers():
            if type(buffer) is torch.Tensor:  # not a DTensor (FSDP shards parameters, not buffers)
                _collective(dist.broadcast, buffer.data, src=0)

    def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's weights in keel's normal format, on rank 0 (others get ``{}``; gathered with FSDP)."""
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            _reshard(model)
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return _collective(get_model_state_dict, model, options=options)
        return model.state_dict() if self.is_main else {}

    def load_model_state_dict(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            _reshard(model)
            set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
        else:
            model.load_state_dict(weights)

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state on rank 0 (FSDP: gathered, keyed by parameter name)."""
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            _reshard(model)
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return _collective(get_optimizer_state_dict, model, optimizer, options=options)
        return optimizer.state_dict() if self.is_main else {}

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                                  state: dict[str, Any]) -> None:
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            _reshard(model)
            set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state)

    # ---------------------------------------------------------------------------------------------- checkpoints

    def checkpoint_payload(self, rng: dict[str, Any]) -> dict[str, Any]:
        """What a checkpoint adds for the ranks: the world size and strategy, and every rank's RNG state (so each
        rank's dropout continues exactly on resume). Collective; the result matters on rank 0."""
        payload: dict[str, Any] = {"world_size": self.world_size, "strategy": self.strategy}
        if self.active:
            payload["rng_ranks"] = self.all_gather_object(rng)
        return payload

    def check_resume(self, payload: dict[str, Any], name: str, allow_world_size_change: bool) -> None:
        """Refuse to continue a checkpoint written by another number of processes (unless allowed) or another
        strategy: the data each rank reads, the RNG streams and the optimizer-state layout depend on them."""
        saved = int(payload.get("world_size", 1))
        if saved != self.world_size and not allow_world_size_change:
            raise KeelError(
                f"--resume: checkpoint {name} was written by a run of {_processes(saved)} and this is "
                f"{_processes(self.world_size)}; allowed: resume with {saved} process{'es' if saved > 1 else ''} "
                f"({_how_to_launch(saved)}), or pass --allow-world-size-change (see docs/distributed.md)")
        saved_strategy = payload.get("strategy", "single")
        sharded = {saved_strategy == "fsdp", self.strategy == "fsdp"}
        if len(sharded) == 2:
            raise KeelError(f"--resume: checkpoint {name} was written with strategy {saved_strategy} and this run uses "
                            f"{self.strategy}; allowed: the strategy it was written with (the optimizer state is laid "
                            "out differently)")

    def rank_rng(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        """This rank's RNG state from a checkpoint: its own when the world size is the same, rank 0's for rank 0,
        None for a rank the checkpoint did not have (it keeps the seed it started with)."""
        ranks = payload.get("rng_ranks")
        if ranks is not None and len(ranks) == self.world_size:
            return ranks[self.rank]
        return payload["rng"] if self.is_main else None

    # ---------------------------------------------------------------------------------------------- teardown

    def shutdown(self) -> None:
        """Leave the process group if ``setup`` made it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def setup(config: TrainConfig, device: torch.device) -> Distributed:
    """Join the process group torchrun describes in the environment (nothing to do for one process).

    Checks first what a launch cannot be: a world size that is not a positive integer, strategy fsdp where this
    torch has no FSDP2, more local ranks than CUDA devices.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:  # the caller's group
        world, rank = dist.get_world_size(), dist.get_rank()
        local = _env_int("LOCAL_RANK", rank)
        owns = False
    elif launched() and _env_int("WORLD_SIZE", 1) > 1:
        world, rank, local = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
        owns = True
    else:
        return Distributed(device=device)
    check_strategy(config, device, world)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise KeelError(f"LOCAL_RANK {local}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                            "allowed: at most one process per device (--nproc-per-node <= devices)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        _collective(dist.init_process_group, backend=backend, **kwargs)
    return Distributed(rank=rank, world_size=world, local_rank=local, strategy=config.strategy, device=device,
                       owns_group=owns)


def check_strategy(config: TrainConfig, device: torch.device, world_size: int) -> None:
    """Bad input for ``strategy`` on this machine, before anything starts."""
    if config.strategy != "fsdp" or world_size <= 1:
        return
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        raise KeelError(f"strategy: fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); this torch "
                        f"is {torch.__version__}; allowed here: ddp") from None
    if device.type == "cpu" and not dist.is_gloo_available():
        raise KeelError("strategy: fsdp on CPU needs the gloo backend, which this torch lacks; allowed here: ddp")
    enabled = [key for key in _WHOLE_MODEL_TECHNIQUES if getattr(getattr(config, key, None), "enabled", False)]
    if enabled:
        raise KeelError(f"strategy: fsdp shards the model, and {', '.join(enabled)} keep a whole copy of it; "
                        "allowed: strategy ddp with them, or fsdp without them")
    if resolve_precision(config.precision, device)[0] == "fp16":
        raise KeelError("strategy: fsdp with precision fp16 (a loss scaler over sharded gradients) is not supported; "
                        "allowed: precision fp32 or bf16 with fsdp, or strategy ddp")


def lr_scaling_factor(rule: str | None, base_batch: int | None, global_batch: int) -> float:
    """global_batch / base_batch (``linear``), its square root (``sqrt``), or 1 (no rule)."""
    if rule is None or base_batch is None:
        return 1.0
    ratio = global_batch / base_batch
    return ratio if rule == "linear" else math.sqrt(ratio)


@dataclass(frozen=True)
class LrScale:
    """What ``lr_scaling`` resolves to for a run (a result for the run's records, not a setting): its global batch
    (examples per optimizer step over all ranks) and the factor every LR of the schedule is multiplied by."""

    rule: str | None
    base_batch: int | None
    global_batch: int
    factor: float


def lr_scale(config: TrainConfig, world_size: int) -> LrScale:
    """``config.lr_scaling`` resolved for ``world_size`` processes (``config`` with its per-rank batch size already
    resolved: ``resolve_for_world``); factor 1 without a rule."""
    scaling = config.lr_scaling
    global_batch = config.data.batch_size * config.grad_accum * world_size
    factor = lr_scaling_factor(scaling.rule, scaling.base_batch, global_batch)
    return LrScale(scaling.rule, scaling.base_batch, global_batch, factor)


def resolve_for_world(config: TrainConfig, world_size: int) -> TrainConfig:
    """``config`` for ``world_size`` processes: ``data.batch_size`` per rank (from ``data.global_batch_size`` when
    set, which must divide by world size x grad_accum). Unchanged when it is not set."""
    data, accum = config.data, config.grad_accum
    update: dict[str, Any] = {}
    batch_size = data.batch_size
    if data.global_batch_size is not None:
        per_step = world_size * accum
        if data.global_batch_size % per_step:
            multiples = f"{per_step}, {2 * per_step}, {3 * per_step}, ..."
            raise KeelError(
                f"data.global_batch_size: {data.global_batch_size} does not divide into {world_size} process"
                f"{'es' if world_size > 1 else ''} x grad_accum {accum}; allowed: a multiple of {per_step} "
                f"({multiples}), or another number of processes")
        batch_size = data.global_batch_size // per_step
        if batch_size != data.batch_size:
            update["data"] = data.model_copy(update={"batch_size": batch_size})
    return config.model_copy(update=update) if update else config


def seed_rank(seed: int, rank: int) -> None:
    """Give rank ``rank`` > 0 its own random streams (dropout), seeded from the run's seed as nanoGPT does; rank 0
    keeps the run's own stream, so it draws what a single process would."""
    if rank == 0:
        return
    torch.manual_seed(seed + rank)
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)


class NullMetricsLog:
    """What ranks other than 0 log to: nothing (rank 0 alone writes metrics.jsonl and feeds the trackers)."""

    sinks: list = []

    def add_sink(self, sink) -> None: ...

    def write(self, record: dict[str, Any]) -> None: ...

    def offset(self) -> int:
        return 0

    def close(self) -> None: ...

    def enable_tensorboard(self, log_dir) -> None: ...


def report_failure(code: int, message: str) -> bool:
    """Under ``keel train --nproc``, hand this rank's failure (exit ``code``, one-line ``message``) to the launcher,
    which reports it once for the job; True when handed over (then the rank prints nothing)."""
    folder = os.environ.get(FAILURE_DIR_ENV)
    if not folder or not launched():
        return False
    rank = os.environ.get("RANK", "0")
    try:
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as handle:
            json.dump({"rank": int(rank), "code": code, "message": message,
                       "lost_contact": code == LOST_CONTACT_EXIT}, handle)
    except OSError:
        return False
    return True


def stop_with_launcher() -> None:
    """A rank started by ``keel train --nproc`` (or by torchrun's agent) stops when the launcher is gone: killed
    outright (SIGKILL), it cannot stop its ranks, which would train on with nobody to stop them. The rank then
    raises ``keel.parent_process.ParentGone`` in its main thread within a second (at once on Linux): the run's LOCK
    is released and the newest complete checkpoint stays, so ``--resume`` continues the run exactly."""
    import threading

    from keel import parent_process

    if not launched() or threading.current_thread() is not threading.main_thread():
        return
    if os.environ.get(LAUNCHER_PID_ENV):
        parent = _env_int(LAUNCHER_PID_ENV, 0)
    elif "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun's agent starts its ranks itself: it is their parent
        parent = os.getppid()
    else:
        return
    parent_process.stop_with_parent(parent)


def report_launcher_gone(parent: int, run_dir: str | os.PathLike | None) -> NoReturn:
    """One line (from rank 0) for ranks that stopped because their launcher is gone, then the end of the process
    (``parent_process.end_now``: the lock is released and the newest checkpoint complete already)."""
    import shutil
    import sys
    from pathlib import Path

    from keel import parent_process, rundir

    folder = os.environ.get(FAILURE_DIR_ENV)
    if folder:  # the launcher's temporary folder, which it can no longer remove
        shutil.rmtree(folder, ignore_errors=True)
    if os.environ.get("RANK", "0") == "0":
        latest = rundir.newest_intact(Path(run_dir) / rundir.CHECKPOINTS, report=lambda message: None) \
            if run_dir is not None else None
        world = os.environ.get("WORLD_SIZE", "N")
        where = (f"the last complete checkpoint is {latest} (continue with: keel train --nproc {world} --resume "
                 f"{run_dir})" if latest is not None else "no checkpoint was written")
        try:
            print(f"keel train: the launcher (PID {parent}) is gone; the ranks stopped; {where}", file=sys.stderr,
                  flush=True)
        except (OSError, ValueError):
            pass  # nobody reads this process's stderr any more
    parent_process.end_now()


def lost_contact(error: BaseException) -> str | None:
    """The one-line message for an error that means this rank lost the others (another rank died first, or the
    network failed), or None for any other error."""
    if isinstance(error, DistributedError):
        return f"{error}; the cause is in another rank"
    in_job = launched() and _env_int("WORLD_SIZE", 1) > 1
    if in_job and (isinstance(error, dist.DistError) or _looks_like_lost_peer(error)):
        first = " ".join(str(error).split())[:200]
        return f"lost contact with the other ranks ({first}); the cause is in another rank"
    return None


def rank_prefix() -> str:
    """'rank R: ' for messages of a process in a job of several, '' otherwise."""
    if launched() and _env_int("WORLD_SIZE", 1) > 1:
        return f"rank {os.environ.get('RANK')}: "
    return ""


#: Exit code of a rank that lost contact with the others (its own cause lies in another rank).
LOST_CONTACT_EXIT = 3


def _processes(n: int) -> str:
    return "a single process" if n == 1 else f"{n} processes"


def _how_to_launch(n: int) -> str:
    return "keel train --resume DIR" if n == 1 else f"keel train --nproc {n} or torchrun --nproc-per-node {n}"


def _collective(function, *args, **kwargs):
    """Call a torch.distributed function; a failure to reach the other ranks becomes DistributedError."""
    try:
        return function(*args, **kwargs)
    except (dist.DistError, RuntimeError) as error:
        if isinstance(error, dist.DistError) or _looks_like_lost_peer(error):
            first = " ".join(str(error).split())[:200]
            raise DistributedError(f"lost contact with the other ranks ({first})") from error
        raise


def _looks_like_lost_peer(error: BaseException) -> bool:
    text = str(error).lower()
    return any(word in text for word in ("connection", "closed by peer", "reset by peer", "broken pipe",
                                         "timed out", "timeout", "socket"))


def _reshard(model: nn.Module) -> None:
    """Put FSDP's sharded parameters back in place: a forward without backward (evaluation, the first-batch check)
    leaves the root module's parameters gathered, and state dicts are read and written in the sharded layout."""
    for module in model.modules():
        if hasattr(module, "reshard"):
            module.reshard()


def _allreduce_sum_hook(process_group, bucket):
    """DDP comm hook: all-reduce the gradient bucket as a SUM (DDP's default divides by the world size)."""
    group = process_group if process_group is not None else dist.group.WORLD
    future = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return future.then(lambda done: done.value()[0])
