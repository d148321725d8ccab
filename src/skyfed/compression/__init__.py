"""Serialization of models and updates into wire bytes (and, later, codecs)."""
