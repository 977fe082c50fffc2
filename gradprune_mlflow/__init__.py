"""gradprune-mlflow: remove backdoors from CNNs in the MLflow Model Registry with Grad-Prune.

The front door is `sanitize(model, clean_set, trigger=None, config=None)`.
"""

from gradprune_mlflow.api import SanitizeResult, sanitize
from gradprune_mlflow.config import SanitizeConfig
from gradprune_mlflow.data.cleanset import CleanSet, load_clean_set
from gradprune_mlflow.defense.triggers import Trigger, load_trigger

__all__ = ["CleanSet", "SanitizeConfig", "SanitizeResult", "Trigger", "load_clean_set", "load_trigger", "sanitize"]
__version__ = "0.1.0"
