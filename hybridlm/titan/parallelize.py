"""torchtitan's parallelize_fn for hybrid models: TP -> activation checkpointing -> compile -> FSDP2.

Follows torchtitan's llama3 order. Differences: blocks are compiled without ``fullgraph`` (a user's
own block kind may break the graph; ours do not: the Triton scan and FA4 are torch.library custom
ops, backends are chosen at trace time, and packed batches keep their document bounds on the device
with shapes that vary only in the number of documents, marked dynamic), tied embeddings stay in the
root FSDP unit
(one parameter cannot belong to two units), and on CPU (gloo) FSDP reduces with plain sums
(gloo has no PREMUL_SUM).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.models.llama3.infra.parallelize import _op_sac_save_list, apply_ddp


def _sac_save_list() -> set:
    """torchtitan's ops plus our custom ops (the Triton scan, FA4): SAC keeps their outputs (re-running
    a scan or an attention costs its forward)."""
    from hybridlm.kernels.fa4 import FA4_SAC_SAVE_OPS

    try:
        from hybridlm.kernels.mamba3.triton import SAC_SAVE_OPS
    except ImportError:  # no Triton: the reference scan is plain aten ops
        return _op_sac_save_list | FA4_SAC_SAVE_OPS
    return _op_sac_save_list | SAC_SAVE_OPS | FA4_SAC_SAVE_OPS


def parallelize_hybrid(model: nn.Module, parallel_dims, job_config) -> nn.Module:
    if parallel_dims.tp_enabled:
        from hybridlm.titan.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, parallel_dims.get_mesh("tp"),
                              loss_parallel=not job_config.parallelism.disable_loss_parallel)

    compile_model = job_config.compile.enable and "model" in job_config.compile.components
    if job_config.activation_checkpoint.mode != "none":
        apply_ac(model, job_config.activation_checkpoint, model_compile_enabled=compile_model,
                 op_sac_save_list=_sac_save_list(), base_folder=job_config.job.dump_folder)
    if compile_model:
        # Every block shares one code object (the checkpoint wrapper's or ResidualBlock's forward):
        # each block kind and configuration, dense and packed, is one cache entry of it. Past the
        # limit dynamo would silently run the rest eagerly.
        kinds = len({repr(block) for block in model.layers.children()})
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * kinds + 2)
        for name, block in model.layers.named_children():
            model.layers.register_module(name, torch.compile(block, backend=job_config.compile.backend))

    if parallel_dims.fsdp_enabled:
        names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
        apply_fsdp(model, parallel_dims.get_mesh(names),
                   param_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_param],
                   reduce_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_reduce],
                   cpu_offload=job_config.training.enable_cpu_offload)
    elif parallel_dims.dp_replicate_enabled:
        apply_ddp(model, parallel_dims.get_mesh("dp_replicate"), enable_compile=compile_model)
    return model


def apply_fsdp(model: nn.Module, mesh, *, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
               cpu_offload: bool = False) -> None:
    config = {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)}
    if cpu_offload:
        config["offload_policy"] = CPUOffloadPolicy()
    tied = model.spec.tie_embeddings
    if not tied:
        fully_shard(model.tok_embeddings, **config)
    for block in model.layers.children():
        fully_shard(block, **config)
    if not tied:  # the last unit is needed again right away by backward: keep it gathered
        fully_shard([model.norm, model.output], **config, reshard_after_forward=False)
    fully_shard(model, **config)
    on_cpu = mesh.device_type == "cpu"
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # the trainer divides by the global token count
            if on_cpu:
                module.set_force_sum_reduction_for_comms(True)
