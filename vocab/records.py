"""Keys of the Flower messages exchanged between coordinator and hospital nodes.

Only these keys may appear in a message; values are arrays or aggregate numbers, never case ids,
file names, DICOM tag values or raw patient values (DESIGN.md invariant 1).
"""

from typing import Final

ARRAYS: Final = "arrays"          # ArrayRecord: model state_dict
METRICS: Final = "metrics"        # MetricRecord: aggregates only
CONFIG: Final = "config"          # ConfigRecord: per-round values from the strategy
NUM_EXAMPLES: Final = "num-examples"
EXPERT_TOKENS_PREFIX: Final = "expert-tokens"  # f"{prefix}.{layer}.{expert}" -> token count
