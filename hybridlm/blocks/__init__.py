"""nn.Modules: the Mamba-3 mixer, attention, SwiGLU, norms and the residual block."""
from hybridlm.blocks.attention import Attention, KVCache
from hybridlm.blocks.mamba3 import Mamba3, Mamba3Cache
from hybridlm.blocks.norms import RMSNorm
from hybridlm.blocks.residual import ResidualBlock
from hybridlm.blocks.swiglu import SwiGLU

__all__ = ["Attention", "KVCache", "Mamba3", "Mamba3Cache", "RMSNorm", "ResidualBlock", "SwiGLU"]
