"""linnaeus: taxonomic image classification at several ranks at once."""

__version__ = "0.1.0"
