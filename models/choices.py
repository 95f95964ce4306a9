"""Names the command line offers as choices, in a module that imports nothing heavy.

``noisewise --help`` (and each subcommand's ``--help``) lists recipes, conformity scores, OOD scorers and
calibration modes. The modules that implement them import torch, scipy and MLflow, which take seconds to load;
the names live here so the command line can show them without loading any of that. A test checks each tuple
against the registry of the module that implements it, so a scorer or mode added in one place only fails the
tests instead of going missing from the command line.
"""

from __future__ import annotations

from pathlib import Path

#: Built-in training recipes: the YAML files in ``models/recipes/``.
RECIPE_DIR = Path(__file__).parent / "recipes"
RECIPES = tuple(sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))

#: ``--conformal``: average coverage over calibration draws, or coverage with probability 1 - delta.
CONFORMAL_MODES = ("plugin", "finite-sample")
#: ``--risk-correction``: how certified abstention accounts for wrong calibration labels.
RISK_CORRECTIONS = ("auto", "none", "symmetric", "worst-case")
#: ``--noise-model``: what label noise the calibration may assume.
NOISE_MODELS = ("auto", "uniform")
#: ``--score``: conformity scores (``noisewise.models.uncertainty.conformal.CONFORMITY_SCORES``).
CONFORMITY_SCORES = ("lac", "aps", "raps")
#: ``--ood-scorer``: OOD scores (``noisewise.models.uncertainty.ood.OOD_SCORERS``).
OOD_SCORERS = ("msp", "maxlogit", "energy", "knn", "mahalanobis", "vim", "react")
#: ``--ood-index``: how the knn bank is built (``noisewise.models.uncertainty.ood.KNN_INDEXES``).
OOD_INDEXES = ("exact", "subsample", "kmeans", "ivf", "auto")
#: OOD scores that need only logits, for imported models without a features method.
LOGITS_SCORERS = ("energy", "maxlogit", "msp")
#: The alias that serving follows by default.
CHAMPION = "champion"
