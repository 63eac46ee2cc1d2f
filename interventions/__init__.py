"""actedit interventions: HPR, SEA, ITI, CAA, ActAdd and Diff as pyvene interventions.

Importing this package applies actedit's pyvene fixes (:mod:`.compat`) and registers every
method (:mod:`.registry`). pyvene imports it by itself when it loads an actedit artifact, so
``pyvene.IntervenableModel.load(dir, model)`` works without importing actedit first.
"""

from . import compat

compat.apply()

from . import actadd, caa, diff, hpr, iti, sea  # noqa: E402,F401  (each registers its method)
from .actadd import ActAddIntervention, ActAddSettings, build_actadd_config, fit_actadd  # noqa: E402
from .artifacts import (  # noqa: E402
    ArtifactError,
    add_measurement,
    artifact_metadata,
    edit_identity,
    load_artifact,
    push_to_hub,
    save_artifact,
)
from .base import ActEditIntervention  # noqa: E402
from .caa import CAAIntervention, CAASettings, build_caa_config, fit_caa  # noqa: E402
from .compat import attach_tracker  # noqa: E402
from .diff import DiffIntervention, DiffSettings  # noqa: E402
from .edits import compose, config_of, edit_config, intervenable, is_intervenable  # noqa: E402
from .hpr import HPRIntervention, HPRSettings, build_hpr_config, hpr_parameter_count  # noqa: E402
from .iti import ITIIntervention, ITISettings, build_iti_config, fit_iti, mass_mean_directions  # noqa: E402
from .positions import PositionPolicy, mark_answer_starts, mark_prompt_lengths  # noqa: E402
from .registry import (  # noqa: E402
    LossTerm,
    MethodSettings,
    MethodSpec,
    TrainingRecipe,
    method_names,
    method_spec,
    methods,
    register_method,
)
from .sea import SEAIntervention, SEASettings, build_sea_config, fit_sea, fit_sea_factors  # noqa: E402

__all__ = [
    "ActAddSettings",
    "ActAddIntervention",
    "ActEditIntervention",
    "ArtifactError",
    "CAASettings",
    "CAAIntervention",
    "DiffIntervention",
    "DiffSettings",
    "HPRSettings",
    "HPRIntervention",
    "ITISettings",
    "ITIIntervention",
    "LossTerm",
    "MethodSettings",
    "MethodSpec",
    "PositionPolicy",
    "SEASettings",
    "SEAIntervention",
    "TrainingRecipe",
    "add_measurement",
    "artifact_metadata",
    "edit_identity",
    "attach_tracker",
    "build_actadd_config",
    "build_caa_config",
    "build_hpr_config",
    "build_iti_config",
    "build_sea_config",
    "compose",
    "config_of",
    "edit_config",
    "fit_actadd",
    "fit_caa",
    "fit_iti",
    "fit_sea",
    "fit_sea_factors",
    "hpr_parameter_count",
    "intervenable",
    "is_intervenable",
    "load_artifact",
    "mark_answer_starts",
    "mark_prompt_lengths",
    "mass_mean_directions",
    "method_names",
    "method_spec",
    "methods",
    "push_to_hub",
    "register_method",
    "save_artifact",
]
