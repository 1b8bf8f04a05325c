"""Click options built from the one definition of the parameters (config.py), and which of them a user gave."""

from __future__ import annotations

import os

import click

from mnist_tracking.parameters import given_under_mlflow_run, parameters

# Heavy imports (torch, mlflow) happen inside the commands, so `--help` answers at once.
GIVEN_SOURCES = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)


def options(config_class):
    """The command's click options: one per parameter of `config_class`, same name, type, default and help."""

    def decorate(command):
        for p in reversed(parameters(config_class)):
            command = click.option(p.flag, type=p.type, required=p.required, help=p.help,
                                   **({} if p.required else {"default": p.default, "show_default": True}))(command)
        return command

    return decorate


def given(config) -> frozenset[str]:
    """The parameters the user gave: typed on the command line; under `mlflow run`, which passes every
    MLproject parameter, those that differ from their default (parameters.given_under_mlflow_run)."""
    if os.environ.get("MLFLOW_RUN_ID"):
        return given_under_mlflow_run(config)
    context = click.get_current_context()
    return frozenset(p.name for p in parameters(type(config)) if context.get_parameter_source(p.name) in GIVEN_SOURCES)
