"""Hugging Face checkpoints: conversion both ways (Llama, Qwen2, Mistral) and `forward_logits`."""
from distattn.hf.convert import distattn_to_hf, hf_to_distattn, load_distattn, load_hf
from distattn.hf.forward import forward_logits

__all__ = ["distattn_to_hf", "forward_logits", "hf_to_distattn", "load_distattn", "load_hf"]
