"""Several processes (GPUs, machines) with torch.distributed: DDP or FSDP2 (`fully_shard`).

Each rank trains on its own slice of every micro-batch of every objective, so the global
micro-batch is `micro_batch * world_size` pairs; a rank scales its loss by its own pair count
and the gradient reduction averages over ranks, which together give the mean over the global
window (the same weights as one process with the same global batch).

`fsdp`: each rank holds a shard of every parameter, so its [k, P_rank] gradient buffer holds a
shard of every per-objective gradient. The Gram matrix is a sum over shards: each rank computes
its partial Gram, ONE all-reduce (issued without a host sync) of the k*k Gram entries together
with the 3k window statistics (loss, margin, accuracy) gives every rank the same numbers,
every rank solves the same problem (bit-identical coefficients) and combines its own shards.
Nothing of size P crosses the network beyond what FSDP itself moves.

`ddp`: DistributedDataParallel all-reduces (averages) each objective's gradient once per
window (no_sync on the earlier micro-batches), so every rank holds the full, identical
gradients and computes the Gram locally; only the 3k statistics are all-reduced.

Checkpoints: rank 0 writes the same folder as a single process. Under fsdp the shards are
gathered into full CPU state dicts first (torch.distributed.checkpoint's full-state options),
and a resume loads the full state on every rank and shards it again; the run folder must be
on a file system every rank can read. Resuming needs the same number of ranks (the sampler
checks the global micro-batch). Only rank 0 writes metrics, plots and the final model.
"""

import contextlib
import dataclasses
import os

import torch
import torch.distributed as dist

from mofast import dpo

PARALLEL = ("none", "ddp", "fsdp")


@dataclasses.dataclass(frozen=True)
class Context:
    """Where this process sits: the parallel mode, its rank and the number of ranks."""

    parallel: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.parallel == "fsdp"


def setup(parallel: str) -> Context:
    """Join the process group `torchrun` describes (or the one already initialised).

    NCCL for CUDA tensors where CUDA is available, gloo for CPU tensors. Raises ValueError
    when the launch and the mode disagree: several processes with `parallel: none`, or
    ddp/fsdp without a launcher.
    """
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if parallel == "none":
        if launched > 1 or (dist.is_initialized() and dist.get_world_size() > 1):
            raise ValueError(
                f"{launched} processes were launched but parallel is 'none': pass "
                "--parallel ddp or --parallel fsdp"
            )
        return Context()

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise ValueError(
                f"parallel {parallel!r} needs a process group: launch with torchrun "
                "(torchrun --nproc_per_node N -m mofast train ...)"
            )
        # Both where CUDA exists, so a run kept on the CPU (--device cpu) still works.
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return Context(parallel, rank, dist.get_world_size(), local_rank)


def device_of(context: Context, device: torch.device) -> torch.device:
    """The rank's own GPU (LOCAL_RANK) when the run is on CUDA."""
    if context.parallel == "none" or device.type != "cuda":
        return device
    local = torch.device("cuda", context.local_rank)
    torch.cuda.set_device(local)
    return local


class PolicyLogps(torch.nn.Module):
    """The policy's per-sequence log-probs as a module's forward, so DDP and FSDP see it.

    dpo.sequence_logps runs the decoder and the fused log-prob op on the output weights
    without calling the model's own forward, which is where DDP and FSDP hook in.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.policy = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return dpo.sequence_logps(self.policy, input_ids, labels)


def wrap(
    model: torch.nn.Module,
    context: Context,
    device: torch.device,
    master_dtype: torch.dtype | None = None,
    frozen: bool = False,
) -> torch.nn.Module:
    """The module the training forward passes go through (DDP, FSDP2, or the logps module).

    Under fsdp the model's parameters become DTensor shards in place (each decoder layer is
    its own FSDP group; the embeddings, final norm and head form the root group). With
    `master_dtype` (fsdp only) the shards are kept in that dtype (e.g. float32 master weights
    of a bfloat16 model): FSDP gathers them in the model's dtype for the forward and backward
    and reduce-scatters the gradients in `master_dtype`. A `frozen` model (the online
    reference) is only sharded (never DDP) and its root group is resharded after each forward
    too, since no backward follows.
    """
    module = PolicyLogps(model)
    if frozen and not context.sharded:
        return module
    if context.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # The rotary tables are buffers every rank computes identically: no broadcast at
        # each forward (the one at construction is harmless).
        return DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            forward_sync_buffers=False,
        )
    if context.parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (context.world_size,))
        options = {"mesh": mesh}
        if master_dtype is not None:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            compute_dtype = next(model.parameters()).dtype
            model.to(master_dtype)
            options["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=compute_dtype, reduce_dtype=master_dtype
            )
        for layer in getattr(model.get_decoder(), "layers", []):
            fully_shard(layer, **options)
        fully_shard(module, reshard_after_forward=True if frozen else None, **options)
    elif master_dtype is not None:
        raise ValueError(f"master weights in another dtype need fsdp, not {context.parallel!r}")
    return module


def reshard(module: torch.nn.Module | None, context: Context) -> None:
    """Free FSDP's gathered root parameters after forwards with no backward (the root keeps
    them after its forward for the backward that usually follows)."""
    if context.sharded and module is not None:
        module.reshard()


def gradient_sync(module: torch.nn.Module, context: Context, last: bool):
    """A context for one micro-batch's backward: reduce gradients only on the window's last."""
    if context.parallel == "ddp" and not last:
        return module.no_sync()
    if context.parallel == "fsdp":
        module.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def reduce_combine_inputs(
    G: torch.Tensor, stats: torch.Tensor, context: Context
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The global Gram [k, k] and window statistics [k, s]; and the bytes all-reduced.

    One all-reduce (SUM) without a host sync: under fsdp of the k*k partial Gram entries and
    the k*s statistics divided by the world size; under ddp of the statistics only (the Gram
    of the already averaged gradients is the same on every rank).
    """
    if context.parallel == "none":
        return G, stats, 0
    k = G.shape[0]

    scaled = stats.float().flatten() / context.world_size
    packed = torch.cat([G.float().flatten(), scaled]) if context.sharded else scaled
    nbytes = packed.numel() * packed.element_size()
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)

    if context.sharded:
        G, packed = packed[: k * k].view(k, k), packed[k * k :]
    return G, packed.view_as(stats), nbytes


def shutdown(context: Context) -> None:
    """Leave the process group this module joined (a no-op for a single process)."""
    if context.parallel != "none" and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: Context) -> None:
    if context.parallel != "none":
        dist.barrier()


def broadcast_object(value, context: Context):
    """Rank 0's `value` on every rank (a small picklable object)."""
    if context.parallel == "none":
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def full_state(model: torch.nn.Module, optimizer, context: Context) -> tuple[dict, dict]:
    """(model, optimiser) state dicts with full, unsharded CPU tensors on rank 0 (collective).

    Under fsdp the shards are gathered with torch.distributed.checkpoint's full-state
    options; other ranks get empty dicts. Without sharding it is the ordinary state dicts.
    `optimizer` None gathers the model's weights only (the second dict is then empty).
    """
    if not context.sharded:
        return model.state_dict(), ({} if optimizer is None else optimizer.state_dict())
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return get_model_state_dict(model, options=options), {}
    return get_state_dict(model, optimizer, options=options)


def load_full_state(
    model: torch.nn.Module, optimizer, weights: dict, optim_state: dict, context: Context
) -> None:
    """Load full (unsharded) model and optimiser state dicts, sharding them under fsdp.

    Under fsdp the parameters' `.grad` are cleared: point them at the buffers again.
    """
    if not context.sharded:
        model.load_state_dict(weights)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    # torch initialises an empty optimiser state with one zero step, but only when no
    # parameter has a gradient; the caller points `.grad` back at its buffers afterwards.
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = None
    options = StateDictOptions(full_state_dict=True)
    set_state_dict(
        model, optimizer, model_state_dict=weights, optim_state_dict=optim_state, options=options
    )
