"""mmflow: multimodal data-and-training pipelines on Ray."""

__version__ = "0.1.0"
