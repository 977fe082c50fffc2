"""torchvision and timm classifiers by name, randomly initialised: no pretrained weights are ever downloaded.

These are the real library classes, adapted only where an input would not fit them:
- `in_channels` other than 3: the stem conv (the model's first Conv2d) is replaced by one with the same kernel,
  stride, padding and output channels that takes `in_channels`; timm does the same with its own `in_chans`.
- inputs smaller than an architecture's smallest working size (`MIN_SIZE`: VGG, DenseNet and ConvNeXt halve a 28x28
  image down to nothing before their last stage) are resized up to that size by `ResizedInput`, a parameter-free
  bilinear resize in front of the unchanged model. Resizing keeps every layer of the architecture as it ships,
  where a narrower stem would change strides that the later stages were designed for.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

TORCHVISION = ("resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "vgg11_bn", "densenet121",
               "shufflenet_v2_x0_5", "regnet_y_400mf", "convnext_tiny", "squeezenet1_1")
TIMM = ("timm_resnet18", "timm_efficientnet_b0")  # timm's resnet18 and efficientnet_b0, if timm is installed
MIN_SIZE = {"vgg11_bn": 32, "densenet121": 32, "convnext_tiny": 32}


class ResizedInput(nn.Module):
    """Resizes inputs smaller than `size` up to `size` x `size` (bilinear) before the wrapped model."""

    def __init__(self, model: nn.Module, size: int):
        super().__init__()
        self.model, self.size = model, int(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.model(x)


def _replace_stem(model: nn.Module, in_channels: int) -> None:
    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    stem = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     bias=conv.bias is not None, padding_mode=conv.padding_mode)
    nn.init.kaiming_normal_(stem.weight, mode="fan_out", nonlinearity="relu")  # torchvision's own conv init
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, stem)


def vision_model(name: str, num_classes: int = 10, in_channels: int = 3, image_size: int | None = None) -> nn.Module:
    """A randomly initialised `name` (TORCHVISION or TIMM) for `in_channels` x `image_size`^2 inputs."""
    if name in TIMM:
        try:
            import timm
        except ImportError:
            raise ValueError(f"model {name!r} needs timm: pip install 'gradprune-mlflow[zoo]'") from None
        model = timm.create_model(name.removeprefix("timm_"), pretrained=False, num_classes=num_classes,
                                  in_chans=in_channels)
    else:
        import torchvision.models

        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
        if in_channels != 3:
            _replace_stem(model, in_channels)
    smallest = MIN_SIZE.get(name, 0)
    if image_size is not None and image_size < smallest:
        model = ResizedInput(model, smallest)
    return model
