"""distattn: exact attention over sequences split across many devices."""
from distattn.api import attention, linear_attention, shard, unshard
from distattn.comm import Comm, CommLedger, default_ledger
from distattn.schemes import AttnShape, CommVolume, Scheme, get_scheme, scheme_names
from distattn.schemes.ring import kept_ring_buffers

__all__ = ["attention", "linear_attention", "shard", "unshard", "Comm", "CommLedger", "default_ledger",
           "AttnShape", "CommVolume", "Scheme", "get_scheme", "scheme_names", "kept_ring_buffers"]
__version__ = "0.1.0"
