"""hybridlm on torchtitan 0.2.2 — the only package that imports torchtitan.

    args.py           HybridModelArgs: the spec as plain fields, FLOPs from the builder's accounting
    model.py          the HybridLM torchtitan builds (document boundaries -> cu_seqlens)
    parallelize.py    TP -> activation checkpointing -> per-block compile -> FSDP2
    tensor_parallel.py  the TP plan: every block kind with a ``tp_plan``, sharded by heads
    optim.py          AdamW without weight decay on norms, biases and each block kind's ``no_decay``
    data.py           task generators, text files, HF datasets -> rows with doc_starts
    job_config.py     the [hybrid] config section
    register.py       registers the train spec (imported by torchtitan)
    trainer.py        torchtitan's Trainer plus the run record next to the checkpoints
    launch.py         the entry point (CPU shim, single-process env, compact log)
    cpu.py            lets torchtitan run without an accelerator (device type cpu, gloo)
    progress.py       the output `hybridlm train` shows a person (step N/total, ETA, loss)
    export.py         DCP checkpoint -> model folder

Importing this package imports nothing from torchtitan, so the launcher can prepare the CPU first.
"""
