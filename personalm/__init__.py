"""personalm: personalize language models to communities (ComPreD / ComPO) with PyTorch Lightning."""

__version__ = "0.1.0"
