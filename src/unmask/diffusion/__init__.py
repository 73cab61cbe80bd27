"""Forward (masking) processes, noise schedules and the training objectives."""
from .losses import LossOutput, ar_loss, bd3lm_loss, compute_loss, diffusion_logits, diffusion_masks, mdlm_loss
from .masking import Noise, apply_mask, draw_noise, draw_t
from .schedules import Schedule, get_schedule

__all__ = [
    "LossOutput", "Noise", "Schedule", "apply_mask", "ar_loss", "bd3lm_loss", "compute_loss",
    "diffusion_logits", "diffusion_masks",
    "draw_noise", "draw_t", "get_schedule", "mdlm_loss",
]
