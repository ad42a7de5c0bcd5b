"""Communication schemes, one file each, behind one interface (`base.Scheme`)."""
from distattn.schemes.base import AttnShape, CommVolume, Scheme, get_scheme, scheme_names
from distattn.schemes import allgather, cad, lasp1, lasp2, local, ring, ulysses, usp  # noqa: F401  (register)
from distattn.schemes import hetero  # noqa: F401  (register)

__all__ = ["AttnShape", "CommVolume", "Scheme", "get_scheme", "scheme_names"]
