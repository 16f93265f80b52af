"""The one kernel backend registry: which implementation runs an op, and the one fallback warning.

A backend belongs to a block kind (``mamba3``: the ops ``scan``, ``step``, ``decode_step``;
``attention``: ``causal``, ``cached``) and registers its ops, each an :class:`Op`: the function
and, optionally, its ``unsupported_reason(device, *check)``, which says why it cannot take some
inputs (None when it can). What ``check`` holds is fixed per op by its entry point
(kernels/dispatch.py, kernels/attention.py). An op a backend does not implement is taken by its
``fallback`` without a word (the CuTe backend has only the decode step; its scan is Triton's).

How a backend is chosen, for one call (:func:`choose`):

1. the name: the call's ``backend`` (a block's spec field), else the kind's environment variable
   (``HYBRIDLM_BACKEND`` for Mamba-3, ``HYBRIDLM_ATTENTION`` for attention; read here and nowhere
   else), else ``auto``: the registered backend of highest ``auto_priority`` for this device type;
2. a backend that cannot run here at all (wrong device, optional package absent or broken): a
   forced one raises :class:`BackendUnavailable`; otherwise its fallback takes over, quietly when
   the package is simply not installed or the device cannot run it, with one warning when the
   package is installed but does not import;
3. a backend that refuses these inputs: a ``strict`` one asked for by name raises; otherwise its
   fallback takes over with one warning naming the reason.

Every warning goes through one warn-once set. Optional packages (Triton, the CuTe DSL, FA4) are
imported by a backend's ``load`` on first use. :func:`choose` takes plain values only and is marked
``torch.compiler.assume_constant_result``: under ``torch.compile`` dynamo runs it once while
tracing and keeps the answer, so imports, registration and warnings never enter the graph (a side
effect there breaks the graph, and a break inside an activation-checkpointed block makes dynamo
give up on the whole block).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple

import torch
from torch import Tensor

from hybridlm.errors import BackendUnavailable
from hybridlm.layouts.backends import AUTO, add_backend_name

# The user-facing override of each kind's ``auto`` (a block's spec field wins over it).
ENV_VARS = {"mamba3": "HYBRIDLM_BACKEND", "attention": "HYBRIDLM_ATTENTION"}


class Op(NamedTuple):
    fn: Callable
    unsupported_reason: Callable[..., str | None] | None = None  # (device, *check) -> why not; None: takes all


@dataclass(frozen=True)
class Backend:
    kind: str
    name: str
    load: Callable[[], Mapping[str, Op | Callable]]  # the ops; imports optional packages; raises when it cannot
    fallback: str | None = None  # takes what this backend cannot
    strict: bool = False  # asked for by name, inputs it refuses are an error instead of a fallback
    auto_priority: int | None = None  # ``auto`` starts at the highest; None: never chosen by ``auto``
    auto_devices: tuple[str, ...] | None = None  # device types ``auto`` may choose it on (None: all)
    installed: Callable[[], bool] = lambda: True  # False: its optional package is absent (say nothing)
    device_reason: Callable[[torch.device], str | None] = lambda device: None  # devices it never runs on


_BACKENDS: dict[str, dict[str, Backend]] = {}
_LOADED: dict[tuple[str, str], dict[str, Op] | str] = {}  # the ops, or why they do not load
_warned: set[str] = set()


def register_backend(kind: str, name: str, ops: Mapping[str, Op | Callable] | None = None, *,
                     load: Callable[[], Mapping[str, Op | Callable]] | None = None, **options) -> Backend:
    """Register (or replace) backend ``name`` of block kind ``kind``: its ``ops`` (or a ``load``
    that returns them on first use) and the :class:`Backend` options. ``name`` becomes a valid
    ``backend`` of ``kind`` specs."""
    if name == AUTO or (ops is None) == (load is None):
        raise ValueError(f"register_backend({kind!r}, {name!r}): give ops or load (and not 'auto' as a name)")
    backend = Backend(kind, name, load or (lambda: ops), **options)
    _BACKENDS.setdefault(kind, {})[name] = backend
    _LOADED.pop((kind, name), None)
    add_backend_name(kind, name)
    return backend


def backend_names(kind: str) -> list[str]:
    return sorted(_BACKENDS.get(kind, {}))


def register_reference_and_triton(kind: str, op: str, reference: Callable, triton_module: str,
                                  triton_name: str) -> None:
    """The usual pair for a small fused op: ``reference`` everywhere, and on CUDA the Triton kernel
    ``triton_module.triton_name`` (imported on first use; its module's ``unsupported_reason`` says which
    inputs it refuses), falling back to the reference."""
    register_reference_and_triton_ops(kind, triton_module, {op: (reference, triton_name)})


def register_reference_and_triton_ops(kind: str, triton_module: str,
                                      ops: dict[str, tuple[Callable, str]]) -> None:
    """:func:`register_reference_and_triton` for a kind of several ops: ``{op: (reference, triton_name)}``,
    the Triton module's one ``unsupported_reason`` for all of them (its callers pass what tells the ops
    apart among the checked values)."""
    def load() -> dict[str, Op]:
        module = importlib.import_module(triton_module)
        return {op: Op(getattr(module, name), module.unsupported_reason) for op, (_, name) in ops.items()}

    register_backend(kind, "reference", {op: ref for op, (ref, _) in ops.items()}, auto_priority=0)
    register_backend(kind, "triton", load=load, fallback="reference", auto_priority=1,
                     auto_devices=("cuda",), installed=installed("triton"))


def records_autograd(*tensors: Tensor | None) -> bool:
    """Whether autograd records a call on these tensors: the small fused ops have no backward, so
    then their reference runs."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def installed(module: str) -> Callable[[], bool]:
    """An ``installed`` check: whether ``module`` is present (importing it may still fail)."""
    def check() -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            return False
    return check


def reset() -> None:
    """Forget loaded ops and warnings given (tests that swap an optional package)."""
    _LOADED.clear()
    _warned.clear()


def implementation(kind: str, name: str, op: str) -> Callable:
    """The function of ``op`` of backend ``name`` (what :func:`choose` picked, or a caller's own pick of
    the always-available reference, which may not be loaded yet)."""
    loaded = _load(_BACKENDS[kind][name])
    if isinstance(loaded, str):
        raise BackendUnavailable(f"{kind} backend {name!r} cannot load: {loaded}")
    return loaded[op].fn


def _load(backend: Backend) -> dict[str, Op] | str:
    key = (backend.kind, backend.name)
    if key not in _LOADED:
        try:
            _LOADED[key] = {op: f if isinstance(f, Op) else Op(f) for op, f in backend.load().items()}
        except Exception as e:  # a broken CUDA/GPU package raises more than ImportError
            _LOADED[key] = str(e) or type(e).__name__
    return _LOADED[key]


def _requested(kind: str, requested: str | None) -> tuple[str, str]:
    """The name asked for and where it came from; an unknown name raises."""
    env = ENV_VARS.get(kind)
    name, source = (requested, "argument") if requested else (os.environ.get(env or "") or AUTO, env)
    if name != AUTO and name not in _BACKENDS.get(kind, {}):
        raise BackendUnavailable(f"unknown {kind} backend {name!r} (from {source}); "
                                 f"choose one of: {', '.join([AUTO, *backend_names(kind)])}")
    return name, source


def _auto(kind: str, device_type: str) -> str:
    candidates = [b for b in _BACKENDS.get(kind, {}).values() if b.auto_priority is not None
                  and (b.auto_devices is None or device_type in b.auto_devices)]
    if not candidates:
        raise BackendUnavailable(f"no {kind} backend runs on {device_type} automatically")
    return max(candidates, key=lambda b: b.auto_priority).name


def _cannot_run(backend: Backend, device: torch.device) -> tuple[str, bool] | None:
    """Why ``backend`` cannot run on ``device`` at all, and whether that deserves a warning."""
    reason = backend.device_reason(device)
    if reason:
        return reason, False
    loaded = _load(backend)
    if isinstance(loaded, str):
        present = backend.installed()
        return (f"installed but unusable: {loaded}" if present else loaded), present
    return None


def warn_once(message: str, stacklevel: int = 3) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=stacklevel)


@torch.compiler.assume_constant_result  # plain values in, a name out: dynamo runs it, never traces it
def choose(kind: str, op: str, requested: str | None, device_type: str, device_index: int | None,
           *check) -> str:
    """The backend that runs ``op`` for these inputs (see the module docstring for the order)."""
    name, source = _requested(kind, requested)
    forced = name != AUTO
    if not forced:
        name = _auto(kind, device_type)
    device = torch.device(device_type, device_index)
    seen: list[str] = []
    while True:
        if name is None or name in seen:
            raise BackendUnavailable(f"{kind} {op}: no backend takes these inputs (tried {', '.join(seen)})")
        backend = _BACKENDS[kind][name]
        seen.append(name)
        first = len(seen) == 1
        problem = _cannot_run(backend, device)
        if problem:
            reason, loud = problem
            if forced and first:
                raise BackendUnavailable(f"{kind} backend {name!r} cannot run: {reason}. Choose another: "
                                         f"{', '.join(repr(n) for n in [AUTO, *backend_names(kind)] if n != name)}"
                                         f"{f' (from {source})' if source != 'argument' else ''}")
            if loud:
                warn_once(f"{kind} backend {name!r} {reason}; using {backend.fallback!r}")
            name = backend.fallback
            continue
        implemented = _LOADED[(kind, name)].get(op)
        if implemented is None:
            name = backend.fallback  # not implemented here: the fallback's own, no warning
            continue
        reason = implemented.unsupported_reason(device, *check) if implemented.unsupported_reason else None
        if reason is None:
            return name
        if (forced and first and backend.strict) or backend.fallback is None:
            raise BackendUnavailable(f"{kind} backend {name!r} cannot run {op}: {reason}. Choose another: "
                                     f"{', '.join(repr(n) for n in [AUTO, *backend_names(kind)] if n != name)}")
        warn_once(f"{kind} {op}: backend {name!r} cannot take these inputs ({reason}); using {backend.fallback!r}")
        name = backend.fallback
