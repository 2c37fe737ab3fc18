"""A config's ``model:`` and ``quant:`` sections, and its model converted, for ``convert``,
``memory`` and ``validate``."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from ..errors import ConfigError, config_errors


def load_model_and_quant(path: str, input_size: Sequence[int] | None = None):
    """``(ModelSpec, QuantConfig)`` of a config file; every problem of both sections at once.

    Args:
        path: the YAML file.
        input_size: ``--input-size``, replacing ``model.input_size`` when given.

    Raises:
        ConfigError: every problem of ``model:``, ``quant:`` and ``input_size``.
    """
    from ..config import load_config as load_quant
    from ..config import load_yaml_file
    from ..models import ModelSpec, model_spec_from_dict
    from ..schema import check_key

    raw = load_yaml_file(path)
    problems: list = []
    model_spec = quant = None
    try:
        model_spec = model_spec_from_dict(raw.get("model"), source=path)
    except ConfigError as exc:
        problems += exc.problems
    try:
        quant = load_quant(path)
    except ConfigError as exc:
        problems += exc.problems
    if input_size is not None:
        problems += check_key(ModelSpec, "input_size", list(input_size), "--input-size")
    if problems:
        raise ConfigError(problems)
    if input_size is not None:
        model_spec = replace(model_spec, input_size=tuple(input_size))
    return model_spec, quant


def convert_for_config(model: nn.Module, quant, path: str, input_size=None) -> nn.Module:
    """``convert_model(model, quant)``, its config errors naming ``path``; the planning
    forward runs on two random images of ``input_size`` (the model's, when given).

    The "nothing to convert" warning is silenced, only here: the commands print how many
    layers were converted, which says the same.
    """
    from ..surgery import convert_model

    with config_errors(path), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*nothing to convert.*")
        example = None if input_size is None else torch.randn(2, *input_size)
        return convert_model(model, quant, example_input=example)
