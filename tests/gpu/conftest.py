"""GPU tests: the official mamba_ssm module is the oracle where it is staged (docs/offline-gpu.md: .gpu/peer).

Its Triton autotuning takes minutes on a fresh machine; for correctness runs we keep only the
first config of each kernel (HYBRIDLM_PEER_FULL_AUTOTUNE=1 keeps them all: needed for timing).
This has to happen before mamba_ssm is imported, hence here.
"""
import os

import torch

if torch.cuda.is_available() and not os.environ.get("HYBRIDLM_PEER_FULL_AUTOTUNE"):
    try:
        import triton

        _autotune = triton.autotune

        def _first_config_only(configs, *args, **kwargs):
            return _autotune(list(configs)[:1], *args, **kwargs)

        triton.autotune = _first_config_only
    except ImportError:
        pass
