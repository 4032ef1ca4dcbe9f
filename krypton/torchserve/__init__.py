"""TorchServe integration of Krypton OBE (this subpackage imports ``ts``; the engine modules never do).

- ``KryptonHandler``: the complete handler (predictions + explanations) for image CNNs, configured by
  the ``handler:`` section of the archive's model-config.yaml (see ``request.Settings``).
"""

from .handler import KryptonExplainMixin, KryptonHandler

__all__ = ["KryptonExplainMixin", "KryptonHandler"]
