"""spice-trainer: SPICE data selection for instruction tuning on Hugging Face infrastructure.

The package is built in floors; a module imports only from its own floor or lower ones, never a private
name of another module (checked by ``tests/test_layout.py``; see ``docs/architecture.md``):

=====  =====================  ===================================================================
floor  modules                holds
=====  =====================  ===================================================================
0      ``config``             `SpiceConfig`
1      ``core/``              objective, the greedy loop, stopping, `Selection`, projection,
                              baselines, the selection thread policy
2      ``features/``          rows and collation, gradient features, the feature store, the
                              cheap-reselection memory
3      ``distributed/``       ranks and collectives, the sharded greedy
4      ``pipeline``           `select`: features, guards, greedy
5      ``proxy/``             `ProxyModel`, compatibility, agreement, the default LoRA
6      ``integrations/``      `SpiceDataCallback`, `SpiceSampler`, checkpoint state, TRL, Hub
                              loading, proxy rounds, reporting, `SpiceArguments`
7      ``cli/``, ``demo/``    the ``spice-trainer`` command, the synthetic worlds and the demo
=====  =====================  ===================================================================

``config``, ``core/`` and ``features/`` import torch, numpy and tqdm, and no transformers, TRL, PEFT,
accelerate or datasets at module level. The public names below resolve on first access, so
``import spice_trainer`` stays light.
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
