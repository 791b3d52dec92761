"""bma-gp: block mean matrices for GPyTorch and block-mean AdaGrad."""
from bma_gp.partition import Partition

__all__ = ["Partition"]
__version__ = "0.1.0"
