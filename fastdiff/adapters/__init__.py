"""Adapters applied on top of a loaded model: LoRA (low-rank side paths, fuse / unfuse, several at once).

Sits between ``pipelines`` (which mix :class:`LoraMixin` in) and ``io`` (which reads the files).
"""
from fastdiff.adapters.lora import LoraConv2d, LoraError, LoraLinear, LoraMixin, LoraSet, read_lora_file
from fastdiff.adapters.lora_keys import LoraPair, convert_lora_state_dict

__all__ = ["LoraConv2d", "LoraError", "LoraLinear", "LoraMixin", "LoraPair", "LoraSet", "convert_lora_state_dict",
           "read_lora_file"]
