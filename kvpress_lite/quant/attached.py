"""`FusedAttachment`: what a quantized cache does to decode through the fused kernel (attach, report, detach)."""

from __future__ import annotations

import weakref

from .. import attention_bridge
from ..kernels import fused as fused_path


class FusedAttachmentMixin:
    """For caches whose full-attention layers decode through `kvpress_lite.attention_bridge`.

    `_attach(model, owner, required)` attaches the bridge and hands the attachment to every layer that has an
    `attachment` attribute; `detach()` or leaving `with cache:` gives the model back its attention (garbage
    collection of the cache is only a backstop)."""

    attachment = None

    def _check_fused_options(self, model_or_config, fused, kernel_impl: str) -> bool:
        """ValueError for a bad `fused` / `kernel_impl`, or `fused=True` without a model; True if given a model."""
        fused_path.check_options(fused, kernel_impl)
        is_model = hasattr(model_or_config, "set_attn_implementation")
        if fused and not is_model:
            raise ValueError(f"fused=True needs the model: {type(self).__name__}(model, ...) (a config has no "
                             "attention to attach the fused kernel to)")
        return is_model

    def _attach(self, model, owner: str, required: bool) -> None:
        try:
            self.attachment = attention_bridge.attach(model, owner)
        except ValueError:
            if required:
                raise
            return
        self._finalizer = weakref.finalize(self, self.attachment.detach)
        for layer in self.layers:
            if hasattr(layer, "attachment"):
                layer.attachment = self.attachment

    @property
    def fused(self) -> bool:
        """True while decoding runs the fused kernel (attached to the model's attention)."""
        return self.attachment is not None and self.attachment.active

    def detach(self) -> None:
        """Give the model back its attention implementation (idempotent); later forwards dequantize."""
        if self.attachment is not None:
            self.attachment.detach()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.detach()
