"""Local attention math: no communication here."""
from distattn.kernels.backends import select_backend
from distattn.kernels.merge import merge_into, merge_partials
from distattn.kernels.reference import document_mask, reference_attention
from distattn.kernels.softmax import (BlockCall, block_backward, block_forward, check_shapes,
                                      default_scale, plan_calls, total_pairs)

__all__ = ["select_backend", "merge_into", "merge_partials", "document_mask", "reference_attention",
           "BlockCall", "block_backward", "block_forward", "check_shapes", "default_scale",
           "plan_calls", "total_pairs"]
