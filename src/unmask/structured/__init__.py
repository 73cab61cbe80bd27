"""Structured outputs: JSON schemas, regexes, choices and Lark grammars through llguidance, applied
as a stage between the forward and the commit so that diffusion steps still commit several tokens
(stage.py). `formats` says what a caller may ask for, `state` is one request's matcher."""
from .formats import FormatError, OutputFormat, parse_response_format

__all__ = ["FormatError", "OutputFormat", "parse_response_format"]
