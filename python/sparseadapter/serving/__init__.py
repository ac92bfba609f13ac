"""Serving: the inference form of a model with adapters, and its export for C++ (sparseadapter_serve)."""
from .export import FORMATS, METADATA_FILE, ServingModel, example_inputs, export_model, serving_metadata
from .inference import DEFAULT_TOKENS, InferencePlan, LayerChoice, densify, prepare_for_inference

__all__ = [
    "DEFAULT_TOKENS", "FORMATS", "InferencePlan", "LayerChoice", "METADATA_FILE", "ServingModel", "densify",
    "example_inputs", "export_model", "prepare_for_inference", "serving_metadata",
]
