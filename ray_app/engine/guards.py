"""Checks that run before a stage touches anything: an output that equals, contains or lies inside
one of the stage's inputs is refused (publishing an output replaces the folder it names). Cheap and
Ray-free, so the CLI runs them before it even connects to Ray; the stages run them again for API
callers."""

from __future__ import annotations

from ray_app import storage
from ray_app.config import AppConfig


def predict_inputs(config: AppConfig) -> list[str]:
    """predict's input URIs: ``--input``, or the lines of ``--input-list`` (one URI per line)."""
    p = config.predict
    if p.input and p.input_list:
        raise ValueError("predict takes --input or --input-list, not both")
    if p.input_list:
        lines = storage.read_bytes(p.input_list).decode().splitlines()
        inputs = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        if not inputs:
            raise ValueError(f"the input list {p.input_list} names no input")
        return inputs
    if not p.input:
        raise ValueError("predict needs --input: the items to score (or --input-list)")
    return [p.input]


def stage_locations(stage: str, config: AppConfig) -> tuple[str, list[str | None]] | None:
    """(output, inputs) of a stage that writes one; None for stages that write elsewhere."""
    if stage == "prepare":
        return config.prepared_uri(), [config.prepare.input]
    if stage == "predict":
        return config.predictions_uri(), [*predict_inputs(config), config.predict.input_list]
    if stage == "evaluate":
        return config.evaluation_uri(), [config.train_data_uri()]
    if stage == "train":
        return config.runs_uri(), [config.train_data_uri()]
    return None


def refuse_overlapping_output(stage: str, config: AppConfig) -> None:
    locations = stage_locations(stage, config)
    if locations is not None:
        storage.refuse_overlap(stage, *locations)
