"""The official ``mamba_ssm`` Mamba-3 kernels' Triton autotune choices: saved, pinned, read from a cache.

The official kernels autotune 27-81 configs each on their first call. A benchmark pins the choices
its own autotuner made on the same GPU (timing with one arbitrary config would be unfair), and the
state-tracking study's control pins them so that no run spends minutes tuning beside busy runs.
A file of choices maps ``"<module>.<kernel>"`` to ``{repr(tuning key): config}``, where the tuning
key is what Triton's ``Autotuner`` caches by (the key arguments' values, then every tensor
argument's dtype). Keys starting with ``_`` are notes, not kernels.
"""

from __future__ import annotations

import ast
import importlib
import json
import pkgutil
import re
from pathlib import Path

PACKAGES = ("mamba_ssm.ops.triton.mamba3", "mamba_ssm.ops.triton.layernorm_gated")
CONFIG_FIELDS = ("kwargs", "num_warps", "num_stages", "num_ctas", "maxnreg")


def official_autotuners() -> dict:
    """Every autotuned Triton kernel of the official Mamba-3 path, by ``module.kernel``."""
    from triton.runtime.autotuner import Autotuner

    found = {}
    for package in PACKAGES:
        mod = importlib.import_module(package)
        mods = [mod]
        if hasattr(mod, "__path__"):
            mods += [importlib.import_module(f"{package}.{m.name}") for m in pkgutil.iter_modules(mod.__path__)]
        for m in mods:
            for attr, obj in vars(m).items():
                if isinstance(obj, Autotuner):
                    found[f"{m.__name__}.{attr}"] = obj
    return found


def gpu_slug(device_name: str) -> str:
    """``"NVIDIA H200"`` -> ``"h200"``: the model in a device name, for per-GPU file names."""
    model = re.search(r"\b([A-Z]{1,2}\d{2,4})\b", device_name)
    return model.group(1).lower() if model else re.sub(r"\W+", "_", device_name).strip("_").lower()


def config_entry(config) -> dict:
    return {field: getattr(config, field) for field in CONFIG_FIELDS}


def merge_into(path: Path, chosen: dict) -> None:
    """Add ``chosen`` (kernel -> key -> config entry) to the file at ``path``, keeping what is there."""
    old = json.loads(path.read_text()) if path.exists() else {}
    for name, entries in chosen.items():
        old.setdefault(name, {}).update(entries)
    path.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")


def save_chosen(path: Path) -> int:
    """Write every choice the loaded official autotuners made in this process; returns the kernel count."""
    chosen = {name: {repr(key): config_entry(cfg) for key, cfg in tuner.cache.items()}
              for name, tuner in official_autotuners().items() if tuner.cache}
    merge_into(path, chosen)
    return len(chosen)


def pin_chosen(path: Path, tuners: dict | None = None) -> int:
    """Put the file's choices into the autotuners' caches, so those keys never tune; returns how many.
    Kernels the file names but this mamba_ssm lacks are skipped (a newer or older version)."""
    import triton

    tuners = official_autotuners() if tuners is None else tuners
    pinned = 0
    for name, entries in json.loads(path.read_text()).items():
        if name.startswith("_") or name not in tuners:
            continue
        for key, c in entries.items():
            tuners[name].cache[ast.literal_eval(key)] = triton.Config(
                c["kwargs"], **{field: c[field] for field in CONFIG_FIELDS if field != "kwargs"})
            pinned += 1
    return pinned


def chosen_from_triton_cache(folder: Path, qualified: dict[str, str]) -> dict:
    """The choices in a Triton cache folder's ``*.autotune.json`` files (written under
    ``TRITON_CACHE_AUTOTUNING=1``), as a file of choices. ``qualified`` maps a kernel's function
    name to its ``module.kernel`` name; files of other kernels are left out. The choice is the
    fastest config by its timings, as Triton's autotuner picks it."""
    chosen: dict = {}
    for file in sorted(Path(folder).rglob("*.autotune.json")):
        name = qualified.get(file.name.removesuffix(".autotune.json"))
        if name is None:
            continue
        record = json.loads(file.read_text())
        best, _ = min(record["configs_timings"], key=lambda pair: pair[1])
        chosen.setdefault(name, {})[repr(tuple(record["key"]))] = {field: best[field] for field in CONFIG_FIELDS}
    return chosen
