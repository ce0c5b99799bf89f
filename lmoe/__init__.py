"""lmoe: mixtures of LoRA experts (L-MoE and family) for PyTorch and transformers."""

from .config import LMoEConfig
from .layer import LMoELinear, mixture, mixture_reference
from .model import LMoECausalLMOutput, LMoEModel, get_lmoe_model
from .peft_import import from_peft_adapters

__version__ = "0.1.0"
__all__ = ["LMoEConfig", "LMoELinear", "LMoEModel", "LMoECausalLMOutput", "get_lmoe_model", "from_peft_adapters",
           "mixture", "mixture_reference"]
