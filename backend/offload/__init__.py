"""Expert offloading after MoE-Infinity: host-tier experts, a device expert cache, activation-aware prefetching
and eviction, plugged into transformers through its ``ExpertsInterface`` (``experts_implementation=
"tritonmoe_offload"``). See docs/offloading.md."""

from .config import PARAMETER_KEYS, ExpertBudget, OffloadConfig
from .eam import ActivationPredictor, ActivationTracer, EAMCollection
from .experts_forward import EXPERTS_IMPLEMENTATION, register_experts_implementation
from .host_store import HostExpertStore
from .layout import ExpertLayout
from .offloader import Offloader, attach_offloading, load_offloaded_model

register_experts_implementation()  # so from_pretrained(..., experts_implementation="tritonmoe_offload") works

__all__ = ["EXPERTS_IMPLEMENTATION", "PARAMETER_KEYS", "ActivationPredictor", "ActivationTracer", "EAMCollection",
           "ExpertBudget", "ExpertLayout", "HostExpertStore", "OffloadConfig", "Offloader", "attach_offloading",
           "load_offloaded_model", "register_experts_implementation"]
