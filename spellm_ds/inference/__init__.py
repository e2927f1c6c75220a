"""Inference: the char-path decode, AutoCorrect, the fallback modes and generation from an export.

`SpeLLMForCausalLM.from_export(DIR)` is the entry point users call; it is re-exported here so that
`from spellm_ds.inference import SpeLLMForCausalLM` names the public model.
"""

from spellm_ds.inference.model import GenerateOutput, SpeLLMForCausalLM

__all__ = ["GenerateOutput", "SpeLLMForCausalLM"]
