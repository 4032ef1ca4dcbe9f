"""The one-file TorchServe handler of Krypton OBE: archive it with ``--handler handler/krypton_handler.py``
and no ``--extra-files``. The code lives in the installed package (``krypton.torchserve``); TorchServe's
workers run with the Python that started ``torchserve``, where ``krypton`` is installed.

TorchServe 0.12 wants exactly one class defined in this file (imported classes do not count), hence
the one-line subclass. An ImportError here would make TorchServe retry the name as one of its own
default handlers and report that instead; a RuntimeError names the real cause in the worker log.
"""

import sys

try:
    from krypton.torchserve import KryptonHandler as _KryptonHandler
except ImportError as e:  # noqa: BLE001 - re-raised with what to do
    raise RuntimeError(
        f"krypton_handler.py: cannot import krypton.torchserve in this TorchServe worker ({sys.executable}): "
        f"{e}. Install the krypton package into the Python that runs torchserve (bash scripts/setup.sh, or "
        "pip install --no-build-isolation -e . in the Krypton checkout) and start torchserve from it") from e


class KryptonHandler(_KryptonHandler):
    """Krypton's TorchServe handler (krypton.torchserve.KryptonHandler)."""
