"""spellm-ds: distil a BPE causal LM into a SpeLLM model with parallel character heads."""

__version__ = "0.1.0"
