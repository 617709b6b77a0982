"""Captions for class-labelled images, and the text-conditioned network trained on them.

Each image of class ``c`` gets one of a few caption templates, ``"a photo of a sneaker"``, ``"a picture of an
ankle boot"``, ...; which template is drawn per sample and per step from the step's generator, so a resumed run
sees the same captions. Every (class, template) caption and the empty caption (the unconditional input of
classifier-free guidance, as SD1 trains it) is tokenized once with the bundled CLIP tokenizer to SD1's 77 ids.

:class:`TextConditionedUNet` is the pair SD1 is made of: a CLIP text encoder and a UNet that cross-attends to its
last hidden state. Its state dict is ``unet.*`` + ``text_encoder.*``; the two parts are the SD1 modules
(:class:`~fastdiff.models.unet_sd.UNetSD`, :class:`~fastdiff.models.clip_text.CLIPTextModel`), so a trained pair
is saved as an SD1 diffusers folder.
"""
from __future__ import annotations

import torch
from torch import nn

from fastdiff.models.clip_text import CLIPTextConfig, CLIPTextModel
from fastdiff.models.clip_tokenizer import CLIPTokenizer
from fastdiff.models.unet_sd import UNetSD, UNetSDConfig

__all__ = ["CAPTION_TEMPLATES", "caption_name", "caption", "CaptionTable", "TextConditionedUNet"]

CAPTION_TEMPLATES = (
    "a photo of {a} {name}",
    "a picture of {a} {name}",
    "{a} {name}",
    "a black and white photo of {a} {name}",
    "a product photo of {a} {name}",
)
# Dataset class names -> the words used in captions (Fashion-MNIST's folder-style names).
_CAPTION_WORDS = {"ankle-boot": "ankle boot"}


def caption_name(class_name: str) -> str:
    """The caption word(s) for a dataset class name (``"ankle-boot"`` -> ``"ankle boot"``)."""
    return _CAPTION_WORDS.get(class_name, class_name)


def caption(class_name: str, template: int = 0) -> str:
    """Caption ``template`` of a class: ``caption("ankle-boot") == "a photo of an ankle boot"``."""
    name = caption_name(class_name)
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return CAPTION_TEMPLATES[template].format(a=article, name=name)


class CaptionTable:
    """Token ids of every (class, template) caption and of the empty caption, made once."""

    def __init__(self, class_names: tuple[str, ...], tokenizer: CLIPTokenizer | None = None):
        self.tokenizer = tokenizer or CLIPTokenizer.from_bundled()
        self.class_names = tuple(class_names)
        self.num_templates = len(CAPTION_TEMPLATES)
        texts = [caption(c, k) for c in self.class_names for k in range(self.num_templates)]
        self.ids = self.tokenizer(texts)                 # (classes * templates, 77)
        self.null_ids = self.tokenizer([""])[0]          # bos, eos, pad...

    def lookup(self, labels: torch.Tensor, templates: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """(B, 77) ids: caption ``templates[i]`` of class ``labels[i]``, or the empty caption where ``drop``."""
        ids = self.ids[labels * self.num_templates + templates]
        return torch.where(drop[:, None], self.null_ids[None], ids)

    def encode(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)


class TextConditionedUNet(nn.Module):
    """``net(latents, t, input_ids)`` = ``unet(latents, t, text_encoder(input_ids))``.

    A batch holds few distinct captions (classes x templates + the empty one), so the text encoder runs once per
    distinct id row and its output is gathered back to the batch: the same values and gradients as encoding every
    row (each row's encoding depends on that row alone), at a fraction of the cost for batches larger than the
    number of captions.
    """

    def __init__(self, unet_config: UNetSDConfig, text_config: CLIPTextConfig):
        super().__init__()
        if unet_config.cross_attention_dim != text_config.hidden_size:
            raise ValueError(f"the UNet's cross_attention_dim {unet_config.cross_attention_dim} must equal the text "
                             f"encoder's hidden_size {text_config.hidden_size}")
        self.unet = UNetSD(unet_config)
        self.text_encoder = CLIPTextModel(text_config)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        uniq, inverse = torch.unique(input_ids, dim=0, return_inverse=True)
        return self.text_encoder(uniq.to(self.unet.conv_in.weight.device))[inverse.to(self.unet.conv_in.weight.device)]

    def forward(self, sample: torch.Tensor, timestep, input_ids: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, self.encode_text(input_ids))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
