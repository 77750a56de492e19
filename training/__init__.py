"""The product's offline half, what every user runs: data sources (`data`), decoder fitting
(`fit`, `checkpoint`), threshold calibration (`calibrate`), export of the one-graph bundle
(`export`), scoring with a torch detector or a bundle (`scoring`, `offline_score`) and the `dede`
command line (`cli`). Imports `models` and the service's torch-free parts; never the lab."""

# The shipped default decoder family and size (benchmarks/detection/README.md says why); here, not
# in training/fit.py, so that the command line can name it without importing torch.
DEFAULT_PRESET = "conv"
# The feature score's rules (training/fit.py FEATURE_RULES says what each reads and combines). The
# default is the one the tests fixed before their runs chose (benchmarks/detection/README.md).
FEATURE_RULE_NAMES = (
    "max_all",
    "mean_stages",
    "max_all_tail",
    "max_all_relative",
    "max_all_both",
    "max_all_both_balanced",
)
DEFAULT_FEATURE_RULE = "max_all"
# Where the feature score's per-depth centre and unit come from at calibration (training/fit.py
# `standardise_feature_score`): the fit's clean held-out auxiliary images, the calibration images
# that set the threshold, or "auto": the calibration images where some depth's median sits
# SHIFT_NOTE_UNITS or more from the auxiliary images' (the auxiliary units then miss the
# deployment's images), else the auxiliary images. "auto" is the default by the tenth rule test
# (benchmarks/detection/README.md); "calibration" everywhere failed the eighth and ninth tests,
# each on one guarded case, and is worse at out-of-distribution thresholds.
STANDARDISE_ON = ("auxiliary", "calibration", "auto")
DEFAULT_STANDARDISE_ON = "auto"
