"""Model plumbing for the quantization methods: which modules of a diffusers network are "blocks" for BRECQ's
block reconstruction, and which layers read a skip concatenation (Q-Diffusion's shortcut splitting).

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
from torch import nn

RECONSTRUCTION_BLOCKS = (ResnetBlock2D, Attention, BasicTransformerBlock, Downsample2D, Upsample2D)


def skip_concat_splits(unet: nn.Module) -> dict[str, int]:
    """For each layer that reads a UNet decoder's raw concatenation [decoder features, encoder skip]: the
    channel where the skip begins (Q-Diffusion's "shortcut" layers, whose two parts have different ranges).

    In diffusers' up blocks, resnet j reads cat([hidden_states, skip]); its norm1 normalises the concatenation
    before conv1, but its 1x1 conv_shortcut reads it raw. The hidden part has the channels of whatever
    entered the resnet: the previous resnet's output, or for the first resnet of a block, the previous block's
    (the mid block's, before the first up block). Empty for networks without such blocks (e.g. DiT).
    """
    up_blocks = getattr(unet, "up_blocks", None)
    before = getattr(unet, "mid_block", None) or (getattr(unet, "down_blocks", None) or [None])[-1]
    if not up_blocks or before is None or not getattr(before, "resnets", None):
        return {}
    channels = before.resnets[-1].out_channels
    splits = {}
    for i, block in enumerate(up_blocks):
        for j, resnet in enumerate(getattr(block, "resnets", [])):
            if isinstance(resnet, ResnetBlock2D) and isinstance(resnet.conv_shortcut, nn.Conv2d):
                splits[f"up_blocks.{i}.resnets.{j}.conv_shortcut"] = channels
            channels = resnet.out_channels
    return splits
