"""IS-Net as BRIA ships it in RMBG-1.4, with the reference's module and parameter names.

IS-Net: Qin et al., "Highly Accurate Dichotomous Image Segmentation" (ECCV 2022,
arXiv:2203.03041), a U^2-Net-style encoder/decoder of residual U-blocks (RSU-L, Qin et al.
2020, arXiv:2005.09007) with six deeply supervised side outputs. BRIA's variant
(``briarmbg.py`` in the briaai/RMBG-1.4 hub repo) is what is implemented here:

- ``conv_in`` is a stride-2 3x3 conv and ``pool_in`` exists but is *not* applied in forward;
- stages ``stage1..stage6`` = RSU7, RSU6, RSU5, RSU4, RSU4F, RSU4F joined by 2x2 ceil-mode
  max pools ``pool12..pool56``; decoder ``stage5d..stage1d``; 3x3 side convs ``side1..side6``;
- every conv is a ``REBNCONV`` (``conv_s1`` 3x3 with bias, ``bn_s1``, ``relu_s1``);
- upsampling is ``F.interpolate(mode="bilinear")`` (align_corners=False) to the skip's size;
- ``forward`` returns ``[sigmoid(d1), ..., sigmoid(d6)], [hx1d, hx2d, hx3d, hx4d, hx5d, hx6]``,
  every ``d`` upsampled to the input size. ``sigmoid(d1)`` is the mask RMBG uses.

The state-dict keys therefore equal those of RMBG-1.4's ``model.safetensors`` and it loads
with ``strict=True``. ``channel_divisor`` (our extension, default 1 = RMBG-1.4) divides every
internal channel count, keeping the module tree and key names, for tiny test models; the
tiny model's ``config.json`` records it, the published config has no such key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trt_bgswap.errors import ModelError

CONFIG_DIVISOR_KEY = "channel_divisor"  # our key in config.json; absent in RMBG-1.4's = full width

# RMBG-1.4's channel plan at full width: (in, mid, out) per stage; conv_in makes 64 channels.
STEM_CHANNELS = 64
ENCODER: tuple[tuple[str, int, tuple[int, int, int]], ...] = (
    ("stage1", 7, (64, 32, 64)),
    ("stage2", 6, (64, 32, 128)),
    ("stage3", 5, (128, 64, 256)),
    ("stage4", 4, (256, 128, 512)),
    ("stage5", 0, (512, 256, 512)),  # height 0 = RSU4F (dilated, no pooling)
    ("stage6", 0, (512, 256, 512)),
)
DECODER: tuple[tuple[str, int, tuple[int, int, int]], ...] = (
    ("stage5d", 0, (1024, 256, 512)),
    ("stage4d", 4, (1024, 128, 256)),
    ("stage3d", 5, (512, 64, 128)),
    ("stage2d", 6, (256, 32, 64)),
    ("stage1d", 7, (128, 16, 64)),
)
SIDE_CHANNELS = (64, 64, 128, 256, 512, 512)  # inputs of side1..side6


def _upsample_like(src: torch.Tensor, tar: torch.Tensor) -> torch.Tensor:
    """Bilinear resize of ``src`` to ``tar``'s spatial size (the reference's helper)."""
    return F.interpolate(src, size=tar.shape[2:], mode="bilinear", align_corners=False)


def _pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(2, stride=2, ceil_mode=True)


class REBNCONV(nn.Module):
    """3x3 conv (dilated) + BatchNorm + ReLU; attribute names are the checkpoint's."""

    def __init__(self, in_ch: int, out_ch: int, dirate: int = 1, stride: int = 1) -> None:
        super().__init__()
        self.conv_s1 = nn.Conv2d(in_ch, out_ch, 3, padding=dirate, dilation=dirate, stride=stride)
        self.bn_s1 = nn.BatchNorm2d(out_ch)
        self.relu_s1 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu_s1(self.bn_s1(self.conv_s1(x)))


class RSU(nn.Module):
    """Residual U-block of height L (RSU-L): L-1 encoder convs with L-2 pools, a dilated bottom conv.

    Children are named as in the reference: ``rebnconvin``, ``rebnconv1..L``, ``pool1..L-2``,
    ``rebnconv{L-1}d..rebnconv1d``.
    """

    def __init__(self, height: int, in_ch: int, mid_ch: int, out_ch: int) -> None:
        super().__init__()
        if height < 3:
            raise ModelError(f"RSU height {height}: RSU blocks need a height of at least 3")
        self.height = height
        self.rebnconvin = REBNCONV(in_ch, out_ch, dirate=1)
        self.add_module("rebnconv1", REBNCONV(out_ch, mid_ch, dirate=1))
        self.add_module("pool1", _pool())
        for i in range(2, height):
            self.add_module(f"rebnconv{i}", REBNCONV(mid_ch, mid_ch, dirate=1))
            if i < height - 1:
                self.add_module(f"pool{i}", _pool())
        self.add_module(f"rebnconv{height}", REBNCONV(mid_ch, mid_ch, dirate=2))
        for i in range(height - 1, 1, -1):
            self.add_module(f"rebnconv{i}d", REBNCONV(mid_ch * 2, mid_ch, dirate=1))
        self.add_module("rebnconv1d", REBNCONV(mid_ch * 2, out_ch, dirate=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hxin = self.rebnconvin(x)
        skips: list[torch.Tensor] = []
        hx = hxin
        for i in range(1, self.height):
            hx = getattr(self, f"rebnconv{i}")(hx)
            skips.append(hx)
            if i < self.height - 1:
                hx = getattr(self, f"pool{i}")(hx)
        d = getattr(self, f"rebnconv{self.height}")(hx)
        for i in range(self.height - 1, 0, -1):
            d = getattr(self, f"rebnconv{i}d")(torch.cat((d, skips[i - 1]), 1))
            if i > 1:
                d = _upsample_like(d, skips[i - 2])
        return d + hxin


class RSU7(RSU):
    def __init__(self, in_ch: int, mid_ch: int, out_ch: int) -> None:
        super().__init__(7, in_ch, mid_ch, out_ch)


class RSU6(RSU):
    def __init__(self, in_ch: int, mid_ch: int, out_ch: int) -> None:
        super().__init__(6, in_ch, mid_ch, out_ch)


class RSU5(RSU):
    def __init__(self, in_ch: int, mid_ch: int, out_ch: int) -> None:
        super().__init__(5, in_ch, mid_ch, out_ch)


class RSU4(RSU):
    def __init__(self, in_ch: int, mid_ch: int, out_ch: int) -> None:
        super().__init__(4, in_ch, mid_ch, out_ch)


class RSU4F(nn.Module):
    """RSU-4 without pooling: dilations 1, 2, 4, 8 keep the resolution of the deepest stages."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int) -> None:
        super().__init__()
        self.rebnconvin = REBNCONV(in_ch, out_ch, dirate=1)
        self.rebnconv1 = REBNCONV(out_ch, mid_ch, dirate=1)
        self.rebnconv2 = REBNCONV(mid_ch, mid_ch, dirate=2)
        self.rebnconv3 = REBNCONV(mid_ch, mid_ch, dirate=4)
        self.rebnconv4 = REBNCONV(mid_ch, mid_ch, dirate=8)
        self.rebnconv3d = REBNCONV(mid_ch * 2, mid_ch, dirate=4)
        self.rebnconv2d = REBNCONV(mid_ch * 2, mid_ch, dirate=2)
        self.rebnconv1d = REBNCONV(mid_ch * 2, out_ch, dirate=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hxin = self.rebnconvin(x)
        hx1 = self.rebnconv1(hxin)
        hx2 = self.rebnconv2(hx1)
        hx3 = self.rebnconv3(hx2)
        hx4 = self.rebnconv4(hx3)
        hx3d = self.rebnconv3d(torch.cat((hx4, hx3), 1))
        hx2d = self.rebnconv2d(torch.cat((hx3d, hx2), 1))
        hx1d = self.rebnconv1d(torch.cat((hx2d, hx1), 1))
        return hx1d + hxin


_RSU_BY_HEIGHT: dict[int, type[nn.Module]] = {7: RSU7, 6: RSU6, 5: RSU5, 4: RSU4, 0: RSU4F}


def _divide(channels: int, divisor: int) -> int:
    if channels % divisor:
        raise ModelError(f"{CONFIG_DIVISOR_KEY}={divisor} does not divide IS-Net's {channels} channels; use 1, 2, 4, 8 or 16")
    return channels // divisor


class BriaRMBG(nn.Module):
    """RMBG-1.4's IS-Net (``briarmbg.BriaRMBG``); ``channel_divisor`` > 1 only for tiny test models."""

    def __init__(self, in_ch: int = 3, out_ch: int = 1, channel_divisor: int = 1) -> None:
        super().__init__()
        if channel_divisor < 1:
            raise ModelError(f"{CONFIG_DIVISOR_KEY}={channel_divisor}: must be a positive integer (1 = RMBG-1.4)")
        self.in_ch = in_ch
        self.out_ch = out_ch
        self.channel_divisor = channel_divisor

        def c(n: int) -> int:
            return _divide(n, channel_divisor)

        self.conv_in = nn.Conv2d(in_ch, c(STEM_CHANNELS), 3, stride=2, padding=1)
        self.pool_in = _pool()  # defined by the reference, not used in its forward
        for idx, (name, height, (ci, cm, co)) in enumerate(ENCODER, start=1):
            self.add_module(name, _RSU_BY_HEIGHT[height](c(ci), c(cm), c(co)))
            if idx < len(ENCODER):
                self.add_module(f"pool{idx}{idx + 1}", _pool())
        for name, height, (ci, cm, co) in DECODER:
            self.add_module(name, _RSU_BY_HEIGHT[height](c(ci), c(cm), c(co)))
        for idx, ch in enumerate(SIDE_CHANNELS, start=1):
            self.add_module(f"side{idx}", nn.Conv2d(c(ch), out_ch, 3, padding=1))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "BriaRMBG":
        """Build from RMBG-1.4's ``config.json`` (``in_ch``, ``out_ch``; our optional ``channel_divisor``)."""
        try:
            return cls(
                in_ch=int(config.get("in_ch", 3)),
                out_ch=int(config.get("out_ch", 1)),
                channel_divisor=int(config.get(CONFIG_DIVISOR_KEY, 1)),
            )
        except (TypeError, ValueError) as e:
            raise ModelError(f"RMBG config {dict(config)!r} has a non-integer in_ch/out_ch/{CONFIG_DIVISOR_KEY} ({e})") from e

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        hxin = self.conv_in(x)  # the reference leaves pool_in out here
        hx1 = self.stage1(hxin)
        hx2 = self.stage2(self.pool12(hx1))
        hx3 = self.stage3(self.pool23(hx2))
        hx4 = self.stage4(self.pool34(hx3))
        hx5 = self.stage5(self.pool45(hx4))
        hx6 = self.stage6(self.pool56(hx5))

        hx5d = self.stage5d(torch.cat((_upsample_like(hx6, hx5), hx5), 1))
        hx4d = self.stage4d(torch.cat((_upsample_like(hx5d, hx4), hx4), 1))
        hx3d = self.stage3d(torch.cat((_upsample_like(hx4d, hx3), hx3), 1))
        hx2d = self.stage2d(torch.cat((_upsample_like(hx3d, hx2), hx2), 1))
        hx1d = self.stage1d(torch.cat((_upsample_like(hx2d, hx1), hx1), 1))

        features = [hx1d, hx2d, hx3d, hx4d, hx5d, hx6]
        masks = [torch.sigmoid(_upsample_like(getattr(self, f"side{i}")(f), x)) for i, f in enumerate(features, start=1)]
        return masks, features


class MainMask(nn.Module):
    """IS-Net reduced to its main mask ``sigmoid(d1)``; the tracer drops the side branches nothing reads."""

    def __init__(self, isnet: BriaRMBG) -> None:
        super().__init__()
        self.isnet = isnet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        masks, _ = self.isnet(x)
        return masks[0]
