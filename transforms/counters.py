"""Names of the Beam metrics the stage counts rows and groups with.

One namespace, so that a runner's metrics query finds them all; a reason of
leaving out follows the dot in the ``*_left_out.*`` names.
"""

NAMESPACE = "feature_stage"

ROWS_READ = "rows_read"
ROWS_PROJECTED = "rows_projected"
ROWS_FITTED = "rows_fitted"
GROUPS_WRITTEN = "groups_written"
ROWS_LEFT_OUT = "rows_left_out."
GROUPS_LEFT_OUT = "groups_left_out."

MISSING_VALUE = "missing_value"
TOO_FEW_ROWS = "too_few_rows"
UNKNOWN_GROUP = "unknown_group"
ZERO_WEIGHT = "zero_weight"
