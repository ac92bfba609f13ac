"""Serving: the inference form of a model with adapters, and its export for C++ (sparseadapter_serve)."""

from .adapter_tables import TableServingModel, install_tables
from .export import FORMATS, METADATA_FILE, ServingModel, example_inputs, export_model, serving_metadata
from .inference import DEFAULT_TOKENS, InferencePlan, LayerChoice, densify, keep_routed_packs, prepare_for_inference
from .multi_adapter import MultiAdapterServingModel, RowHeads, load_adapters

__all__ = [
    "DEFAULT_TOKENS",
    "FORMATS",
    "InferencePlan",
    "LayerChoice",
    "METADATA_FILE",
    "MultiAdapterServingModel",
    "RowHeads",
    "ServingModel",
    "TableServingModel",
    "densify",
    "example_inputs",
    "export_model",
    "install_tables",
    "keep_routed_packs",
    "load_adapters",
    "prepare_for_inference",
    "serving_metadata",
]
