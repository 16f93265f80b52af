"""Entry point: ``python -m hybridlm.titan.launch [torchtitan flags]`` (under torchrun for several ranks).

Adds the flags that select hybridlm's train spec and config section, runs on CPU when there is no
accelerator, sets up a one-process group when started without torchrun, and (``--hybrid.log
compact``, the default) lets only the one-line-per-step log and warnings through.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import sys

DEFAULT_FLAGS = {
    "--job.custom_config_module": "hybridlm.titan.job_config",
    "--experimental.custom_import": "hybridlm.titan.register",
    "--model.name": "hybrid",
    "--model.flavor": "spec",
}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_KEEP = re.compile(r"^(validate )?step:|Training completed|Training starts|Model hybrid spec size")


def _flag_name(arg: str) -> str:
    """``--job.custom-config-module=x`` -> ``job.custom_config_module`` (torchtitan takes both spellings)."""
    return arg[2:].split("=", 1)[0].replace("-", "_")


def with_defaults(argv: list[str]) -> list[str]:
    given = {_flag_name(a) for a in argv if a.startswith("--")}
    extra = [item for flag, value in DEFAULT_FLAGS.items() if _flag_name(flag) not in given for item in (flag, value)]
    return extra + argv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> None:
    """torchtitan reads the torchrun variables; without torchrun we are rank 0 of 1."""
    if "LOCAL_RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


# Warnings that say nothing to a hybridlm user (we bring our own tokenizer; CPU has no peak FLOPs).
_NOISE = ("Peak flops undefined", "lspci", "HF assets path", "tokenizer_path")


class _CompactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if os.environ.get("RANK", "0") != "0" and record.levelno < logging.ERROR:
            return False  # every rank logs the same global metrics: show rank 0's
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return not any(n in message for n in _NOISE)
        return bool(_KEEP.search(_ANSI.sub("", message)))


def _quiet_library_warnings() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*set_vital.*")
    for message in ("In CPU autocast, but the target dtype is not supported", "DTensor random operators",
                    "Set timeout is now only supported", "torch.distributed is disabled"):
        warnings.filterwarnings("ignore", message=message)


def _compact_logging(argv: list[str]) -> bool:
    for i, a in enumerate(argv):
        if a.startswith("--hybrid.log"):
            value = a.split("=", 1)[1] if "=" in a else argv[i + 1]
            return value == "compact"
    return True


def main(argv: list[str] | None = None) -> None:
    argv = with_defaults(list(sys.argv[1:] if argv is None else argv))
    from hybridlm.titan.cpu import apply_cpu_shim, needs_cpu_shim

    if needs_cpu_shim():
        apply_cpu_shim()
    single_process_env()
    # torchtitan's parser reads sys.argv through a default argument bound at import time.
    sys.argv = [sys.argv[0]] + argv
    import torchtitan.train as titan_train
    from torchtitan.tools import logging as titan_logging

    from hybridlm.titan.trainer import HybridTrainer

    compact = _compact_logging(argv)
    if compact:
        _quiet_library_warnings()
    original_init = titan_logging.init_logger

    def init_logger() -> None:
        original_init()
        if compact:
            for handler in titan_logging.logger.handlers:
                handler.addFilter(_CompactFilter())
                handler.setFormatter(logging.Formatter("[hybridlm] %(message)s"))

    titan_train.init_logger = init_logger
    titan_train.main(HybridTrainer)


if __name__ == "__main__":
    main()
