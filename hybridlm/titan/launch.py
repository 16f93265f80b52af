"""Entry point: ``python -m hybridlm.titan.launch [torchtitan flags]`` (under torchrun for several ranks).

Adds the flags that select hybridlm's train spec and config section, runs on CPU when there is no
accelerator, sets up a one-process group when started without torchrun, and (``--hybrid.log
compact``, the default) lets only the one-line-per-step log and warnings through. A bad spec, flag,
config file or data source ends every rank with one line ``error: ...`` and exit status 2; Ctrl-C 130.
"""
from __future__ import annotations

import logging
import os
import re
import signal
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


# torchtitan takes booleans as --flag / --no-flag; `--checkpoint.enable false` is an unrecognized "false".
_BOOLEAN_HINT = ("boolean flags take no value: --checkpoint.enable to turn one on, --checkpoint.no-enable "
                 "(the same flag with no-) to turn it off")
# Fields whose value torchtitan takes but fails on much later, with an assertion deep inside it.
_AT_LEAST = {("training", "steps"): 1, ("training", "local_batch_size"): 1, ("training", "seq_len"): 1,
             ("lr_scheduler", "warmup_steps"): 0, ("checkpoint", "interval"): 1, ("metrics", "log_freq"): 1}


def _config_file(argv: list[str]) -> str | None:
    """The last --job.config_file (torchtitan reads that one)."""
    found = None
    for i, a in enumerate(argv):
        if _flag_name(a) == "job.config_file":
            found = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else None)
    return found


def _tyro_message(text: str) -> str:
    """The message inside tyro's boxed error, on one line."""
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("╭"):  # the box's title line
            continue
        inner = line.strip("│╰╯").strip()
        if inner.startswith("─") or inner.startswith("For full helptext"):
            break
        if inner:
            lines.append(inner)
    return " ".join(lines)


def check_config(argv: list[str]):
    """Parse torchtitan's config as the trainer will and check the values it would fail on later:
    a HybridLMError of one line instead of a box on stderr or an assertion from inside a rank."""
    import contextlib
    import io
    import tomllib

    from hybridlm.errors import HybridLMError
    from hybridlm.titan.cpu import apply_cpu_shim, needs_cpu_shim

    if needs_cpu_shim():  # before torchtitan is imported (once: the shim makes this False)
        apply_cpu_shim()
    from torchtitan.config import ConfigManager
    from torchtitan.tools import logging as titan_logging

    path = _config_file(argv)
    if path is not None:
        try:
            with open(path, "rb") as f:
                tomllib.load(f)
        except OSError as err:
            raise HybridLMError(f"--job.config_file {path}: cannot read it ({err.strerror or err})") from None
        except tomllib.TOMLDecodeError as err:
            raise HybridLMError(f"--job.config_file {path}: TOML syntax error: {err}") from None
    stderr = io.StringIO()
    titan_logging.logger.disabled = True  # its warnings (tokenizer path...) say nothing here; the run repeats them
    try:
        with contextlib.redirect_stderr(stderr):
            config = ConfigManager().parse_args(argv)
    except SystemExit as exit_:
        if exit_.code in (0, None):  # --help
            sys.stderr.write(stderr.getvalue())
            raise
        message = _tyro_message(stderr.getvalue()) or "invalid torchtitan arguments"
        if re.search(r"Unrecognized options:.*\b(true|false|True|False|0|1|yes|no)\b", message):
            message += "; " + _BOOLEAN_HINT
        raise HybridLMError(message) from None
    except (ValueError, TypeError) as err:
        raise HybridLMError(f"torchtitan config: {err}") from None
    finally:
        titan_logging.logger.disabled = False
    for (section, field), least in _AT_LEAST.items():
        value = getattr(getattr(config, section, None), field, None)
        if isinstance(value, int) and value < least:
            raise HybridLMError(f"--{section}.{field} must be at least {least}, got {value}")
    return config


def print_titan_help() -> int:
    """torchtitan's own help (every flag, its default and its help), with hybridlm's flags in it."""
    from hybridlm.titan.cpu import apply_cpu_shim, needs_cpu_shim

    if needs_cpu_shim():
        apply_cpu_shim()
    from torchtitan.config import ConfigManager

    try:
        ConfigManager().parse_args(with_defaults(["--help"]))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def _report(message: str, code: int) -> int:
    """One line on every rank (ranks other than 0 prefix theirs), and no torchelastic error file: under
    torchrun that file would carry the traceback into the launcher's summary."""
    rank = os.environ.get("RANK", "0")
    print(f"error: {message}" if rank == "0" else f"error (rank {rank}): {message}", file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file and os.path.exists(error_file):
        os.remove(error_file)
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # already failing: the message above is what matters
        pass
    return code


def main(argv: list[str] | None = None) -> int:
    """Train; a bad spec, flag, config or data source is one line and exit status 2, Ctrl-C 130."""
    from hybridlm.errors import HybridLMError, SpecError

    try:
        _train(with_defaults(list(sys.argv[1:] if argv is None else argv)))
    except SpecError as err:
        return _report(f"invalid spec: {err}", 2)
    except HybridLMError as err:
        return _report(str(err), 2)
    except KeyboardInterrupt:
        return _report("interrupted (Ctrl-C); checkpoints written so far are kept", 130)
    except OSError as err:  # unreachable hf: hub, unreadable file, full disk: the system's own words
        return _report(f"{type(err).__name__}: {err}", 2)
    return 0


def run_ranks(nproc: int, argv: list[str]) -> int:
    """torchrun (standalone, ``nproc`` ranks of this module) in this process; returns the first failed
    rank's exit status. Each rank reports its own error in one line: the launcher's failure table
    and traceback would only repeat that, 30 lines later."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)  # each sets its own level: the parent's is not enough
    args = get_args_parser().parse_args(["--standalone", f"--nproc_per_node={nproc}", "-m",
                                         "hybridlm.titan.launch", *argv])
    try:
        run(args)
    except ChildFailedError as err:
        _, failure = err.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # killed by a signal
    except SignalException as err:  # Ctrl-C reaches the launcher too: the ranks have said it already
        return 130 if err.sigval == signal.SIGINT else 128 + int(err.sigval)
    return 0


def _progress_formatter(config):
    """The compact log's formatter: step N/total, elapsed and ETA, the spec's name, where checkpoints go."""
    import torch

    from hybridlm.layouts.presets import spec_or_preset
    from hybridlm.titan.progress import ProgressFormatter, RunFacts

    spec_name = spec_or_preset(config.hybrid.spec).name if config.hybrid.spec else "model"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return ProgressFormatter(RunFacts.from_config(config, spec_name, device))


def _train(argv: list[str]) -> None:
    # torchtitan's parser reads sys.argv through a default argument bound at import time (in check_config).
    sys.argv = [sys.argv[0]] + argv
    config = check_config(argv)  # applies the CPU shim first where there is no accelerator
    single_process_env()
    import torchtitan.train as titan_train
    from torchtitan.tools import logging as titan_logging

    from hybridlm.titan.trainer import HybridTrainer

    compact = _compact_logging(argv)
    if compact:
        _quiet_library_warnings()
    original_init = titan_logging.init_logger

    formatter = _progress_formatter(config) if compact else None

    def init_logger() -> None:
        original_init()
        if compact:
            for handler in titan_logging.logger.handlers:
                handler.addFilter(_CompactFilter())
                handler.setFormatter(formatter)

    titan_train.init_logger = init_logger
    titan_train.main(HybridTrainer)


if __name__ == "__main__":
    sys.exit(main())
