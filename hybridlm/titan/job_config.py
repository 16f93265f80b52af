"""The ``[hybrid]`` section torchtitan's JobConfig gains (``--job.custom_config_module``)."""

from dataclasses import dataclass, field


@dataclass
class Hybrid:
    spec: str = ""
    """hybridlm spec: a YAML file or a preset name (`hybridlm presets`)."""

    tokenizer: str = "byte"
    """`byte`, or a tokenizer.json file / a folder holding one."""

    data: str = "task:mqar"
    """What to train on: `task:<task>[:opt=v...]` (the eval harness's generators: niah-1, mqar, parity, ...),
    a local text / JSON-lines file or folder, or `hf:<name>[:<config>]` (a Hugging Face dataset; needs network)."""

    loss_on: str = "answers"
    """For task data: `answers` (only the scored tokens) or `all` (every next token)."""

    curriculum: bool = False
    """For state-tracking tasks: the paper's length curriculum (3..40 growing to 3..160, steps split into 4 stages)
    instead of fixed-length examples; examples are packed into training rows with document boundaries."""

    seed: int = 0
    """Seed of the data stream (examples are resumable by index) and of the initial weights."""

    backend: str = ""
    """Kernel backend for the blocks whose spec says `auto` and whose kind has a backend of that name (Mamba-3:
    reference, sequential, triton, cute; attention: sdpa, fa4); empty = automatic. Given to those blocks' specs
    before the model is built (the run record keeps the spec as written)."""

    allow_spec_change: bool = False
    """Resume a dump folder whose checkpoints were trained with another spec (the run record is checked on every
    resume; without this flag any difference stops the run before anything is loaded or written)."""

    log: str = "compact"
    """`compact`: one line per step and warnings only; `torchtitan`: torchtitan's own logging."""


@dataclass
class JobConfig:
    hybrid: Hybrid = field(default_factory=Hybrid)
