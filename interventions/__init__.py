"""actedit interventions: HPR, SEA, ITI, CAA and ActAdd as pyvene interventions.

Importing this package applies actedit's pyvene fixes (:mod:`.compat`). pyvene imports it by
itself when it loads an actedit artifact, so ``pyvene.IntervenableModel.load(dir, model)`` works
without importing actedit first.
"""

from . import compat

compat.apply()

from .actadd import ActAddIntervention, build_actadd_config, x_vector  # noqa: E402
from .artifacts import (  # noqa: E402
    ArtifactError,
    artifact_metadata,
    load_artifact,
    push_to_hub,
    save_artifact,
)
from .base import ActEditIntervention  # noqa: E402
from .caa import CAAIntervention, build_caa_config, mean_difference  # noqa: E402
from .config import DEFAULT_COMPONENTS, METHOD_ORDER, compose, config_of, edit_config, intervenable  # noqa: E402
from .hpr import HPRIntervention, build_hpr_config, hpr_parameter_count  # noqa: E402
from .iti import ITIIntervention, build_iti_config, mass_mean_directions  # noqa: E402
from .compat import attach_tracker  # noqa: E402
from .positions import PositionPolicy, mark_answer_starts, mark_prompt_lengths  # noqa: E402
from .sea import SEAIntervention, build_sea_config, fit_sea_factors  # noqa: E402

INTERVENTIONS = {
    "hpr": HPRIntervention,
    "sea": SEAIntervention,
    "iti": ITIIntervention,
    "caa": CAAIntervention,
    "actadd": ActAddIntervention,
}
"""Method name → intervention class."""


def intervention_class(method: str):
    """The intervention class of a method name, with a clear error for unknown names."""
    try:
        return INTERVENTIONS[method.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown method {method!r}; known: {', '.join(INTERVENTIONS)}.") from None


__all__ = [
    "ActAddIntervention", "ActEditIntervention", "ArtifactError", "CAAIntervention", "DEFAULT_COMPONENTS",
    "HPRIntervention", "INTERVENTIONS", "ITIIntervention", "METHOD_ORDER", "PositionPolicy", "SEAIntervention",
    "artifact_metadata", "attach_tracker", "build_actadd_config", "build_caa_config", "build_hpr_config",
    "build_iti_config", "build_sea_config", "compose", "config_of", "edit_config", "fit_sea_factors", "hpr_parameter_count",
    "intervenable", "intervention_class", "load_artifact", "mark_answer_starts", "mark_prompt_lengths", "mass_mean_directions",
    "mean_difference", "push_to_hub", "save_artifact", "x_vector",
]
