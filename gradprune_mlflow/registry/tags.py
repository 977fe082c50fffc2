"""The registry contract (docs/contracts.md, "Registry"): tag names, statuses, the alias and the experiment.

MLflow 3 has no custom stages, so the alias `sanitized` is our "Sanitized" stage.
"""

from __future__ import annotations

PREFIX = "gradprune."

# Source version tags.
STATUS = "gradprune.status"
REASON = "gradprune.reason"
RUN_ID = "gradprune.run_id"
SANITIZED_VERSION = "gradprune.sanitized_version"
# The saved format the version came in (pickle, pt2, torchscript); on sanitized versions too, which keep it.
MODEL_FORMAT = "gradprune.model_format"
# The claim: who works on a version and until when (seconds since the epoch). See claim.py.
CLAIM_ID = "gradprune.claim_id"
LEASE_UNTIL = "gradprune.lease_until"

# Sanitized version tags.
ROLE = "gradprune.role"
ROLE_SANITIZED = "sanitized"
SOURCE_VERSION = "gradprune.source_version"
# On sanitized versions and their runs: report.json's verification verdict (passed, failed, measured, not run). The
# alias never points at a version whose verification failed.
VERIFICATION = "gradprune.verification"
VERIFICATION_FAILED = "failed"

# Registered-model tags: where a model's inputs are (a local path or s3://).
CLEAN_DATA = "gradprune.clean_data"
TRIGGER = "gradprune.trigger"
EVAL_TRIGGER = "gradprune.eval_trigger"
TEST_DATA = "gradprune.test_data"
# The default clean set for models without their own CLEAN_DATA tag.
CLEAN_DATA_ENV = "GRADPRUNE_CLEAN_DATA"

ALIAS = "sanitized"
EXPERIMENT = "gradprune"

RUNNING, SANITIZED, CLEAN = "running", "sanitized", "clean"
# A sanitized version was registered, but the independent search still found a trigger in it: no alias, review it.
UNVERIFIED = "unverified"
# Nothing was flagged, but the flag score is above the development clean models': nothing registered, review it.
SUSPECT = "suspect"
REJECTED, UNSAFE, UNSUPPORTED, FAILED = "rejected", "unsafe", "unsupported", "failed"
STATUSES = (RUNNING, SANITIZED, CLEAN, UNVERIFIED, SUSPECT, REJECTED, UNSAFE, UNSUPPORTED, FAILED)
# MLflow caps tag values at 5000 characters (8000 on newer servers); reasons are cut well below that.
MAX_REASON = 2000
