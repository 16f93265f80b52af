"""hybridlm on torchtitan 0.2.2 — the only package that imports torchtitan.

    args.py           HybridModelArgs: the spec as plain fields, FLOPs from the builder's accounting
    model.py          the HybridLM torchtitan builds (document boundaries -> cu_seqlens)
    parallelize.py    TP -> activation checkpointing -> per-block compile -> FSDP2
    tensor_parallel.py  the TP plan (Mamba-3 sharded by heads)
    optim.py          AdamW without weight decay on Mamba-3 scalars, norms and biases
    data.py           task generators, text files, HF datasets -> rows with doc_starts
    job_config.py     the [hybrid] config section
    register.py       registers the train spec (imported by torchtitan)
    launch.py         the entry point (CPU shim, single-process env, compact log)
    export.py         DCP checkpoint -> model folder

Importing this package imports nothing from torchtitan, so the launcher can prepare the CPU first.
"""
