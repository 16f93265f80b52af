"""Registers the train spec `hybrid` with torchtitan (``--experimental.custom_import hybridlm.titan.register``).

``hybridlm train`` and ``python -m hybridlm.titan.launch`` pass that flag and ``--model.name hybrid``.
"""
from __future__ import annotations

from torchtitan.components.loss import build_cross_entropy_loss
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.protocols.train_spec import TrainSpec, get_train_spec, register_train_spec

from hybridlm.titan.args import HybridModelArgs
from hybridlm.titan.data import build_dataloader, build_tokenizer
from hybridlm.titan.model import TitanHybridLM
from hybridlm.titan.optim import build_optimizers
from hybridlm.titan.parallelize import parallelize_hybrid

TRAIN_SPEC_NAME = "hybrid"


def train_spec() -> TrainSpec:
    return TrainSpec(
        model_cls=TitanHybridLM,
        model_args={"spec": HybridModelArgs()},  # the [hybrid] spec fills it in update_from_config
        parallelize_fn=parallelize_hybrid,
        pipelining_fn=None,
        build_optimizers_fn=build_optimizers,
        build_lr_schedulers_fn=build_lr_schedulers,
        build_dataloader_fn=build_dataloader,
        build_tokenizer_fn=build_tokenizer,
        build_loss_fn=build_cross_entropy_loss,
    )


try:
    get_train_spec(TRAIN_SPEC_NAME)
except ValueError:
    register_train_spec(TRAIN_SPEC_NAME, train_spec())
