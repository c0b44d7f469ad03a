from .masked_lm import MaskedLMLoss, masked_lm_loss

__all__ = ["MaskedLMLoss", "masked_lm_loss"]
