"""Loss modules: drop-in replacements for lightly 1.6's, holding only hyper-parameters (and the
state lightly keeps: a memory bank, DINO's center), re-exported from the family packages.

Constructor arguments and defaults match lightly's, so ``from lightly.loss import NTXentLoss``
→ ``from fastssl import NTXentLoss`` keeps the numbers; fastssl's extras are keyword-only.
"""
from .clustering import SwaVLoss
from .contrastive import (DCLLoss, DCLWLoss, DetConBLoss, DetConSLoss, DirectCLRLoss, MACLLoss, MemoryBankModule,
                          NTXentLoss)
from .cosine import NegativeCosineSimilarity
from .distillation import DINOLoss
from .redundancy import BarlowTwinsLoss, VICRegLoss
from .regularizers import CO2Regularizer, KoLeoLoss
from .spectral import EMPSSLLoss, FroSSLLoss, HypersphereLoss, MMCRLoss, PatchKernelAlignmentLoss, TiCoLoss
from .redundancy import VICRegLLoss
from .regularizers import DSERegularizer
from .sliced import LeJEPALoss, LeWMLoss, SIGReg, VISRegLoss, VISRegLossComponents
from .whitening import Whitening2d, WMSELoss
from .distillation import CAPILoss
from .spectral import GramAnchoringLoss
from .distillation import MSNLoss, PMSNCustomLoss, PMSNLoss
from .masked import MaskedLMLoss
from .masked import HuBERTLoss, MAELoss, Wav2Vec2ContrastiveLoss
from .distillation import IBOTPatchLoss, IBOTPlusPlusPatchLoss

__all__ = ["MemoryBankModule", "NTXentLoss", "BarlowTwinsLoss", "VICRegLoss", "SwaVLoss", "NegativeCosineSimilarity",
           "DINOLoss", "KoLeoLoss", "TiCoLoss", "MMCRLoss", "FroSSLLoss", "EMPSSLLoss", "HypersphereLoss", "DCLLoss", "DCLWLoss", "DirectCLRLoss", "MACLLoss", "CO2Regularizer",
           "PatchKernelAlignmentLoss",
           "DetConBLoss", "DetConSLoss", "VICRegLLoss", "DSERegularizer", "Whitening2d", "WMSELoss",
           "SIGReg", "LeJEPALoss", "LeWMLoss", "VISRegLoss", "VISRegLossComponents",
           "CAPILoss", "GramAnchoringLoss", "MSNLoss", "PMSNLoss", "PMSNCustomLoss", "MaskedLMLoss",
           "MAELoss", "Wav2Vec2ContrastiveLoss", "HuBERTLoss",
           "IBOTPatchLoss", "IBOTPlusPlusPatchLoss"]
