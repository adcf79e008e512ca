"""spice-trainer: SPICE data selection for instruction tuning on Hugging Face infrastructure.

The core (`config`, `core/`, `features/`) needs only torch (and numpy).
`SpiceDataCallback` and `SpiceSampler` live in `spice_trainer.integrations` and import transformers
on first use, so ``import spice_trainer`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spice_trainer.config import SpiceConfig

__version__ = "0.1.0"

# Public names resolved on first access: name -> module that defines it.
_LAZY = {
    "ProxyModel": "spice_trainer.proxy.model",
    "Selection": "spice_trainer.core.selection",
    "select_from_features": "spice_trainer.core.greedy",
    "gradient_features": "spice_trainer.features.gradients",
    "select": "spice_trainer.pipeline",
    "SpiceArguments": "spice_trainer.integrations.arguments",
    "SpiceDataCallback": "spice_trainer.integrations.trainer",
    "SpiceSampler": "spice_trainer.integrations.sampler",
}

__all__ = [
    "ProxyModel",
    "Selection",
    "SpiceArguments",
    "SpiceConfig",
    "SpiceDataCallback",
    "SpiceSampler",
    "__version__",
    "gradient_features",
    "select",
    "select_from_features",
]

if TYPE_CHECKING:
    from spice_trainer.core.greedy import select_from_features
    from spice_trainer.core.selection import Selection
    from spice_trainer.features.gradients import gradient_features
    from spice_trainer.integrations.arguments import SpiceArguments
    from spice_trainer.integrations.sampler import SpiceSampler
    from spice_trainer.integrations.trainer import SpiceDataCallback
    from spice_trainer.pipeline import select
    from spice_trainer.proxy.model import ProxyModel


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'spice_trainer' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
