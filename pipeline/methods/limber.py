"""LiMBeR: the captioning loss alone (no alignment term)."""
from __future__ import annotations

from pipeline.methods.base import Method, MethodConfig
from pipeline.schema import Positive, section


@section
class LimberConfig(MethodConfig):
    caption_weight: Positive = 1.0  # its only loss term


class Limber(Method):
    name = "limber"
    Config = LimberConfig
    summary = "captioning only (LiMBeR)"


METHOD = Limber
