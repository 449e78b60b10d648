"""Which modules of a diffusers network are "blocks" for BRECQ's block reconstruction.

BRECQ reconstructs one residual unit at a time: large enough to capture how the errors of its layers
interact, small enough to fit in memory and to optimise from a few hundred inputs. In diffusers these are
the ResNet blocks, the attention modules, the down/up-samplers (UNet2DModel, UNet2DConditionModel) and the
transformer blocks (DiT, text-conditioned UNets). A quantized layer that is inside none of them is
reconstructed on its own.
"""

from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D

RECONSTRUCTION_BLOCKS = (ResnetBlock2D, Attention, BasicTransformerBlock, Downsample2D, Upsample2D)
