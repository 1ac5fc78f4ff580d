"""maskattn: masked multi-head attention that is correct, fast and inspectable.

Convention everywhere: a mask value of **True means "may attend"**.
"""

from maskattn import masks
from maskattn.dispatch import BACKENDS, attention, choose_backend
from maskattn.layers import MultiHeadAttention
from maskattn.masks import Mask

__version__ = "0.1.0"

__all__ = ["BACKENDS", "Mask", "MultiHeadAttention", "attention", "choose_backend", "masks"]
