"""How a model is decoded: decode plans (see plan.py), asked by the engine at every step."""
from .plan import Applied, DecodePlan
from .plans import BlockExactPlan, CausalPlan, FullApproxPlan, NoCachePlan, cache_options, make_plan, model_logit_shift
from .window import Window

__all__ = ["Applied", "DecodePlan", "BlockExactPlan", "CausalPlan", "FullApproxPlan", "NoCachePlan", "Window",
           "cache_options", "make_plan", "model_logit_shift"]
